"""The rollout report: one JSON document (deterministic: times relative to the rollout's creation, keys sorted,
no wall clock, no ids), a Markdown rendering, and a timeline plot of host states per wave."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from clients.rollout.store import Store
from schemas.rollout import NOT_EXECUTED_STATES, SUCCESS, RolloutSpec

FORMAT = "livepatchd-rollout-report/1"


def _t(at: float, t0: float) -> float:
    return round(at - t0, 6)


def build(store: Store, name: str) -> dict[str, Any]:
    r = store.rollout(name)
    if r is None:
        raise KeyError(name)
    spec = RolloutSpec.model_validate_json(r.spec)
    execs = store.executions(name)
    t0 = r.created_at
    history: dict[str, list[list[Any]]] = {}
    last = t0
    for host, _version, _owner, state, at in _steps(store, name):
        history.setdefault(host, []).append([_t(at, t0), state])
        last = max(last, at)
    events = [{**{k: v for k, v in ev.items() if k != "at"}, "t": _t(ev["at"], t0)} for ev in r.plan.get("events", [])]
    waves = []
    for w in r.waves:
        mine = [e for e in execs if e.wave == w["index"]]
        counted = [e for e in mine if e.state.value not in NOT_EXECUTED_STATES]
        ok = sum(e.state in SUCCESS for e in counted)
        done = [ev["t"] for ev in events if ev["event"] == "wave_done" and ev.get("wave") == w["index"]]
        waves.append({"index": w["index"], "hosts": len(mine), "state": w["state"],
                      "counts": dict(sorted(Counter(e.state.value for e in mine).items())),
                      "success_pct": round(100.0 * ok / len(counted), 3) if counted else None,
                      "started_s": None if w["started_at"] is None else _t(w["started_at"], t0),
                      "done_s": done[-1] if done else None})
    hosts = []
    for e in execs:
        err = e.details.get("error") or e.details.get("undo_error") or {}
        hosts.append({"host": e.host, "wave": e.wave, "build_id": e.build_id, "state": e.state.value,
                      "attempts": e.attempts, "code": err.get("code") or e.details.get("code"),
                      "stalled": bool(e.details.get("stalled")), "history": history.get(e.host, [])})
    aborts = [ev for ev in events if ev["event"] == "abort"]
    return {
        "format": FORMAT, "rollout": name, "patch": spec.patch, "state": r.state, "reason": r.reason,
        "spec": json.loads(spec.model_dump_json()),
        "plan": {k: v for k, v in r.plan.items() if k not in ("events", "rate")},
        "duration_s": _t(last, t0),
        "counts": dict(sorted(Counter(e.state.value for e in execs).items())),
        "waves": waves, "events": events,
        "abort": aborts[0] if aborts else None,
        "hosts": hosts,
    }


def _steps(store: Store, name: str) -> list[tuple[str, int, str, str, float]]:
    with store.tx() as t:
        return [(row[0], int(row[1]), row[2], row[3], float(row[4])) for row in
                t.run("SELECT host, version, owner, state, at FROM steps WHERE rollout = ? ORDER BY at, host, "
                      "version", (name,))]


def dumps(report: dict[str, Any]) -> str:
    """The canonical text: the same report gives the same bytes."""
    return json.dumps(report, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Rollout `{report['rollout']}` — patch `{report['patch']}`", "",
             f"**{report['state']}** after {report['duration_s']:.1f} s"
             + (f" — {report['reason']}" if report.get("reason") else ""), ""]
    if report.get("rehearsal"):
        reh = report["rehearsal"]
        lines += [f"Rehearsal on a simulated twin, seed {reh['seed']}: "
                  + (", ".join(f"{k} on {n} host(s)" for k, n in sorted(reh["faulted"].items())) or "no faults"),
                  ""]
    lines += ["| state | hosts |", "|---|---:|"]
    lines += [f"| {s} | {n} |" for s, n in report["counts"].items()]
    lines += ["", "| wave | hosts | success | started (s) | done (s) | states |", "|---:|---:|---:|---:|---:|---|"]
    for w in report["waves"]:
        pct = "—" if w["success_pct"] is None else f"{w['success_pct']:.1f}%"
        lines.append(f"| {w['index']} | {w['hosts']} | {pct} | {_num(w['started_s'])} | {_num(w['done_s'])} | "
                     + ", ".join(f"{k} {v}" for k, v in w["counts"].items()) + " |")
    lines += ["", "## Timeline", ""]
    lines += [f"- {ev['t']:.1f} s: {ev['event']}" + "".join(f", {k}={v}" for k, v in sorted(ev.items())
                                                              if k not in ("t", "event")) for ev in report["events"]]
    bad = [h for h in report["hosts"] if h["state"] not in ("SUCCEEDED", "VERIFIED")]
    if bad:
        lines += ["", "## Hosts not succeeded", "", "| host | wave | state | attempts | code |",
                  "|---|---:|---|---:|---|"]
        lines += [f"| {h['host']} | {h['wave']} | {h['state']} | {h['attempts']} | {h['code'] or ''} |"
                  for h in bad[:200]]
        if len(bad) > 200:
            lines.append(f"| … {len(bad) - 200} more | | | | |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Hosts per state over time, one panel per wave (matplotlib, no display needed)."""
    import matplotlib  # noqa: PLC0415  (only for the picture)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    waves = report["waves"] or [{"index": 0}]
    end = max(report["duration_s"], 1.0)
    fig, axes = plt.subplots(len(waves), 1, figsize=(9, 1.8 + 1.6 * len(waves)), squeeze=False, sharex=True)
    states = ["QUEUED", "IN_PROGRESS", "TRANSITIONING", "STALLED", "SUCCEEDED", "VERIFIED", "FAILED", "TIMED_OUT",
              "REJECTED", "REVERTED", "CANCELED", "REMOVED"]
    for ax, w in zip(axes[:, 0], waves, strict=True):
        mine = [h for h in report["hosts"] if h["wave"] == w["index"]]
        times = sorted({0.0, end, *(t for h in mine for t, _ in h["history"])})
        series: dict[str, list[int]] = {s: [] for s in states}
        for t in times:
            now = Counter(_state_at(h, t) for h in mine)
            for s in states:
                series[s].append(now.get(s, 0))
        shown = [s for s in states if any(series[s])]
        ax.stackplot(times, *[series[s] for s in shown], labels=shown, step="post")
        ax.set_ylabel(f"wave {w['index']}")
        ax.set_ylim(0, max(1, len(mine)))
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("seconds since the rollout was created")
    fig.suptitle(f"rollout {report['rollout']}: hosts by state")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def _state_at(host: dict[str, Any], t: float) -> str:
    state = "QUEUED" if host["history"] else host["state"]
    for at, s in host["history"]:
        if at > t:
            break
        state = s
    return str(state)
