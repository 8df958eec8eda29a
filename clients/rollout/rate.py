"""How many more hosts may start now: the rollout's rate (constant or exponential), its cap, its windows.

Constant ``per_minute = r``: the k-th host (0-based) may start at ``anchor + 60·k/r`` — the first at once. The
anchor moves each time the rollout starts running again (after a pause, a closed window, an approval gate), so
time spent waiting is not saved up as a burst.
Exponential (AWS IoT Jobs' ``exponentialRate``): the same with ``r = base · factor^level``; each time another
``increase_every`` hosts were notified (released) or succeeded, ``level`` grows by one and the count so far is
carried into a new anchor. The limiter's state lives in the rollout's plan document, so a restart resumes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schemas.rollout import Rate, Schedule

EPS_S = 1e-6
"""A microsecond of slack: a start due at ``anchor + 60·k/r`` is due at that float time, whatever its rounding
(at Unix times, a double's step is ~0.2 µs)."""


@dataclass
class RateState:
    anchor: float
    base: int = 0      # hosts allowed at ``anchor`` by the earlier levels
    level: int = 0

    def dump(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "base": self.base, "level": self.level}

    @classmethod
    def load(cls, doc: dict[str, Any] | None, now: float) -> RateState:
        if not doc:
            return cls(anchor=now)
        return cls(float(doc["anchor"]), int(doc["base"]), int(doc["level"]))


def per_minute(rate: Rate, st: RateState) -> float | None:
    if rate.per_minute is not None:
        return rate.per_minute
    if rate.base_per_minute is not None:
        return rate.base_per_minute * rate.factor ** st.level
    return None  # unlimited


def _allowed(rate: Rate, st: RateState, now: float) -> float:
    r = per_minute(rate, st)
    if r is None:
        return math.inf
    return st.base + 1 + math.floor(r * (max(0.0, now - st.anchor) + EPS_S) / 60.0)


def bump(rate: Rate, st: RateState, notified: int, succeeded: int, now: float) -> bool:
    """Raise the exponential rate's level as its criterion is met; True when it changed."""
    if rate.base_per_minute is None:
        return False
    count = notified if rate.increase_on == "notified" else succeeded
    changed = False
    while count >= (st.level + 1) * rate.increase_every:
        allowed = _allowed(rate, st, now)
        st.base, st.anchor, st.level = int(allowed) - 1, now, st.level + 1
        changed = True
    return changed


def reanchor(st: RateState, released: int, now: float) -> None:
    """The rollout (re)starts running: one host at once, then the rate — no burst for the time it waited."""
    st.base, st.anchor = released, now


def may_start(rate: Rate, st: RateState, released: int, in_progress: int, now: float) -> float:
    """How many queued hosts may be released now (``inf``: no limit)."""
    room = _allowed(rate, st, now) - released
    if rate.max_in_progress is not None:
        room = min(room, rate.max_in_progress - in_progress)
    return max(0.0, room)


def next_start(rate: Rate, st: RateState, released: int) -> float | None:
    """When the next host may start by rate (None: no rate limit)."""
    r = per_minute(rate, st)
    if r is None:
        return None
    return st.anchor + 60.0 * (released - st.base) / r


def window_open(schedule: Schedule, now: float) -> bool:
    if not schedule.windows:
        return True
    return any((now - w.start_s) % w.every_s < w.length_s for w in schedule.windows)


def next_window(schedule: Schedule, now: float) -> float | None:
    """When the next maintenance window opens (None: no windows)."""
    if not schedule.windows:
        return None
    starts = []
    for w in schedule.windows:
        into = (now - w.start_s) % w.every_s
        starts.append(now + (w.every_s - into))
    return min(starts)
