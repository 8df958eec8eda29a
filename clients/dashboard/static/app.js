// The fleet page: a snapshot, then batched deltas over Server-Sent Events; every view is rendered from the
// hosts' retained status/state documents and their events, nothing else.
"use strict";

const STATES = ["offline", "online", "patched", "transitioning", "stalled", "failed"];
const COLORS = {offline: "#9aa0a6", online: "#8ab4f8", patched: "#1e8e3e", transitioning: "#f9ab00",
                stalled: "#e8710a", failed: "#d93025"};
const view = {hosts: {}, events: [], broker: {connected: false, url: ""}, streamUp: false,
              selected: null, history: {t: [], counts: Object.fromEntries(STATES.map(s => [s, []]))}};
let dirty = true;

const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function components(h) { return (h.state && h.state.components) || {}; }
function labels(h) { const s = h.state || {}; return s.labels || (s.kernel && s.kernel.labels) || components(h).fleet?.labels || {}; }
function build(h) { const k = (h.state && h.state.kernel) || {}; return k.build || k.version || k.build_id || "?"; }
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

function apply(batch) {
  view.broker = batch.broker;
  for (const [name, h] of Object.entries(batch.hosts)) view.hosts[name] = h;
  view.events = view.events.concat(batch.events).slice(-300);
  dirty = true;
}

function renderBanner() {
  const b = $("banner");
  let text = "";
  if (!view.streamUp) text = "Disconnected from the dashboard server: reconnecting…";
  else if (!view.broker.connected) text = `Disconnected from the broker ${view.broker.url}: reconnecting…`;
  b.textContent = text;
  b.classList.toggle("hidden", !text);
  $("broker").textContent = view.broker.url;
}

function renderFleet() {
  const filter = $("filter").value.trim(), groupBy = $("group").value;
  const counts = Object.fromEntries(STATES.map(s => [s, 0]));
  const groups = new Map();
  const labelKeys = new Set();
  for (const [name, h] of Object.entries(view.hosts).sort()) {
    Object.keys(labels(h)).forEach(k => labelKeys.add(k));
    if (!matches(name, h, filter)) continue;
    const st = hostState(h);
    counts[st] += 1;
    const g = groupBy === "build" ? build(h) : groupBy ? String(labels(h)[groupBy] ?? "(none)") : "";
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(`<span class="cell st-${st}${faults(h).length ? " fault" : ""}" data-host="${esc(name)}" data-state="${st}" title="${esc(name)}: ${st}"></span>`);
  }
  const sel = $("group");
  for (const k of labelKeys) if (![...sel.options].some(o => o.value === k)) sel.add(new Option(`label ${k}`, k));
  $("counts").innerHTML = STATES.map(s => `<span data-count="${s}"><i class="swatch st-${s}"></i>${s} ${counts[s]}</span>`).join("");
  $("groups").innerHTML = [...groups.entries()].sort().map(([g, cells]) =>
    `<div class="group">${g ? `<h3>${esc(g)} (${cells.length})</h3>` : ""}<div class="cells">${cells.join("")}</div></div>`).join("");
  return counts;
}

function renderStalls() {
  const rows = [];
  for (const [name, h] of Object.entries(view.hosts).sort()) {
    const tr = components(h).livepatch?.transition;
    if (!tr || !(tr.stalled || (tr.blocked || []).length)) continue;
    rows.push(`<tr class="stall" data-host="${esc(name)}"><td>${esc(name)}</td><td>${esc(tr.patch)} → ${esc(tr.target)}</td>` +
              `<td>${tr.stalled ? "stalled" : "waiting"}</td><td>${(tr.blocked || []).map(esc).join(", ")}</td></tr>`);
  }
  $("stalls").innerHTML = rows.length
    ? `<table><tr><th>host</th><th>transition</th><th></th><th>blocking tasks</th></tr>${rows.join("")}</table>`
    : `<p class="muted">No transition is stalled.</p>`;
}

function renderHost() {
  const name = view.selected, h = name && view.hosts[name];
  $("host-view").classList.toggle("hidden", !h);
  if (!h) return;
  const c = components(h), lp = c.livepatch || {}, ft = c.ftrace || {}, k = (h.state && h.state.kernel) || {};
  $("host-name").textContent = name;
  const patches = (lp.patches || []).map(p => `<tr><td>${esc(p.name)}</td><td>${p.enabled ? "enabled" : "disabled"}</td>` +
    `<td>${p.transition ? "in transition" : ""}</td><td>${(p.funcs || []).map(esc).join(", ")}</td></tr>`).join("");
  const ops = (ft.ops || []).map(o => `<tr><td>${esc(o.name)}</td><td>${esc(o.callback)}</td><td>${esc(o.filter)}</td><td>${o.functions}</td></tr>`).join("");
  const hijacks = (ft.hijacks || []).map(j => `<tr><td>${esc(j.name)}</td><td>${esc(j.mode)}</td><td>${esc(j.function)} → ${esc(j.target)}</td></tr>`).join("");
  const evs = view.events.filter(e => e.host === name).slice(-20).reverse()
    .map(e => `<li>${esc(e.seq)} ${esc(e.type)} ${esc(JSON.stringify(e.data))}</li>`).join("");
  $("host-body").innerHTML = `
    <table>
      <tr><th>status</th><td data-field="status">${esc(hostState(h))} (boot ${esc(h.status?.boot_seq)})</td></tr>
      <tr><th>kernel</th><td>${esc(build(h))} · build id ${esc(k.build_id)} · ${esc(k.nr_cpus)} CPUs</td></tr>
      <tr><th>labels</th><td>${esc(Object.entries(labels(h)).map(([a, b]) => `${a}=${b}`).join(" "))}</td></tr>
      <tr><th>faults</th><td>${esc(JSON.stringify(faults(h)))}</td></tr>
      <tr><th>transition</th><td>${lp.transition ? esc(`${lp.transition.patch} → ${lp.transition.target}; blocked: ${(lp.transition.blocked || []).join(", ") || "none"}`) : "none"}</td></tr>
      <tr><th>ftrace</th><td>${esc(ft.enabled_functions)} enabled functions of ${esc(ft.records)} records · ${esc(ft.ops_registered)} ops · ftrace_enabled ${esc(ft.ftrace_enabled)}</td></tr>
    </table>
    <h3>Patches</h3><table id="host-patches"><tr><th>name</th><th>state</th><th></th><th>functions</th></tr>${patches}</table>
    <h3>ftrace ops</h3><table><tr><th>name</th><th>callback</th><th>filter</th><th>functions</th></tr>${ops}</table>
    <h3>Hijacks</h3><table><tr><th>name</th><th>mode</th><th>redirect</th></tr>${hijacks}</table>
    <h3>Recent events</h3><ol class="events">${evs}</ol>`;
}

function renderEvents() {
  $("events").innerHTML = view.events.slice(-100).reverse()
    .map(e => `<li>${esc(e.host)} ${esc(e.type)} ${esc(JSON.stringify(e.data))}</li>`).join("");
}

function renderPlot(counts) {
  const hist = view.history;
  hist.t.push(new Date());
  for (const s of STATES) hist.counts[s].push(counts[s]);
  if (hist.t.length > 600) { hist.t.shift(); for (const s of STATES) hist.counts[s].shift(); }
  const traces = STATES.map(s => ({x: hist.t, y: hist.counts[s], name: s, mode: "lines", stackgroup: "one", line: {color: COLORS[s]}}));
  Plotly.react("progress-plot", traces, {margin: {l: 40, r: 10, t: 10, b: 30}, showlegend: true, yaxis: {title: "hosts"}},
               {displayModeBar: false, responsive: true});
}

function render() {
  if (!dirty) return;
  dirty = false;
  renderBanner();
  const counts = renderFleet();
  renderStalls();
  renderHost();
  renderEvents();
  renderPlot(counts);
  document.body.dataset.cursor = String(view.cursor ?? "");
}

function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("snapshot", ev => {
    const snap = JSON.parse(ev.data);
    view.hosts = {}; view.events = [];
    apply(snap); view.cursor = snap.cursor; view.streamUp = true;
  });
  es.addEventListener("delta", ev => { const d = JSON.parse(ev.data); apply(d); view.cursor = d.cursor; });
  es.onerror = () => { view.streamUp = false; dirty = true; };  // EventSource reconnects by itself
}

document.addEventListener("click", ev => {
  const t = ev.target.closest("[data-host]");
  if (t) { view.selected = t.dataset.host; dirty = true; }
});
$("host-close").addEventListener("click", () => { view.selected = null; dirty = true; });
$("filter").addEventListener("input", () => { dirty = true; });
$("group").addEventListener("change", () => { dirty = true; });
connect();
// Render at most every 250 ms: a burst of changes costs one paint.
setInterval(render, 250);
setInterval(() => { dirty = true; }, 2000);  // keep the time plot moving while the fleet is quiet
