"""Shadow variables: the guest's klp_shadow_* with the host's ShadowVars as writer, on the real emulator.

The example patch ``livepatch_shadow_vars`` (Linux's test_klp_shadow_vars) is compiled and loaded; its
selftest runs in the guest and logs a transcript that must match Linux's test-shadow-vars.sh expectations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from structlog.testing import capture_logs

from daemon.errors import GuestError
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.livepatch import examples
from daemon.livepatch.shadow import HEADER, ShadowEntry, ShadowVars, bucket_of
from daemon.module_loader import LoadedModule, ModuleLoader

SV_ID1, SV_ID2 = 0x1234, 0x1235
NUM_OBJS = 3
BASE = 0xFFFF_7000_0000_0000  # stress objects: BASE + 16 * i, never dereferenced

# Linux's tools/testing/selftests/livepatch/test-shadow-vars.sh, without the "test_klp_shadow_vars: " prefixes.
TRANSCRIPT = """\
klp_shadow_get(obj=PTR1, id=0x1234) = PTR0
  got expected NULL result
shadow_ctor: PTR3 -> PTR2
klp_shadow_get_or_alloc(obj=PTR1, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR2 = PTR3
shadow_ctor: PTR6 -> PTR5
klp_shadow_alloc(obj=PTR1, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR5 = PTR6
shadow_ctor: PTR8 -> PTR7
klp_shadow_alloc(obj=PTR9, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR7 = PTR8
shadow_ctor: PTR11 -> PTR10
klp_shadow_alloc(obj=PTR9, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR10 = PTR11
shadow_ctor: PTR13 -> PTR12
klp_shadow_get_or_alloc(obj=PTR14, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR12 = PTR13
shadow_ctor: PTR16 -> PTR15
klp_shadow_alloc(obj=PTR14, id=0x1235, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR15 = PTR16
klp_shadow_get(obj=PTR1, id=0x1234) = PTR3
  got expected PTR3 -> PTR2 result
klp_shadow_get(obj=PTR1, id=0x1235) = PTR6
  got expected PTR6 -> PTR5 result
klp_shadow_get(obj=PTR9, id=0x1234) = PTR8
  got expected PTR8 -> PTR7 result
klp_shadow_get(obj=PTR9, id=0x1235) = PTR11
  got expected PTR11 -> PTR10 result
klp_shadow_get(obj=PTR14, id=0x1234) = PTR13
  got expected PTR13 -> PTR12 result
klp_shadow_get(obj=PTR14, id=0x1235) = PTR16
  got expected PTR16 -> PTR15 result
klp_shadow_get_or_alloc(obj=PTR1, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR2 = PTR3
  got expected PTR3 -> PTR2 result
klp_shadow_get_or_alloc(obj=PTR9, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR7 = PTR8
  got expected PTR8 -> PTR7 result
klp_shadow_get_or_alloc(obj=PTR14, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR12 = PTR13
  got expected PTR13 -> PTR12 result
shadow_dtor(obj=PTR1, shadow_data=PTR3)
klp_shadow_free(obj=PTR1, id=0x1234, dtor=PTR17)
klp_shadow_get(obj=PTR1, id=0x1234) = PTR0
  got expected NULL result
shadow_dtor(obj=PTR9, shadow_data=PTR8)
klp_shadow_free(obj=PTR9, id=0x1234, dtor=PTR17)
klp_shadow_get(obj=PTR9, id=0x1234) = PTR0
  got expected NULL result
shadow_dtor(obj=PTR14, shadow_data=PTR13)
klp_shadow_free(obj=PTR14, id=0x1234, dtor=PTR17)
klp_shadow_get(obj=PTR14, id=0x1234) = PTR0
  got expected NULL result
klp_shadow_get(obj=PTR1, id=0x1235) = PTR6
  got expected PTR6 -> PTR5 result
klp_shadow_get(obj=PTR9, id=0x1235) = PTR11
  got expected PTR11 -> PTR10 result
klp_shadow_get(obj=PTR14, id=0x1235) = PTR16
  got expected PTR16 -> PTR15 result
klp_shadow_free_all(id=0x1235, dtor=PTR0)
klp_shadow_get(obj=PTR1, id=0x1235) = PTR0
  got expected NULL result
klp_shadow_get(obj=PTR9, id=0x1235) = PTR0
  got expected NULL result
klp_shadow_get(obj=PTR14, id=0x1235) = PTR0
  got expected NULL result
"""


@pytest.fixture(scope="module")
def kernel(module_kernel: Kernel) -> Kernel:
    return module_kernel


@pytest.fixture(scope="module")
def shadow(kernel: Kernel) -> ShadowVars:
    return ShadowVars(kernel)


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory, kernel: Kernel) -> LoadedModule:
    bundle = examples.build_example("livepatch_shadow_vars", tmp_path_factory.mktemp("shadow"), kernel.image.build_id)
    assert bundle.manifest.functions() == []  # like test_klp_shadow_vars: replaces nothing
    return ModuleLoader(kernel).load(bundle.name, bundle.object)


@pytest.fixture(autouse=True)
def heap_start(kernel: Kernel, shadow: ShadowVars, module: LoadedModule) -> Iterator[int]:
    """Each test starts with an empty table and log, and must give every node back to the heap."""
    kernel.memory.write_u64(module.addr("klp_log"), 0)
    shadow.messages.clear()
    start = kernel.heap.free_bytes
    yield start
    kernel.machine.check()
    left = shadow.entries()
    for e in left:
        shadow.free(e.obj, e.id)
    shadow.synchronize()
    assert not left, f"the test left shadow variables behind: {left}"
    assert kernel.heap.free_bytes == start


def klp_log(kernel: Kernel, m: LoadedModule) -> str:
    log = m.addr("klp_log")
    return kernel.memory.read(log + 8, kernel.memory.read_u64(log)).decode()


def i32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >> 31 else value


def u64s(kernel: Kernel, addr: int, n: int) -> list[int]:
    return [kernel.memory.read_u64(addr + 8 * i) for i in range(n)]


def objs(m: LoadedModule) -> list[int]:
    return [m.addr("shadow_objs") + 16 * i for i in range(NUM_OBJS)]


@contextmanager
def before_op(kernel: Kernel, shadow: ShadowVars, op: int, action: Callable[[], object]) -> Iterator[list[int]]:
    """Run ``action`` on the host just before the first HC_SHADOW ``op`` is served: another CPU acting there."""
    fired: list[int] = []

    def hook(cpu: int, o: int, req: int) -> None:
        if o == op and not fired:
            fired.append(cpu)
            action()
        shadow._on_call(cpu, o, req)

    kernel.on_host_call(abi.HC_SHADOW, hook)
    try:
        yield fired
    finally:
        kernel.on_host_call(abi.HC_SHADOW, shadow._on_call)


# -- the selftest --------------------------------------------------------------------------------------------

def test_selftest_transcript(kernel: Kernel, shadow: ShadowVars, module: LoadedModule, heap_start: int) -> None:
    """test_klp_shadow_vars in one call: Linux's transcript, 6 constructors, 3 destructors, all freed."""
    calls = shadow.calls.copy()
    assert kernel.call(module.addr("shadow_selftest")) == 0
    assert klp_log(kernel, module) == TRANSCRIPT
    assert kernel.memory.read_u64(module.addr("shadow_ctor_calls")) == 6
    assert kernel.memory.read_u64(module.addr("shadow_dtor_calls")) == 3
    served = shadow.calls - calls
    # 6 reserve+link pairs; 3 frees; free_all unlinks 3 then gets 0
    assert served == {"reserve": 6, "link": 6, "unlink": 3, "unlink_id": 4}
    assert (shadow.count, shadow.quarantined, shadow.duplicates, list(shadow.messages)) == (0, 6, 0, [])
    assert kernel.heap.free_bytes < heap_start  # quarantined until a grace period
    assert shadow.synchronize() == 6
    assert kernel.heap.free_bytes == heap_start


def test_selftest_pass_by_pass_matches_the_host_view(kernel: Kernel, shadow: ShadowVars,
                                                     module: LoadedModule) -> None:
    """Between passes the host's entries() is the guest's table: objects, ids, the pointers the guest got."""
    run = module.addr("shadow_selftest_pass")
    o = objs(module)
    assert i32(kernel.call(run, 0)) == 0
    assert shadow.entries() == []
    assert i32(kernel.call(run, 1)) == 0
    sv1, sv2 = u64s(kernel, module.addr("sv1"), 3), u64s(kernel, module.addr("sv2"), 3)
    expected = {ShadowEntry(o[i], SV_ID1, sv1[i], 8) for i in range(3)} | \
               {ShadowEntry(o[i], SV_ID2, sv2[i], 8) for i in range(3)}
    entries = shadow.entries()
    assert set(entries) == expected
    assert len(entries) == shadow.count == 6
    for e in entries:
        assert e.data % 16 == 0
        assert shadow.get(e.obj, e.id) == e.data
        assert kernel.call("klp_shadow_get", e.obj, e.id, cpu=1) == e.data  # the other CPU sees it too
        node = e.data - HEADER
        assert u64s(kernel, node + 8, 3) == [e.obj, e.id, e.size]  # struct klp_shadow {next, obj, id, size}
        chain, cur = [], kernel.memory.read_u64(shadow.table + 8 * bucket_of(e.obj))
        while cur:
            chain.append(cur)
            cur = kernel.memory.read_u64(cur)
        assert node in chain  # hashed where the guest looks
    nfields1, nfields2 = module.addr("nfields1"), module.addr("nfields2")
    assert [kernel.memory.read_u64(sv1[i]) for i in range(3)] == [nfields1 + i for i in range(3)]
    assert [kernel.memory.read_u64(sv2[i]) for i in range(3)] == [nfields2 + 4 * i for i in range(3)]
    for p in (2, 3):
        assert i32(kernel.call(run, p)) == 0
        assert set(shadow.entries()) == expected  # lookups and get_or_alloc of existing pairs change nothing
    assert i32(kernel.call(run, 4)) == 0
    assert set(shadow.entries()) == {e for e in expected if e.id == SV_ID2}
    assert i32(kernel.call(run, 5)) == 0
    assert i32(kernel.call(run, 6)) == 0
    assert shadow.entries() == []
    assert shadow.synchronize() == 6
    assert klp_log(kernel, module) == TRANSCRIPT  # the same sequence, one pass per host call


def test_selftest_fails_cleanly_when_a_pass_fails(kernel: Kernel, shadow: ShadowVars, module: LoadedModule) -> None:
    """A pair already taken makes pass 1's klp_shadow_alloc return NULL: -ENOMEM, and the selftest frees all."""
    o = objs(module)
    assert shadow.alloc(o[1], SV_ID1, 8) is not None  # pass 1 allocs <objs[1], SV_ID1> (i odd: alloc)
    assert i32(kernel.call(module.addr("shadow_selftest"))) == -12
    assert shadow.count == 0  # its error path freed everything, the host's variable too (free_all of both ids)
    assert "klp_shadow_alloc(obj=PTR8, id=0x1234, size=8, gfp_flags=GFP_KERNEL), ctor=PTR4, ctor_data=PTR7 = PTR0" \
        in klp_log(kernel, module)  # no constructor ran: PTR8 is the object
    shadow.synchronize()


# -- duplicates and constructor failures -----------------------------------------------------------------------

def test_alloc_of_an_existing_pair_returns_null(kernel: Kernel, shadow: ShadowVars, module: LoadedModule) -> None:
    """klp_shadow_alloc of an existing <obj, id> is NULL, its data untouched, no constructor; get_or_alloc finds it."""
    obj, ctor, arg = BASE + 0x100, module.addr("shadow_ctor"), module.addr("pnfields1")
    kernel.memory.write_u64(arg, 0xABCD)
    ctor_calls = kernel.memory.read_u64(module.addr("shadow_ctor_calls"))
    data = kernel.call("klp_shadow_alloc", obj, 7, 8, 0, ctor, arg)
    assert data
    assert kernel.memory.read_u64(data) == 0xABCD
    kernel.memory.write_u64(arg, 0x1111)
    assert kernel.call("klp_shadow_alloc", obj, 7, 8, 0, ctor, arg, cpu=1) == 0
    assert kernel.call("klp_shadow_get_or_alloc", obj, 7, 8, 0, ctor, arg) == data
    assert kernel.memory.read_u64(data) == 0xABCD
    assert kernel.memory.read_u64(module.addr("shadow_ctor_calls")) == ctor_calls + 1
    kernel.call("klp_shadow_free", obj, 7, 0)
    assert shadow.count == 0


def test_duplicate_found_by_the_guest_lookup_warns(kernel: Kernel, shadow: ShadowVars, module: LoadedModule) -> None:
    obj = BASE + 0x200
    data = shadow.alloc(obj, 7, 8)
    before = shadow.duplicates
    try:
        assert kernel.call("klp_shadow_alloc", obj, 7, 8, 0, 0, 0) == 0
        assert shadow.duplicates == before + 1
    finally:
        shadow.free(obj, 7)
        shadow.synchronize()
    assert data


@pytest.mark.parametrize("op", [abi.SHADOW_RESERVE, abi.SHADOW_LINK])
def test_duplicate_found_by_the_host_warns_for_alloc_only(kernel: Kernel, shadow: ShadowVars, module: LoadedModule,
                                                          op: int) -> None:
    """Another CPU publishes <obj, id> after the guest's lookup missed: before its reservation, or before its link.

    klp_shadow_alloc returns NULL with Linux's warning; get_or_alloc returns the winner's data, silently. A
    node reserved for the loser is freed at once (it was never visible).
    """
    ctor, arg = module.addr("shadow_stress_ctor"), 0x77
    ctor_calls = module.addr("shadow_stress_ctor_calls")
    results = {}
    for fn, warns in (("klp_shadow_alloc", True), ("klp_shadow_get_or_alloc", False)):
        obj = BASE + (0x300 if warns else 0x400)
        winner: list[int | None] = []
        before = (shadow.duplicates, shadow.link_races, kernel.memory.read_u64(ctor_calls))
        def win(o: int = obj, w: list[int | None] = winner) -> None:
            w.append(shadow.alloc(o, 9, 16, b"won"))

        with capture_logs() as logs, before_op(kernel, shadow, op, win) as fired:
            results[fn] = kernel.call(fn, obj, 9, 16, 0, ctor, arg)
        assert fired == [0]
        assert results[fn] == (0 if warns else winner[0])
        assert kernel.memory.read(winner[0] or 0, 3) == b"won"
        dup = [e for e in logs if e.get("log_level") == "warning"]
        if warns:
            text = f"Duplicate shadow variable <{obj:#x}, 0x9>"
            assert shadow.duplicates == before[0] + 1
            assert [e["message"] for e in dup] == [text]
            assert shadow.messages[-1] == text
        else:
            assert (shadow.duplicates, dup) == (before[0], [])
        # A link race ran the constructor on the loser's node (not under a lock, unlike Linux); a reserve race did not.
        raced = op == abi.SHADOW_LINK
        assert shadow.link_races == before[1] + raced
        assert kernel.memory.read_u64(ctor_calls) == before[2] + raced
        assert shadow.entries() == [ShadowEntry(obj, 9, winner[0] or 0, 16)]
        assert shadow.stats()["reserved"] == 0
        assert shadow.free_all(9) == 1
    assert shadow.synchronize() == 2


@pytest.mark.parametrize("fn", ["klp_shadow_alloc", "klp_shadow_get_or_alloc"])
def test_constructor_failure_links_nothing(kernel: Kernel, shadow: ShadowVars, module: LoadedModule,
                                           heap_start: int, fn: str) -> None:
    """shadow_ctor without ctor_data fails (-EINVAL): NULL, nothing linked, the node freed at once, a warning."""
    obj = BASE + 0x500
    with capture_logs() as logs:
        assert kernel.call(fn, obj, 3, 8, 0, module.addr("shadow_ctor"), 0) == 0
    text = f"Failed to construct shadow variable <{obj:#x}, 0x3> (-22)"  # the ctor returned -EINVAL
    assert [e["message"] for e in logs if e.get("log_level") == "warning"] == [text]
    assert (shadow.count, shadow.quarantined, shadow.ctor_failures > 0) == (0, 0, True)
    assert kernel.call("klp_shadow_get", obj, 3) == 0
    assert kernel.heap.free_bytes == heap_start  # never published: no grace period to wait for
    assert shadow.calls["discard"] >= 1


def test_allocation_failure_is_null(kernel: Kernel, shadow: ShadowVars, heap_start: int) -> None:
    """A variable too large to allocate: NULL, as a failed kzalloc, and the heap untouched."""
    failures = shadow.alloc_failures
    assert kernel.call("klp_shadow_get_or_alloc", BASE, 1, 1 << 30, 0, 0, 0) == 0
    assert shadow.alloc_failures == failures + 1
    assert (shadow.count, kernel.heap.free_bytes) == (0, heap_start)


# -- host-side writers and lifetimes -----------------------------------------------------------------------------

def test_host_writers_are_seen_by_the_guest(kernel: Kernel, shadow: ShadowVars, heap_start: int) -> None:
    data = shadow.alloc(BASE + 0x600, 5, 24, b"host")
    assert data is not None
    assert data % 16 == 0
    assert kernel.memory.read(data, 24) == b"host" + bytes(20)  # zeroed beyond init
    with capture_logs():
        assert shadow.alloc(BASE + 0x600, 5, 24) is None
    assert shadow.messages[-1] == f"Duplicate shadow variable <{BASE + 0x600:#x}, 0x5>"
    for c in (0, 1):
        assert kernel.call("klp_shadow_get", BASE + 0x600, 5, cpu=c) == data
    assert kernel.call("klp_shadow_get", BASE + 0x600, 6) == 0
    kernel.call("klp_shadow_free", BASE + 0x600, 5, 0, cpu=1)  # the guest frees what the host made
    assert shadow.get(BASE + 0x600, 5) is None
    assert (shadow.free(BASE + 0x600, 5), shadow.free_all(5)) == (False, 0)
    unlinks = shadow.calls["unlink"]
    kernel.call("klp_shadow_free", BASE + 0x600, 5, 0)  # nothing to free: one host call answering 0
    assert shadow.calls["unlink"] == unlinks + 1
    assert shadow.synchronize() == 1
    assert kernel.heap.free_bytes == heap_start


def test_unlink_keeps_neighbours_and_quarantines(kernel: Kernel, shadow: ShadowVars, heap_start: int) -> None:
    """Nodes sharing a bucket: unlinking the middle one relinks its predecessor; its memory stays intact."""
    by_bucket: dict[int, list[int]] = {}
    obj = BASE
    while not any(len(v) >= 3 for v in by_bucket.values()):
        by_bucket.setdefault(bucket_of(obj), []).append(obj)
        obj += 16
    same = next(v for v in by_bucket.values() if len(v) >= 3)[:3]
    datas = [shadow.alloc(o, 1, 8, o.to_bytes(8, "little")) for o in same]
    middle = (datas[1] or 0) - HEADER
    kernel.call("klp_shadow_free", same[1], 1, 0)
    assert [kernel.call("klp_shadow_get", o, 1) for o in same] == [datas[0], 0, datas[2]]
    assert kernel.memory.read_u64(middle) == (datas[0] or 0) - HEADER  # its next still leads on (a walker on it)
    assert kernel.memory.read_u64(middle + HEADER) == same[1]  # not reused before a grace period...
    fresh = shadow.alloc(BASE - 16, 1, 8)
    assert fresh is not None
    assert fresh - HEADER != middle  # ...not even by the next allocation of the same size
    assert kernel.memory.read_u64(middle + HEADER) == same[1]
    assert shadow.quarantined == 1
    assert shadow.free_all(1) == 3
    assert shadow.synchronize() == 4
    assert kernel.heap.free_bytes == heap_start


def test_synchronize_inside_a_stop_machine(kernel: Kernel, shadow: ShadowVars, heap_start: int) -> None:
    for i in range(4):
        shadow.alloc(BASE + 16 * i, 2, 8)
    kernel.call("klp_shadow_free_all", 2, 0, cpu=1)
    assert shadow.quarantined == 4
    assert kernel.machine.stop_machine(lambda: shadow.synchronize(paused=True)) == 4
    assert kernel.heap.free_bytes == heap_start


def test_one_owner_per_table(kernel: Kernel, shadow: ShadowVars) -> None:
    shadow.alloc(BASE, 1, 8)
    try:
        with pytest.raises(GuestError, match="not empty"):
            ShadowVars(kernel)
    finally:
        shadow.free(BASE, 1)
        shadow.synchronize()


# -- several CPUs ------------------------------------------------------------------------------------------------

def test_concurrent_get_or_alloc_makes_one_node_per_pair(kernel: Kernel, shadow: ShadowVars, module: LoadedModule,
                                                         heap_start: int) -> None:
    """Both vCPUs get_or_alloc the same 256 pairs at once, 3 rounds: one node each, the same pointers on both."""
    n, fn = 256, module.addr("shadow_stress_get_or_alloc")
    ctor_calls, dtor_calls = module.addr("shadow_stress_ctor_calls"), module.addr("shadow_stress_dtor_calls")
    races = 0
    for it in range(3):
        sid = 0x5000 + it
        outs = [kernel.host_buffer.alloc(8 * n) for _ in range(2)]
        try:
            link_races, ctors = shadow.link_races, sum(u64s(kernel, ctor_calls, 2))
            futures = [kernel.submit(fn, BASE, n, sid, outs[c], 3, cpu=c) for c in (0, 1)]
            assert [f.result(60) for f in futures] == [0, 0]
            got = [u64s(kernel, out, n) for out in outs]
        finally:
            for out in outs:
                kernel.host_buffer.free(out, 8 * n)
        assert got[0] == got[1]
        assert len(set(got[0])) == n
        entries = shadow.entries()
        assert sorted(entries, key=lambda e: e.obj) == [ShadowEntry(BASE + 16 * i, sid, got[0][i], 16)
                                                        for i in range(n)]
        builders = [kernel.memory.read_u64(d + 8) for d in got[0]]
        assert {kernel.memory.read_u64(d) for d in got[0]} == {BASE + 16 * i for i in range(n)}
        assert set(builders) <= {0, 1}
        # Every fresh reservation ran the constructor once: the n published, plus each loser of a link race.
        races += shadow.link_races - link_races
        assert sum(u64s(kernel, ctor_calls, 2)) - ctors == n + shadow.link_races - link_races
        dtors = sum(u64s(kernel, dtor_calls, 2))
        futures = [kernel.submit(module.addr("shadow_stress_free_all"), sid, cpu=c) for c in (0, 1)]
        for f in futures:
            f.result(60)
        assert sum(u64s(kernel, dtor_calls, 2)) - dtors == n  # each variable destroyed once, by one CPU
        assert (shadow.count, shadow.quarantined) == (0, n)
        assert shadow.synchronize() == n
        assert kernel.heap.free_bytes == heap_start
    assert shadow.stats()["reserved"] == 0
    print(f"link races seen: {races}")


def test_concurrent_free_of_the_same_pairs(kernel: Kernel, shadow: ShadowVars, module: LoadedModule) -> None:
    """klp_shadow_free of the same pairs on both CPUs: each unhashed and destroyed exactly once."""
    n, dtor_calls = 128, module.addr("shadow_stress_dtor_calls")
    for i in range(n):
        shadow.alloc(BASE + 16 * i, 4, 16, (BASE + 16 * i).to_bytes(8, "little"))
    dtors = sum(u64s(kernel, dtor_calls, 2))
    futures = [kernel.submit(module.addr("shadow_stress_free"), BASE, n, 4, cpu=c) for c in (0, 1)]
    for f in futures:
        f.result(60)
    assert sum(u64s(kernel, dtor_calls, 2)) - dtors == n
    assert (shadow.count, shadow.synchronize()) == (0, n)


def test_readers_never_see_reused_nodes(kernel: Kernel, shadow: ShadowVars, module: LoadedModule,
                                        heap_start: int) -> None:
    """CPU 0 allocates and frees 64 pairs over and over, CPU 1 looks them up, the host ends grace periods meanwhile
    (so node memory is reused): every hit holds its own object."""
    n, rounds, jobs = 64, 4, 10
    hits = module.addr("shadow_stress_hits")
    hits_before = kernel.memory.read_u64(hits + 8)
    churn = [kernel.submit(module.addr("shadow_stress_churn"), BASE, n, 11, rounds, cpu=0) for _ in range(jobs)]
    reads = [kernel.submit(module.addr("shadow_stress_read"), BASE, n, 11, 4 * rounds, cpu=1) for _ in range(jobs)]
    freed, grace_periods = 0, 0
    while not all(f.done() for f in churn + reads):
        freed += shadow.synchronize()
        grace_periods += 1
    assert [f.result() for f in churn] == [0] * jobs  # no failed allocation: each round freed its pairs
    assert [f.result() for f in reads] == [0] * jobs  # no lookup found a node holding another object
    assert shadow.count == 0
    freed += shadow.synchronize()
    assert freed == n * rounds * jobs
    assert kernel.heap.free_bytes == heap_start
    print(f"grace periods during the churn: {grace_periods}, "
          f"reader hits: {kernel.memory.read_u64(hits + 8) - hits_before}")
