"""What the Rollouts view shows, kept from the orchestrator's MQTT documents alone.

Each rollout's retained ``RolloutDoc`` (``livepatch/v1/_orchestrator/rollout/<name>``) gives its state, waves and
counts; every new version adds a point to its progress history (hosts per execution state over time). The
orchestrator's ``events`` stream gives each host's execution (state, wave, details: ``stalled``, the
``patch.check`` prediction) and the rollout-level events. What neither carries — the spec (wave thresholds,
approvals, abort criteria) and the history before the dashboard started — comes once per rollout from the
``rollout.report`` verb, which observers may call. From these the board works out where each wave stands against
its success threshold and how close each abort criterion is to tripping (the engine's own rule, see
``clients/rollout/engine.py``: failures of the criterion's type among the executed hosts once ``min_executed``
ran).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

TOPIC_PREFIX = "livepatch/v1/_orchestrator/"
ROLLOUT_PREFIX = f"{TOPIC_PREFIX}rollout/"
EVENTS_TOPIC = f"{TOPIC_PREFIX}events"
HISTORY_MAX = 2000
EVENTS_MAX = 200

SUCCESS = frozenset({"SUCCEEDED", "VERIFIED"})
FAILURES = frozenset({"FAILED", "TIMED_OUT", "REJECTED", "REVERTED"})
TERMINAL = frozenset({"SUCCEEDED", "VERIFIED", "FAILED", "TIMED_OUT", "REJECTED", "REVERTED", "CANCELED", "REMOVED"})
NOT_EXECUTED = frozenset({"REMOVED", "CANCELED"})
STATES = ("QUEUED", "IN_PROGRESS", "TRANSITIONING", "STALLED", "SUCCEEDED", "VERIFIED", "FAILED", "TIMED_OUT",
          "REJECTED", "REVERTED", "CANCELED", "REMOVED")


@dataclass
class Board:
    """One rollout as the page shows it."""

    doc: dict[str, Any]
    history: list[list[Any]] = field(default_factory=list)
    """``[t, {state: hosts}]`` points, t in Unix seconds on the orchestrator's clock."""
    spec: dict[str, Any] | None = None
    executions: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    seeded: bool = False

    def add_point(self, at: float, counts: dict[str, int]) -> None:
        if self.history and self.history[-1][1] == counts:
            return
        if self.history and at < self.history[-1][0]:
            at = self.history[-1][0]
        self.history.append([at, dict(counts)])
        del self.history[:-HISTORY_MAX]

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(str(e.get("state")) for e in self.executions.values()).items()))

    def view(self) -> dict[str, Any]:
        return {"doc": self.doc, "history": self.history, "spec": self.spec, "waves": self.waves(),
                "abort": self.abort(), "events": self.events[-50:], "stalled": self.stalled()}

    def waves(self) -> list[dict[str, Any]]:
        spec = self.spec or {}
        wspec = spec.get("waves") or {}
        threshold = float(wspec.get("success_threshold", 100.0)) if spec else None
        approval = set(wspec.get("approval") or [])
        out = []
        for w in self.doc.get("waves", []):
            counts: dict[str, int] = w.get("counts", {})
            counted = sum(n for s, n in counts.items() if s not in NOT_EXECUTED)
            ok = sum(n for s, n in counts.items() if s in SUCCESS)
            done = sum(n for s, n in counts.items() if s in TERMINAL)
            out.append({"index": w.get("index"), "hosts": w.get("hosts"), "state": w.get("state"), "counts": counts,
                        "success_pct": round(100.0 * ok / counted, 1) if counted else None,
                        "done_pct": round(100.0 * done / w["hosts"], 1) if w.get("hosts") else None,
                        "threshold_pct": threshold, "approval": w.get("index") in approval})
        return out

    def abort(self) -> list[dict[str, Any]]:
        """Each abort criterion: failures / executed now, as a share of its threshold (1.0 = trips)."""
        if not self.spec:
            return []
        current = self.doc.get("current_wave", 0)
        out = []
        for c in (self.spec.get("abort") or {}).get("criteria", []):
            ftype, scope = c.get("failure_type"), c.get("scope", "rollout")
            pool_src = [e for e in self.executions.values() if scope == "rollout" or e.get("wave") == current]
            executed = [e for e in pool_src if e.get("state") in TERMINAL and e.get("state") not in NOT_EXECUTED]
            if ftype == "STALLED":
                pool = executed + [e for e in pool_src if e.get("state") == "STALLED"]
                bad = sum(bool((e.get("details") or {}).get("stalled")) for e in pool)
            else:
                pool = executed
                kinds = FAILURES if ftype == "ALL" else {ftype}
                bad = sum(e.get("state") in kinds for e in pool)
            pct = 100.0 * bad / len(pool) if pool else 0.0
            threshold = float(c.get("threshold_pct", 100.0))
            min_executed = int(c.get("min_executed", 1))
            out.append({"failure_type": ftype, "scope": scope, "threshold_pct": threshold, "min_executed": min_executed,
                        "bad": bad, "executed": len(pool), "pct": round(pct, 1),
                        "closeness": round(min(pct / threshold, 1.0) if threshold else 0.0, 3),
                        "armed": len(pool) >= min_executed,
                        "tripped": len(pool) >= min_executed and pct + 1e-9 >= threshold,
                        "action": (self.spec.get("abort") or {}).get("action", "cancel")})
        return out

    def stalled(self) -> list[dict[str, Any]]:
        """Executions stalled now or stalled before (with the orchestrator's ``patch.check`` prediction)."""
        rows = []
        for host, e in sorted(self.executions.items()):
            d = e.get("details") or {}
            if e.get("state") == "STALLED" or d.get("stalled") or d.get("prediction"):
                rows.append({"host": host, "state": e.get("state"), "wave": e.get("wave"),
                             "stalled": bool(d.get("stalled")), "prediction": d.get("prediction"),
                             "signals_sent": d.get("signals_sent")})
        return rows


@dataclass
class RolloutBoards:
    """Every rollout the orchestrator publishes; ``changed`` names those changed since the page last asked."""

    boards: dict[str, Board] = field(default_factory=dict)
    orchestrator_events: list[dict[str, Any]] = field(default_factory=list)

    def ingest(self, topic: str, doc: dict[str, Any] | None) -> str | None:
        """One orchestrator message (None: a cleared retained document); the rollout it changed, if any."""
        if topic.startswith(ROLLOUT_PREFIX):
            name = topic[len(ROLLOUT_PREFIX):]
            if doc is None:
                return name if self.boards.pop(name, None) is not None else None
            return self._doc(name, doc)
        if topic == EVENTS_TOPIC and doc is not None:
            return self._event(doc)
        return None

    def _doc(self, name: str, doc: dict[str, Any]) -> str | None:
        if not isinstance(doc.get("counts"), dict) or not isinstance(doc.get("waves"), list):
            return None
        board = self.boards.get(name)
        if board is None:
            board = self.boards[name] = Board(doc)
        elif doc.get("version", 0) < board.doc.get("version", 0):
            return None
        board.doc = doc
        at = doc.get("updated_at")
        if not board.seeded or not board.executions:  # once seeded, the executions give finer points
            board.add_point(float(at) if isinstance(at, int | float) else 0.0, doc["counts"])
        return name

    def _event(self, doc: dict[str, Any]) -> str | None:
        kind = doc.get("kind")
        name = doc.get("rollout") if kind in ("execution", "event") else None
        if not isinstance(name, str):
            return None
        board = self.boards.get(name)
        if board is None:
            return None
        if kind == "execution" and isinstance(doc.get("host"), str):
            old = board.executions.get(doc["host"])
            if old is None or doc.get("version", 0) >= old.get("version", 0):
                board.executions[doc["host"]] = {k: doc.get(k) for k in ("state", "wave", "version", "details",
                                                                         "attempts", "updated_at")}
                if board.seeded:  # every host known: a point per execution change (the RolloutDoc changes
                    at = doc.get("updated_at")  # only with the rollout's own state)
                    board.add_point(float(at) if isinstance(at, int | float) else 0.0, board.counts())
        elif kind == "event":
            board.events.append({k: v for k, v in doc.items() if k not in ("kind", "worker")})
            del board.events[:-EVENTS_MAX]
        return name

    def seed(self, name: str, report: dict[str, Any]) -> bool:
        """The spec, every host's execution and the history so far, from the rollout's ``rollout.report``."""
        board = self.boards.get(name)
        if board is None:
            return False
        board.spec = report.get("spec") if isinstance(report.get("spec"), dict) else None
        t0 = float(board.doc.get("created_at", 0.0))
        hosts = [h for h in report.get("hosts", []) if isinstance(h, dict) and isinstance(h.get("host"), str)]
        for h in hosts:
            known = board.executions.get(h["host"])
            if known is None:
                board.executions[h["host"]] = {"state": h.get("state"), "wave": h.get("wave"), "version": 0,
                                               "details": {"stalled": bool(h.get("stalled"))},
                                               "attempts": h.get("attempts")}
        # the history before the dashboard saw the rollout: hosts per state at each step of the audit trail
        times = sorted({t for h in hosts for t, _ in h.get("history", [])})
        if times:
            seen = board.history
            first_live = seen[0][0] if seen else float("inf")
            points: list[list[Any]] = []
            for t in times:
                if t0 + t >= first_live:
                    break
                now = Counter(_state_at(h, t) for h in hosts)
                points.append([t0 + t, dict(sorted(now.items()))])
            board.history = [*points, *seen][-HISTORY_MAX:]
        for ev in report.get("events", []):
            if isinstance(ev, dict) and not board.seeded:
                board.events.append({**{k: v for k, v in ev.items() if k != "t"}, "rollout": name,
                                     "at": t0 + float(ev.get("t", 0.0))})
        board.seeded = True
        return True

    def view(self, names: set[str] | None = None) -> dict[str, Any]:
        return {n: b.view() for n, b in sorted(self.boards.items()) if names is None or n in names}


def _state_at(host: dict[str, Any], t: float) -> str:
    state = "QUEUED"
    for at, s in host.get("history", []):
        if at > t:
            break
        state = s
    return str(state)
