"""``lpctl rollout watch``'s table of hosts by state: a snapshot and the execution changes, in any order."""

from __future__ import annotations

import io

from rich.console import Console

from clients.cli.rollout_board import HostBoard
from schemas.rollout import ExecState, Execution


def ex(host: str, state: ExecState, version: int) -> Execution:
    return Execution(rollout="r1", host=host, wave=0, build_id=None, state=state, version=version, attempts=0,
                     updated_at=0.0)


def render(board: HostBoard) -> str:
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(board.table(shown=3))
    return buf.getvalue()


def test_changes_win_by_version_in_any_order() -> None:
    board = HostBoard()
    assert board.update(ex("h1", ExecState.TRANSITIONING, 3))
    assert not board.update(ex("h1", ExecState.IN_PROGRESS, 2)), "an older snapshot row does not go back"
    assert board.update(ex("h1", ExecState.SUCCEEDED, 4))
    assert not board.update(ex("h1", ExecState.SUCCEEDED, 4)), "the same version again changes nothing"
    for i in range(2, 7):
        board.update(ex(f"h{i}", ExecState.QUEUED, 1))
    board.update(ex("h0", ExecState.STALLED, 5))
    by = board.by_state()
    assert list(by) == [ExecState.QUEUED, ExecState.STALLED, ExecState.SUCCEEDED], "lifecycle order"
    assert by[ExecState.QUEUED] == ["h2", "h3", "h4", "h5", "h6"]
    text = render(board)
    assert "hosts by state" in text
    queued = next(line for line in text.splitlines() if "QUEUED" in line)
    assert "5" in queued
    assert "h2, h3, h4 … +2 more" in queued
    assert "h0" in next(line for line in text.splitlines() if "STALLED" in line)
