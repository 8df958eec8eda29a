"""The hosts of a watched rollout by state (``lpctl rollout watch``): a ``rollout.status`` snapshot, kept current
by the execution changes on the orchestrator's events topic (a change wins over what is known when its version
is higher, so the snapshot and the changes may arrive in any order)."""

from __future__ import annotations

from rich.table import Table

from schemas.rollout import ExecState, Execution

HOSTS_SHOWN = 8
"""Host names listed per state; the rest are counted (a 1,000-host rollout stays one screen)."""


class HostBoard:
    def __init__(self) -> None:
        self.hosts: dict[str, tuple[int, ExecState]] = {}  # host -> (version, state)

    def update(self, e: Execution) -> bool:
        """Take ``e`` if it is newer than what is known of its host; True when the board changed."""
        known = self.hosts.get(e.host)
        if known is not None and known[0] >= e.version:
            return False
        self.hosts[e.host] = (e.version, e.state)
        return known is None or known[1] is not e.state

    def by_state(self) -> dict[ExecState, list[str]]:
        out: dict[ExecState, list[str]] = {}
        for host, (_, state) in sorted(self.hosts.items()):
            out.setdefault(state, []).append(host)
        return {s: out[s] for s in ExecState if s in out}  # the states in their lifecycle order

    def table(self, shown: int = HOSTS_SHOWN) -> Table:
        table = Table("state", "hosts", "which", title="hosts by state")
        for state, hosts in self.by_state().items():
            names = ", ".join(hosts[:shown]) + (f" … +{len(hosts) - shown} more" if len(hosts) > shown else "")
            table.add_row(state.value, str(len(hosts)), names)
        return table
