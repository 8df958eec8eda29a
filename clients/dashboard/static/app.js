// The fleet page: a snapshot, then batched deltas over Server-Sent Events; every view is rendered from the
// hosts' retained status/state documents, their events, and the orchestrator's rollout documents and events.
"use strict";

const STATES = ["offline", "online", "patched", "transitioning", "stalled", "failed"];
const COLORS = {offline: "#9aa0a6", online: "#8ab4f8", patched: "#1e8e3e", transitioning: "#f9ab00",
                stalled: "#e8710a", failed: "#d93025"};
const EXEC_STATES = ["QUEUED", "IN_PROGRESS", "TRANSITIONING", "STALLED", "SUCCEEDED", "VERIFIED", "FAILED",
                     "TIMED_OUT", "REJECTED", "REVERTED", "CANCELED", "REMOVED"];
const EXEC_COLORS = {QUEUED: "#c5cae9", IN_PROGRESS: "#8ab4f8", TRANSITIONING: "#f9ab00", STALLED: "#e8710a",
                     SUCCEEDED: "#1e8e3e", VERIFIED: "#0b6b2b", FAILED: "#d93025", TIMED_OUT: "#a50e0e",
                     REJECTED: "#880e4f", REVERTED: "#7b1fa2", CANCELED: "#9aa0a6", REMOVED: "#dadce0"};
// which controls a rollout's state allows (clients/rollout/engine.py's _need)
const CONTROLS = {
  start: ["CREATED"], pause: ["RUNNING", "WAITING_APPROVAL", "SCHEDULED"], resume: ["PAUSED"],
  approve: ["CREATED", "SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED"],
  cancel: ["CREATED", "SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED"],
  rollback: ["SCHEDULED", "WAITING_APPROVAL", "RUNNING", "PAUSED", "COMPLETED", "CANCELED"],
};
const view = {hosts: {}, events: [], rollouts: {}, broker: {connected: false, url: ""}, streamUp: false,
              operator: false, selected: null, checks: {}, cursor: null, traces: {}, tracePaused: false,
              rehearsal: null,
              history: {t: [], counts: Object.fromEntries(STATES.map(s => [s, []]))}};
const dirty = {hosts: new Set(), structure: true, rollouts: new Set(), traces: new Set(), any: true};
let lastPlot = 0, lastLatencyPlot = 0, costPlotted = "";
const TRACE_LINES = 500, LATENCY_POINTS = 2000;

const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const cssId = s => String(s).replace(/[^A-Za-z0-9_-]/g, "_");

function components(h) { return (h.state && h.state.components) || {}; }
function labels(h) { const s = h.state || {}; return s.labels || (s.kernel && s.kernel.labels) || components(h).labels || components(h).fleet?.labels || {}; }
function build(h) { const k = (h.state && h.state.kernel) || {}; return k.release || k.build || k.version || k.build_id || "?"; }
function faults(h) { const s = h.state || {}; return s.faults || components(h).fleet?.faults || components(h).faults || []; }

function hostState(h) {
  if (!h.status || h.status.state !== "online") return "offline";
  const lp = components(h).livepatch || {};
  if (lp.transition) return lp.transition.stalled ? "stalled" : "transitioning";
  const failed = (lp.restored && lp.restored.failed && lp.restored.failed.length) || (components(h).ftrace?.restore_failed || []).length;
  if (failed) return "failed";
  if ((lp.patches || []).some(p => p.enabled)) return "patched";
  return "online";
}

function matches(name, h, filter) {
  if (!filter) return true;
  const eq = filter.indexOf("=");
  if (eq > 0) return String(labels(h)[filter.slice(0, eq)] ?? "") === filter.slice(eq + 1);
  return name.includes(filter) || build(h).includes(filter);
}

function groupOf(h) {
  const groupBy = $("group").value;
  return groupBy === "build" ? build(h) : groupBy ? String(labels(h)[groupBy] ?? "(none)") : "";
}

function apply(batch, fresh) {
  view.broker = batch.broker;
  if (fresh) { view.hosts = {}; view.events = []; view.rollouts = {}; view.traces = {}; dirty.structure = true; }
  for (const [name, t] of Object.entries(batch.traces || {})) {
    const mine = view.traces[name] || (view.traces[name] = {lines: [], latency: [], session: {}, lost_batches: 0});
    mine.lines = mine.lines.concat(t.lines).slice(-TRACE_LINES);
    mine.latency = mine.latency.concat(t.latency).slice(-LATENCY_POINTS);
    mine.session = t.session; mine.lost_batches = t.lost_batches;
    dirty.traces.add(name);
  }
  for (const [name, h] of Object.entries(batch.hosts || {})) {
    const old = view.hosts[name];
    if (!old || groupOf(old) !== groupOf(h) || !!old.status !== !!h.status) dirty.structure = true;
    view.hosts[name] = h;
    dirty.hosts.add(name);
  }
  for (const [name, r] of Object.entries(batch.rollouts || {})) {
    if (r === null) delete view.rollouts[name]; else view.rollouts[name] = r;
    dirty.rollouts.add(name);
  }
  view.events = view.events.concat(batch.events || []).slice(-300);
  if ("operator" in batch) view.operator = !!batch.operator;
  view.cursor = batch.cursor;
  dirty.any = true;
}

// -- banner, fleet ----------------------------------------------------------------------------------------------

function renderBanner() {
  const b = $("banner");
  let text = "";
  if (!view.streamUp) text = "Disconnected from the dashboard server: reconnecting…";
  else if (!view.broker.connected) text = `Disconnected from the broker ${view.broker.url}: reconnecting…`;
  b.textContent = text;
  b.classList.toggle("hidden", !text);
  $("broker").textContent = view.broker.url;
  $("role").textContent = view.operator ? "operator" : "observer (read-only)";
  document.body.classList.toggle("operator", view.operator);
}

function cellHtml(name, h) {
  const st = hostState(h);
  return `<span class="cell st-${st}${faults(h).length ? " fault" : ""}" data-host="${esc(name)}" data-state="${st}" title="${esc(name)}: ${st}"></span>`;
}

function renderFleet() {
  const filter = $("filter").value.trim();
  const counts = Object.fromEntries(STATES.map(s => [s, 0]));
  const names = Object.keys(view.hosts).sort();
  for (const name of names) { const h = view.hosts[name]; if (matches(name, h, filter)) counts[hostState(h)] += 1; }
  if (dirty.structure) {
    const groups = new Map(), labelKeys = new Set();
    for (const name of names) {
      const h = view.hosts[name];
      Object.keys(labels(h)).forEach(k => labelKeys.add(k));
      if (!matches(name, h, filter)) continue;
      const g = groupOf(h);
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(cellHtml(name, h));
    }
    const sel = $("group");
    for (const k of labelKeys) if (![...sel.options].some(o => o.value === k)) sel.add(new Option(`label ${k}`, k));
    $("groups").innerHTML = [...groups.entries()].sort().map(([g, cells]) =>
      `<div class="group">${g ? `<h3>${esc(g)} (${cells.length})</h3>` : ""}<div class="cells">${cells.join("")}</div></div>`).join("");
  } else {
    // only the hosts that changed: their cells are replaced in place (a 1,000-host grid is not rebuilt)
    for (const name of dirty.hosts) {
      const el = document.querySelector(`#groups .cell[data-host="${CSS.escape(name)}"]`), h = view.hosts[name];
      if (!el || !h) continue;
      const st = hostState(h);
      if (el.dataset.state !== st) { el.className = `cell st-${st}${faults(h).length ? " fault" : ""}`; el.dataset.state = st; el.title = `${name}: ${st}`; }
    }
  }
  $("counts").innerHTML = STATES.map(s => `<span data-count="${s}"><i class="swatch st-${s}"></i>${s} ${counts[s]}</span>`).join("");
  return counts;
}

// -- rollouts ---------------------------------------------------------------------------------------------------

function bar(counts, total) {
  if (!total) return "";
  return `<span class="bar">${EXEC_STATES.filter(s => counts[s]).map(s =>
    `<i style="width:${(100 * counts[s] / total).toFixed(2)}%;background:${EXEC_COLORS[s]}" title="${s} ${counts[s]}"></i>`).join("")}</span>`;
}

function rolloutControls(name, doc, waves) {
  if (!view.operator) return "";
  const st = doc.state;
  const btn = (verb, label, extra = "") => CONTROLS[verb].includes(st)
    ? `<button type="button" class="control" data-control="${verb}" data-rollout="${esc(name)}"${extra}>${label}</button>` : "";
  const waiting = waves.find(w => w.state === "waiting_approval");
  return `<span class="controls">${btn("start", "start")}${btn("pause", "pause")}${btn("resume", "resume")}` +
         `${waiting || st === "WAITING_APPROVAL" ? btn("approve", `approve wave ${waiting ? waiting.index : doc.current_wave}`, ` data-wave="${waiting ? waiting.index : doc.current_wave}"`) : ""}` +
         `${btn("cancel", "cancel")}${btn("rollback", "roll back")}</span>`;
}

function rolloutBox(name) {
  let box = document.querySelector(`.rollout[data-rollout="${CSS.escape(name)}"]`);
  if (!box) {
    box = document.createElement("div");
    box.className = "rollout";
    box.dataset.rollout = name;
    box.innerHTML = `<div class="ro-head"></div><div class="ro-body"><div class="ro-tables"><div class="ro-waves"></div>` +
      `<div class="ro-abort"></div></div><div class="ro-plot plot" id="ro-plot-${cssId(name)}"></div></div><ol class="ro-events events"></ol>`;
    $("rollouts").prepend(box);
  }
  return box;
}

function renderRollout(name) {
  const r = view.rollouts[name];
  const existing = document.querySelector(`.rollout[data-rollout="${CSS.escape(name)}"]`);
  if (!r) { if (existing) existing.remove(); return; }
  const box = rolloutBox(name), doc = r.doc, total = Object.values(doc.counts).reduce((a, b) => a + b, 0);
  box.dataset.state = doc.state;
  box.querySelector(".ro-head").innerHTML =
    `<h3>${esc(name)} <span class="ro-state state-${esc(doc.state)}" data-field="state">${esc(doc.state)}</span>` +
    ` <span class="muted">${esc(r.spec ? `patch ${r.spec.patch}` : "")} · v${esc(doc.version)} · wave ${esc(doc.current_wave + 1)}/${doc.waves.length}</span></h3>` +
    `${doc.reason ? `<p class="muted reason">${esc(doc.reason)}</p>` : ""}` +
    `<div class="ro-counts">${bar(doc.counts, total)} ${EXEC_STATES.filter(s => doc.counts[s]).map(s =>
      `<span data-exec-count="${s}"><i class="swatch" style="background:${EXEC_COLORS[s]}"></i>${s} ${doc.counts[s]}</span>`).join(" ")}</div>` +
    rolloutControls(name, doc, r.waves);
  box.querySelector(".ro-waves").innerHTML = `<table><tr><th>wave</th><th>hosts</th><th>state</th><th>progress</th><th>success / threshold</th></tr>` +
    r.waves.map(w => `<tr class="wave" data-wave="${w.index}"><td>${w.index}${w.approval ? " ✋" : ""}</td><td>${w.hosts}</td><td>${esc(w.state)}</td>` +
      `<td>${bar(w.counts, w.hosts)}</td><td>${w.success_pct == null ? "—" : `${w.success_pct}%`} / ${w.threshold_pct == null ? "?" : `${w.threshold_pct}%`}</td></tr>`).join("") + `</table>`;
  box.querySelector(".ro-abort").innerHTML = r.abort.length
    ? `<table><tr><th>abort when</th><th>now</th><th>how close</th></tr>` + r.abort.map(a =>
      `<tr class="abort${a.tripped ? " tripped" : ""}" data-failure="${esc(a.failure_type)}"><td>${esc(a.failure_type)} ≥ ${a.threshold_pct}% (${esc(a.scope)}, min ${a.min_executed}) → ${esc(a.action)}</td>` +
      `<td>${a.bad}/${a.executed} = ${a.pct}%${a.armed ? "" : " (not armed)"}</td>` +
      `<td><span class="meter"><i style="width:${(100 * a.closeness).toFixed(1)}%"></i></span></td></tr>`).join("") + `</table>`
    : `<p class="muted">${r.spec ? "No abort criteria." : "Reading the spec…"}</p>`;
  box.querySelector(".ro-events").innerHTML = (r.events || []).slice(-12).reverse().map(e =>
    `<li>${esc(e.event)} ${esc(Object.entries(e).filter(([k]) => !["event", "rollout", "at"].includes(k)).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" "))}</li>`).join("");
  if (!window.Plotly) return;
  const hist = r.history || [];
  const t = hist.map(p => new Date(p[0] * 1000));
  const shown = EXEC_STATES.filter(s => hist.some(p => p[1][s]));
  const traces = shown.map(s => ({x: t, y: hist.map(p => p[1][s] || 0), name: s, mode: "lines", stackgroup: "one",
                                  line: {color: EXEC_COLORS[s]}}));
  Plotly.react(`ro-plot-${cssId(name)}`, traces, {margin: {l: 40, r: 10, t: 10, b: 30}, showlegend: true,
               yaxis: {title: {text: "hosts"}}, legend: {font: {size: 10}}}, {displayModeBar: false, responsive: true});
}

function renderRollouts() {
  for (const name of dirty.rollouts) renderRollout(name);
  const any = Object.keys(view.rollouts).length > 0;
  $("rollouts-empty").classList.toggle("hidden", any);
  $("rollout-new").classList.toggle("hidden", !view.operator);
}

async function control(verb, body) {
  const out = $("control-result");
  out.textContent = `${verb}…`;
  try {
    const resp = await fetch(`/api/control/${verb}`, {method: "POST", headers: {"content-type": "application/json", "x-livepatchd-control": "1"},
                                                       body: JSON.stringify(body)});
    const reply = await resp.json();
    out.textContent = reply.ok ? `${verb}: ok` : `${verb}: ${reply.error.code}: ${reply.error.message}`;
    out.dataset.ok = String(reply.ok);
    return reply;
  } catch (e) {
    out.textContent = `${verb}: ${e}`;
    out.dataset.ok = "false";
    return {ok: false};
  }
}

// -- stalls -----------------------------------------------------------------------------------------------------

function predictions() {
  // the orchestrator's patch.check predictions (stall.predict), by host
  const out = {};
  for (const r of Object.values(view.rollouts)) for (const s of r.stalled || []) out[s.host] = {...s, rollout: r.doc.name};
  return out;
}

function blockersHtml(list) {
  return (list || []).map(b => `<div class="task"><b>${esc(b.comm)}</b> pid ${esc(b.pid)}${b.cpu == null ? "" : ` cpu ${esc(b.cpu)}`}: ${esc(b.why || b.reason || "")}` +
    `${b.function ? ` in ${esc(b.function)}` : ""}${b.outcome ? ` (${esc(b.outcome)})` : ""}` +
    `${(b.stack || []).length ? `<pre class="stack">${b.stack.map(esc).join("\n")}</pre>` : ""}</div>`).join("");
}

function transitionHtml(data) {
  const tasks = (data.tasks || []).filter(t => t.pending || t.blocked);
  return `<div class="muted">patch.transition: ${esc(data.progress ? `${data.progress.tasks_switched}/${data.progress.tasks_total} switched, ${data.progress.attempts} attempts, ${data.progress.signals_sent} signal rounds` : "no transition")}</div>` +
    tasks.map(t => `<div class="task"><b>${esc(t.comm)}</b> pid ${esc(t.pid)} cpu ${esc(t.cpu)} ${esc(t.patch_state)}${t.pending ? " pending" : ""}: ${esc(t.blocked || "")}</div>`).join("");
}

function renderStalls() {
  const rows = [], preds = predictions();
  for (const [name, h] of Object.entries(view.hosts).sort()) {
    const tr = components(h).livepatch?.transition;
    const pred = preds[name], check = view.checks[name];
    // live from the retained state's transition, or from the stall event (events come at QoS 1; a state update
    // can be missed on a busy broker, the event that says the transition stalled is not)
    const live = (tr && (tr.stalled || (tr.blocked || []).length)) || (h.stall && h.stall.over === null);
    if (!live && !pred && !(h.stall && h.stall.over === null) && !check) continue;
    let actual = live ? (h.stall && !h.stall.over ? blockersHtml(h.stall.blocked) : esc(`pids ${(tr.blocked || []).join(", ")}`))
                      : (h.stall ? `<span class="muted">was: ${blockersHtml(h.stall.blocked)} (${esc(h.stall.over || "")})</span>` : "—");
    let predicted = "—";
    if (pred && pred.prediction) predicted = `${pred.prediction.would_stall ? "<b>would stall</b>" : "clear"} ` + blockersHtml(pred.prediction.tasks) +
      `<div class="muted">(orchestrator, ${esc(pred.rollout)}: ${esc(pred.state)})</div>`;
    if (check && check.verb === "transition" && check.data) actual += transitionHtml(check.data);
    else if (check && check.data) predicted = `${check.data.will_stall ? "<b>will stall</b>" : check.data.would_block ? "would block" : "clear"}` + blockersHtml(check.data.blockers);
    else if (check) predicted = esc(check.error || "asking…");
    const patch = tr ? tr.patch : (pred && view.rollouts[pred.rollout]?.spec?.patch) || "";
    const btn = !view.operator ? "" : live
      ? `<button type="button" class="check" data-check="${esc(name)}" data-verb="transition">patch.transition</button>`
      : patch ? `<button type="button" class="check" data-check="${esc(name)}" data-verb="check" data-patch="${esc(patch)}">patch.check</button>` : "";
    rows.push(`<tr class="stall" data-host="${esc(name)}" data-live="${live ? 1 : 0}"><td>${esc(name)}</td>` +
              `<td>${tr ? `${esc(tr.patch)} → ${esc(tr.target)} ${tr.stalled ? "<b>stalled</b>" : "waiting"}` : esc(pred ? `${pred.rollout}: ${pred.state}` : "")}</td>` +
              `<td class="actual">${actual}</td><td class="predicted">${predicted}</td><td>${btn}</td></tr>`);
  }
  $("stalls").innerHTML = rows.length
    ? `<table><tr><th>host</th><th>transition</th><th>actual: blocking tasks</th><th>predicted (patch.check)</th><th></th></tr>${rows.join("")}</table>`
    : `<p class="muted">No transition is stalled.</p>`;
}

// -- host -------------------------------------------------------------------------------------------------------

function renderHost() {
  const name = view.selected, h = name && view.hosts[name];
  $("host-view").classList.toggle("hidden", !h);
  if (!h) return;
  const c = components(h), lp = c.livepatch || {}, ft = c.ftrace || {}, k = (h.state && h.state.kernel) || {};
  const effect = (c.patch_effect && c.patch_effect.patches) || {};
  $("host-name").textContent = name;
  const patches = (lp.patches || []).map(p => `<tr data-patch="${esc(p.name)}"><td>${esc(p.stack_order)}</td><td>${esc(p.name)}</td><td>${p.enabled ? "enabled" : "disabled"}</td>` +
    `<td>${[p.transition && "in transition", p.replace && "replace", p.forced && "forced", p.replaced && "replaced"].filter(Boolean).join(", ")}</td><td>${(p.funcs || []).map(esc).join(", ")}</td>` +
    `<td class="effect">${effect[p.name] ? `${esc(effect[p.name].calls)} calls · original ${esc(effect[p.name].old_calls ?? "—")} · ${effect[p.name].verified ? "<b>verified</b>" : "not verified"}` : "—"}</td></tr>`).join("");
  const ops = (ft.ops || []).map(o => `<tr><td>${esc(o.name)}</td><td>${esc(o.callback)}</td><td>${esc(o.filter)}</td><td>${o.functions}</td></tr>`).join("");
  const hijacks = (ft.hijacks || []).map(j => `<tr><td>${esc(j.name)}</td><td>${esc(j.mode)}</td><td>${esc(j.function)} → ${esc(j.target)}</td></tr>`).join("");
  const execs = Object.values(view.rollouts).map(r => [r.doc.name, r]).filter(([, r]) => r.executions && r.executions[name]);
  const rolloutRows = Object.values(view.rollouts).flatMap(r => (r.stalled || []).filter(s => s.host === name).map(s => `${r.doc.name}: ${s.state}`));
  const evs = view.events.filter(e => e.host === name).slice(-20).reverse()
    .map(e => `<li>${esc(e.seq)} ${esc(e.type)} ${esc(JSON.stringify(e.data))}</li>`).join("");
  const tr = lp.transition;
  const tasks = tr && h.stall && !h.stall.over ? blockersHtml(h.stall.blocked) : tr ? esc(`blocked pids: ${(tr.blocked || []).join(", ") || "none"}`) : "";
  $("host-body").innerHTML = `
    <table>
      <tr><th>status</th><td data-field="status">${esc(hostState(h))} (boot ${esc(h.status?.boot_seq)})</td></tr>
      <tr><th>kernel</th><td>${esc(build(h))} · build id ${esc(k.build_id)} · ${esc(k.nr_cpus)} CPUs</td></tr>
      <tr><th>labels</th><td>${esc(Object.entries(labels(h)).map(([a, b]) => `${a}=${b}`).join(" "))}</td></tr>
      <tr><th>faults</th><td>${esc(JSON.stringify(faults(h)))}</td></tr>
      <tr><th>transition</th><td data-field="transition">${tr ? `${esc(tr.patch)} → ${esc(tr.target)}${tr.stalled ? " <b>stalled</b>" : ""}${tasks}` : "none"}</td></tr>
      <tr><th>ftrace</th><td>${esc(ft.enabled_functions)} enabled functions of ${esc(ft.records)} records · ${esc(ft.ops_registered)} ops · ftrace_enabled ${esc(ft.ftrace_enabled)}</td></tr>
      <tr><th>trusted keys</th><td>${esc(lp.trusted_keys)}</td></tr>
      ${rolloutRows.length || execs.length ? `<tr><th>rollouts</th><td>${esc(rolloutRows.join("; "))}</td></tr>` : ""}
    </table>
    <h3>Patches (sysfs: /sys/kernel/livepatch) and proof of effect</h3><table id="host-patches"><tr><th>#</th><th>name</th><th>state</th><th></th><th>functions</th><th>effect (patch.effect)</th></tr>${patches}</table>
    <h3>ftrace ops</h3><table><tr><th>name</th><th>callback</th><th>filter</th><th>functions</th></tr>${ops}</table>
    <h3>Hijacks</h3><table><tr><th>name</th><th>mode</th><th>redirect</th></tr>${hijacks}</table>
    <h3>Recent events</h3><ol class="events">${evs}</ol>`;
}

const COST_KIND = {ops: "ftrace ops", patch: "live patch", hijack: "hijack"};

function renderCosts(name, h) {
  const t = h.costs;
  if (!t) { $("host-costs").innerHTML = `<p class="muted">No ftrace section in this host's state.</p>`; return; }
  $("cost-note").textContent = `(${t.ops_registered} ops registered, ${t.enabled_functions} call sites enabled` +
    `${t.shared_sites ? ", some sites shared by several ops: those go through ftrace_list_ops" : ", no site shared by these: each calls its ops directly (CALL_OPS)"}` +
    `${t.other_ops ? `; ${t.other_ops} more ops (tracer, profiler) registered: a site they share goes through ftrace_list_ops` : ""})`;
  $("host-costs").innerHTML = t.rows.length ? `<table id="cost-table"><tr><th>what</th><th>name</th><th>callback</th><th>functions</th>` +
    `<th>alone on a site (CALL_OPS)</th><th>on a shared site (ftrace_list_ops)</th></tr>` + t.rows.map(r =>
      `<tr class="cost" data-name="${esc(r.name)}"><td>${esc(COST_KIND[r.kind] || r.kind)}</td><td>${esc(r.name)}</td><td>${esc(r.via)}</td><td>${esc(r.functions)}</td>` +
      `<td data-field="direct">${r.direct == null ? "—" : `${r.direct} insn`}${r.note ? ` <span class="muted">(${esc(r.note)})</span>` : ""}</td>` +
      `<td>${r.shared == null ? "—" : `${r.shared} insn`}</td></tr>`).join("") + `</table>` +
    `<p class="muted">Model: CALL_OPS ${t.model.direct} + callback; list ${t.model.list} + ${t.model.list_per_ops_on_site} + callback per ops on the site + ${t.model.list_per_other_ops} per other registered ops (callbacks: ${Object.entries(t.model.callbacks).map(([k, v]) => `${k} ${v}`).join(", ")}).</p>`
    : `<p class="muted">Nothing traced on this host: every call site is a NOP (0 instructions added).</p>`;
  if (!window.Plotly) return;
  const key = name + JSON.stringify(t.rows);
  if (key === costPlotted) return;
  costPlotted = key;
  const names = t.rows.map(r => `${r.name}`);
  Plotly.react("cost-plot", [
    {type: "bar", name: "alone on its site (CALL_OPS)", x: names, y: t.rows.map(r => r.direct), marker: {color: "#1e8e3e"}},
    {type: "bar", name: "on a shared site (ftrace_list_ops)", x: names, y: t.rows.map(r => r.shared), marker: {color: "#e8710a"}},
  ], {barmode: "group", margin: {l: 50, r: 10, t: 10, b: 40}, yaxis: {title: {text: "guest insn / call"}}, legend: {font: {size: 10}, orientation: "h"}},
  {displayModeBar: false, responsive: true});
}

function renderTrace(name) {
  const t = view.traces[name];
  const info = t ? `session ${t.session.session ?? "?"} · batch ${t.session.seq ?? "?"} · ${t.session.dropped ?? 0} dropped in the guest rings` +
    `${t.lost_batches ? ` · ${t.lost_batches} batches missed` : ""} · last ${t.lines.length} lines` : "no trace stream from this host (lpctl trace start)";
  $("trace-info").textContent = view.tracePaused ? `paused — ${info}` : info;
  $("trace-pause").textContent = view.tracePaused ? "resume" : "pause";
  if (!view.tracePaused) {
    const pre = $("trace-tail");
    pre.textContent = t ? t.lines.join("\n") : "";
    pre.scrollTop = pre.scrollHeight;
  }
  const lat = t ? t.latency : [];
  $("latency-empty").classList.toggle("hidden", lat.length > 0);
  $("latency-plot").classList.toggle("hidden", lat.length === 0);
  if (!window.Plotly || !lat.length || view.tracePaused) return;
  const now = Date.now();
  if (now - lastLatencyPlot < 1000 && !dirty.hosts.has(name)) return;
  lastLatencyPlot = now;
  const byFn = new Map();
  for (const [time, fn, ns] of lat) { if (!byFn.has(fn)) byFn.set(fn, {x: [], y: []}); byFn.get(fn).x.push(time); byFn.get(fn).y.push(ns / 1000); }
  const top = [...byFn.entries()].sort((a, b) => b[1].x.length - a[1].x.length).slice(0, 8);
  Plotly.react("latency-plot", top.map(([fn, d]) => ({type: "scatter", mode: "markers", name: fn, x: d.x, y: d.y, marker: {size: 4}})),
    {margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: "guest time (s)"}}, yaxis: {title: {text: "µs per call"}, type: "log"}, legend: {font: {size: 10}}},
    {displayModeBar: false, responsive: true});
}

// -- rehearsal --------------------------------------------------------------------------------------------------

function stateAt(host, t) {
  let st = host.history.length ? "QUEUED" : host.state;
  for (const [at, s] of host.history) { if (at > t) break; st = s; }
  return st;
}

function renderRehearsal() {
  const r = view.rehearsal;
  $("rehearsal-view").classList.toggle("hidden", !r);
  if (!r) return;
  const reh = r.rehearsal || {};
  $("rehearsal-title").textContent = `${r.rollout} · patch ${r.patch} · seed ${reh.seed ?? "?"}`;
  const faulted = Object.entries(reh.faulted || {}).map(([k, n]) => `${k} on ${n} host(s)`).join(", ") || "no faults";
  $("rehearsal-summary").innerHTML = `<p><b data-field="rehearsal-state">${esc(r.state)}</b> after ${esc(r.duration_s.toFixed(1))} s on the simulated clock` +
    `${r.reason ? ` — ${esc(r.reason)}` : ""} · ${esc(faulted)} · ${esc(reh.host_calls ?? 0)} host calls simulated</p>` +
    `<div class="ro-counts">${bar(r.counts, r.hosts.length)} ${EXEC_STATES.filter(s => r.counts[s]).map(s =>
      `<span data-rehearsal-count="${s}"><i class="swatch" style="background:${EXEC_COLORS[s]}"></i>${s} ${r.counts[s]}</span>`).join(" ")}</div>` +
    `${r.abort ? `<p class="reason">aborted at ${esc(r.abort.t.toFixed(1))} s: ${esc(JSON.stringify(Object.fromEntries(Object.entries(r.abort).filter(([k]) => !["t", "event"].includes(k)))))}</p>` : ""}`;
  $("rehearsal-waves").innerHTML = `<table><tr><th>wave</th><th>hosts</th><th>state</th><th>success</th><th>started</th><th>done</th><th>states</th></tr>` +
    r.waves.map(w => `<tr class="rehearsal-wave" data-wave="${w.index}"><td>${w.index}</td><td>${w.hosts}</td><td>${esc(w.state)}</td>` +
      `<td>${w.success_pct == null ? "—" : `${w.success_pct.toFixed(1)}%`}</td><td>${w.started_s == null ? "—" : `${w.started_s.toFixed(1)} s`}</td>` +
      `<td>${w.done_s == null ? "—" : `${w.done_s.toFixed(1)} s`}</td><td>${bar(w.counts, w.hosts)}</td></tr>`).join("") + `</table>`;
  $("rehearsal-timeline").innerHTML = r.events.map(e => `<li class="rehearsal-event">${esc(e.t.toFixed(1))} s: ${esc(e.event)} ` +
    esc(Object.entries(e).filter(([k]) => !["t", "event"].includes(k)).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ")) + `</li>`).join("");
  if (!window.Plotly) return;
  const end = Math.max(r.duration_s, 1);
  const times = [...new Set([0, end, ...r.hosts.flatMap(h => h.history.map(p => p[0]))])].sort((a, b) => a - b);
  const series = Object.fromEntries(EXEC_STATES.map(s => [s, []]));
  for (const t of times) {
    const c = {};
    for (const h of r.hosts) { const s = stateAt(h, t); c[s] = (c[s] || 0) + 1; }
    for (const s of EXEC_STATES) series[s].push(c[s] || 0);
  }
  const shown = EXEC_STATES.filter(s => series[s].some(n => n > 0));
  const shapes = r.waves.filter(w => w.started_s != null).map(w => ({type: "line", x0: w.started_s, x1: w.started_s, yref: "paper", y0: 0, y1: 1,
                                                                     line: {color: "#445", width: 1, dash: "dot"}}));
  const annotations = r.waves.filter(w => w.started_s != null).map(w => ({x: w.started_s, yref: "paper", y: 1, text: `wave ${w.index}`,
                                                                         showarrow: false, xanchor: "left", font: {size: 10}}));
  Plotly.react("rehearsal-plot", shown.map(s => ({x: times, y: series[s], name: s, mode: "lines", stackgroup: "one", line: {color: EXEC_COLORS[s], shape: "hv"}})),
    {margin: {l: 40, r: 10, t: 16, b: 36}, xaxis: {title: {text: "seconds since the rollout was created (simulated clock)"}}, yaxis: {title: {text: "hosts"}},
     shapes, annotations, legend: {font: {size: 10}}}, {displayModeBar: false, responsive: true});
}

function renderEvents() {
  $("events").innerHTML = view.events.slice(-100).reverse()
    .map(e => `<li>${esc(e.host)} ${esc(e.type)} ${esc(JSON.stringify(e.data))}</li>`).join("");
}

function renderPlot(counts) {
  if (!window.Plotly) return;
  const now = Date.now();
  if (now - lastPlot < 1000) return;  // the fleet plot moves once a second at most
  lastPlot = now;
  const hist = view.history;
  hist.t.push(new Date());
  for (const s of STATES) hist.counts[s].push(counts[s]);
  if (hist.t.length > 600) { hist.t.shift(); for (const s of STATES) hist.counts[s].shift(); }
  const traces = STATES.map(s => ({x: hist.t, y: hist.counts[s], name: s, mode: "lines", stackgroup: "one", line: {color: COLORS[s]}}));
  Plotly.react("progress-plot", traces, {margin: {l: 40, r: 10, t: 10, b: 30}, showlegend: true, yaxis: {title: {text: "hosts"}}},
               {displayModeBar: false, responsive: true});
}

function render() {
  if (!dirty.any) return;
  dirty.any = false;
  renderBanner();
  const counts = renderFleet();
  renderRollouts();
  renderStalls();
  renderHost();
  if (view.selected && view.hosts[view.selected]) {
    if (dirty.hosts.has(view.selected) || dirty.selection) renderCosts(view.selected, view.hosts[view.selected]);
    if (dirty.traces.has(view.selected) || dirty.selection) renderTrace(view.selected);
  }
  if (dirty.rehearsal) renderRehearsal();
  renderEvents();
  renderPlot(counts);
  dirty.hosts.clear(); dirty.rollouts.clear(); dirty.traces.clear(); dirty.structure = false; dirty.selection = false;
  dirty.rehearsal = false;
  document.body.dataset.cursor = String(view.cursor ?? "");
  document.body.dataset.rendered = String(performance.now());
}

function plotlyReady() {  // eslint-disable-line no-unused-vars  (the script tag's onload)
  for (const name of Object.keys(view.rollouts)) dirty.rollouts.add(name);
  dirty.selection = true; dirty.rehearsal = true; costPlotted = "";
  dirty.any = true;
  render();
}

function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("snapshot", ev => { apply(JSON.parse(ev.data), true); view.streamUp = true; render(); });
  es.addEventListener("delta", ev => apply(JSON.parse(ev.data), false));
  es.onerror = () => { view.streamUp = false; dirty.any = true; };  // EventSource reconnects by itself
}

document.addEventListener("click", async ev => {
  const ctl = ev.target.closest("[data-control]");
  if (ctl) {
    const body = {name: ctl.dataset.rollout};
    if (ctl.dataset.wave) body.wave = Number(ctl.dataset.wave);
    await control(ctl.dataset.control, body);
    return;
  }
  const chk = ev.target.closest("[data-check]");
  if (chk) {
    const host = chk.dataset.check, verb = chk.dataset.verb;
    view.checks[host] = {verb};
    dirty.any = true;
    const reply = await control(verb, {host, patch: chk.dataset.patch});
    view.checks[host] = reply.ok ? {verb, data: reply.data} : {verb, error: reply.error ? `${reply.error.code}: ${reply.error.message}` : "failed"};
    dirty.any = true;
    return;
  }
  const t = ev.target.closest("[data-host]");
  if (t && !ev.target.closest("button")) { view.selected = t.dataset.host; dirty.selection = true; dirty.any = true; }
});
for (const [id, verb] of [["spec-dry-run", "dry_run"], ["spec-create", "create"], ["spec-create-start", "create"],
                          ["spec-rehearse", "rehearse"]]) {
  $(id).addEventListener("click", async () => {
    let spec, body;
    try { spec = JSON.parse($("spec").value); } catch (e) { $("control-result").textContent = `the spec is not JSON: ${e.message}`; return; }
    body = {spec};
    if (verb === "rehearse") {
      try { body.faults = JSON.parse($("rehearse-faults").value || "[]"); } catch (e) { $("control-result").textContent = `the faults are not JSON: ${e.message}`; return; }
      body.seed = Number($("rehearse-seed").value || 0);
    }
    const reply = await control(verb, body);
    if (verb === "rehearse" && reply.ok) { view.rehearsal = reply.data.report; dirty.rehearsal = true; dirty.any = true; }
    if (verb === "dry_run" && reply.ok) {
      const d = reply.data;
      $("control-result").textContent = `dry run: waves ${d.waves.map(w => w.length).join(" + ")} hosts; removed ${Object.keys(d.removed).length}; ` +
        `offline ${d.offline.length}; in a transition ${d.in_transition.length}; projected ${d.projected_s.toFixed(1)} s`;
    }
    if (id === "spec-create-start" && reply.ok) await control("start", {name: spec.name});
  });
}
$("host-close").addEventListener("click", () => { view.selected = null; dirty.any = true; });
$("trace-pause").addEventListener("click", () => { view.tracePaused = !view.tracePaused; dirty.selection = true; dirty.any = true; });
$("rehearsal-close").addEventListener("click", () => { view.rehearsal = null; dirty.rehearsal = true; dirty.any = true; });
$("filter").addEventListener("input", () => { dirty.structure = true; dirty.any = true; });
$("group").addEventListener("change", () => { dirty.structure = true; dirty.any = true; });
connect();
// Render at most every 250 ms: a burst of changes costs one paint.
setInterval(render, 250);
setInterval(() => { dirty.any = true; }, 2000);  // keep the time plot moving while the fleet is quiet
