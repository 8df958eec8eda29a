"""The desired-state store (daemon/service/store/desired.py): order, merge, delete, applied request ids, durability."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.service.store.desired import DesiredState


def test_put_update_delete_keep_order(tmp_path: Path) -> None:
    store = DesiredState(tmp_path / "desired.sqlite3")
    store.put("livepatch", "b", {"enabled": False}, blob=b"B")
    store.put("livepatch", "a", {"enabled": False}, blob=b"A", request_id="r1")
    store.put("ftrace", "x", {"n": 1})
    assert [i.key for i in store.items("livepatch")] == ["b", "a"]
    item = store.update("livepatch", "b", {"enabled": True}, request_id="r2")
    assert (item.doc, item.blob, item.version) == ({"enabled": True}, b"B", 2)
    again = store.put("livepatch", "b", {"enabled": False, "x": 1}, blob=b"B2")
    assert again.seq == item.seq, "a put over an existing item keeps its place"
    assert [i.key for i in store.items("livepatch")] == ["b", "a"]
    assert store.applied("r1")
    assert store.applied("r2")
    assert not store.applied("r3")
    assert store.delete("livepatch", "b", request_id="r3")
    assert not store.delete("livepatch", "b")
    assert store.applied("r3")
    with pytest.raises(KeyError):
        store.update("livepatch", "b", {"enabled": True})
    store.put("livepatch", "b", {"enabled": False})
    assert [i.key for i in store.items("livepatch")] == ["a", "b"], "put again after delete: goes last"
    assert [i.key for i in store.items("ftrace")] == ["x"]
    store.close()
    reopened = DesiredState(tmp_path / "desired.sqlite3")
    assert [(i.key, i.doc, i.blob) for i in reopened.items("livepatch")] == [("a", {"enabled": False}, b"A"),
                                                                           ("b", {"enabled": False}, None)]
    assert reopened.applied("r1")
    reopened.close()


def test_batch_is_one_transaction(tmp_path: Path) -> None:
    store = DesiredState(tmp_path / "d.sqlite3")
    store.put("k", "a", {"v": 1})

    def failing() -> None:
        with store.batch():
            store.update("k", "a", {"v": 2}, request_id="r")
            store.put("k", "b", {"v": 1})
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        failing()
    assert [(i.key, i.doc) for i in store.items("k")] == [("a", {"v": 1})]
    assert not store.applied("r")
    with store.batch():
        store.update("k", "a", {"v": 2})
        store.put("k", "b", {"v": 1})
    assert [(i.key, i.doc) for i in store.items("k")] == [("a", {"v": 2}), ("b", {"v": 1})]


def test_applied_ids_are_bounded(tmp_path: Path) -> None:
    store = DesiredState(tmp_path / "d.sqlite3", applied_keep=5)
    for i in range(20):
        store.put("k", "a", {"i": i}, request_id=f"r{i}")
    assert [store.applied(f"r{i}") for i in range(20)] == [False] * 15 + [True] * 5


def test_threads_share_one_store(tmp_path: Path) -> None:
    store = DesiredState(tmp_path / "d.sqlite3")

    def work(n: int) -> None:
        for i in range(50):
            store.put("k", f"{n}-{i}", {"i": i}, request_id=f"{n}-{i}")
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.items("k")) == 200


def test_a_killed_writer_loses_no_committed_change(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite3"
    code = ("import os, sys; from pathlib import Path; from daemon.service.store.desired import DesiredState\n"
            "s = DesiredState(Path(sys.argv[1]))\n"
            "for i in range(20): s.put('k', str(i), {'i': i}, blob=bytes(1000), request_id=f'r{i}')\n"
            "print('done', flush=True); os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, env=os.environ, check=False)
    assert proc.stdout == "done\n"
    assert proc.returncode == -9
    store = DesiredState(path)
    assert [i.key for i in store.items("k")] == [str(i) for i in range(20)]
    assert store.applied("r19")
