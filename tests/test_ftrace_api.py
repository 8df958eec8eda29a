"""ftrace's public API (``daemon.ftrace``): its own batch result, the function-address helper, redirects, the
symbol lookup that says whether an address starts a function, and the architecture's callable-address rule."""

from __future__ import annotations

import pytest

import daemon.ftrace
from daemon.arch.arm64 import callsite, patching
from daemon.errors import FtraceError
from daemon.ftrace import BatchResult, Ftrace, FtraceOps, OpsFlag, SymbolAt, func_addr, tracefs

MASK64 = (1 << 64) - 1
MUL = 0x2545F4914F6CDD1D


def work_chain(x: int, c: object = None) -> int:
    """work_chain(x) = work_step_a(x) + work_step_c(x), with step_c replaceable (see tests/test_ftrace.py)."""
    def step_c(v: int) -> int:
        return ((v ^ (v >> 7)) * MUL) & MASK64
    fc = c if callable(c) else step_c
    b = (fc((x * 3 + 3) & MASK64) + 5) & MASK64
    return ((b ^ 0x55) + fc(x)) & MASK64


def test_every_public_name_is_there() -> None:
    missing = [n for n in daemon.ftrace.__all__ if not hasattr(daemon.ftrace, n)]
    assert missing == []
    assert "BatchResult" in daemon.ftrace.__all__
    assert "func_addr" in daemon.ftrace.__all__


def test_batches_are_ftraces_own_result(ftrace: Ftrace) -> None:
    ops = FtraceOps("count", "ops_func_count")
    ftrace.set_filter(ops, "work_step_a")
    result = ftrace.register(ops)
    assert type(result) is BatchResult
    assert (result.sites, result.data) == (1, 2), "one BL, the literal and the ops-list head"
    assert result.pause_ns > 0
    assert type(ftrace.last_batch) is BatchResult
    assert type(ftrace.unregister(ops)) is BatchResult


def test_func_addr_is_the_functions_symbol(ftrace: Ftrace) -> None:
    rec = ftrace.record("work_step_a")
    assert func_addr(rec.ip) == rec.func_addr == ftrace.kernel.kallsyms.addr("work_step_a")


def test_register_redirect_runs_the_target_instead(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    ops = FtraceOps("redirect")
    ftrace.set_filter(ops, "work_step_c")
    ftrace.register_redirect(ops, k.kallsyms.addr("ftrace_stub"))
    assert ops.flags & OpsFlag.IPMODIFY
    assert ops.registered
    assert k.call("work_chain", 11) == work_chain(11, c=lambda x: x), "work_step_c now returns its argument"
    assert "work_step_c (1)   I   O M " in tracefs.enabled_functions(ftrace)
    ftrace.unregister(ops)
    assert k.call("work_chain", 11) == work_chain(11)


def test_register_redirect_refuses_what_is_not_a_function_start(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    text = k.memory.read(k.text.base, k.text.size)
    for bad in (k.kallsyms.addr("work_step_a") + 8, k.kallsyms.addr("boot_params"), 0xDEAD0000):
        ops = FtraceOps("redirect")
        ftrace.set_filter(ops, "work_step_c")
        with pytest.raises(FtraceError, match="not the start of a function"):
            ftrace.register_redirect(ops, bad)
        assert not ops.registered
        assert not ops.flags & OpsFlag.IPMODIFY
        assert not ops.private
    assert k.memory.read(k.text.base, k.text.size) == text


def test_symbol_at_gives_the_offset_in_kernel_and_module_symbols(ftrace: Ftrace) -> None:
    k = ftrace.kernel
    start = k.kallsyms.addr("work_step_a")
    at = ftrace.symbol_at(start + 8)
    assert at is not None
    assert (at.name, at.start, at.offset, at.is_func, at.module) == ("work_step_a", start, 8,
                                                                                          True, "")
    assert not at.is_function_start
    assert ftrace.is_function_start(start)
    assert not ftrace.is_function_start(k.kallsyms.addr("boot_params")), "data is no function"
    assert ftrace.symbol_at(0xDEAD0000) is None
    assert ftrace.describe(start + 8) == k.kallsyms.describe(start + 8)

    base = k.module_text.base  # a module's symbols, as the module loader's users register them

    def module_symbols(addr: int) -> SymbolAt | None:
        return SymbolAt("fix_it", base, 0x40, addr - base, True, "fixmod") if base <= addr < base + 0x40 else None
    ftrace.add_records([], symbols=module_symbols)
    assert ftrace.is_function_start(base)
    assert not ftrace.is_function_start(base + 4)
    assert ftrace.describe(base + 4) == "fix_it+0x4/0x40 [fixmod]"
    ftrace.forget_symbols(module_symbols)
    assert ftrace.symbol_at(base) is None
    assert ftrace.describe(base) == f"{base:#x}"


def test_find_callable_addr_is_the_architectures_rule() -> None:
    site, caller = 0x1000_0000, 0x1000_4000
    assert callsite.find_callable_addr(site, caller, caller=caller, plt=0) == caller, "in BL range"
    far = site + (200 << 20)
    assert callsite.find_callable_addr(site, far, caller=far, plt=site + 64) == site + 64, "through the PLT"
    assert callsite.find_callable_addr(site, far, caller=far, plt=0) is None, "a module without a PLT"
    assert callsite.find_callable_addr(site, far, caller=caller, plt=site + 64) is None, \
        "the PLT reaches ftrace_caller only"
    assert callsite.can_call_directly(site, site + (100 << 20))
    assert not callsite.can_call_directly(site, far), "a far direct trampoline is reached through ftrace_caller"


def test_the_result_type_is_not_the_patchers() -> None:
    assert BatchResult is not patching.BatchResult
    assert BatchResult.of(patching.BatchResult(3, 2, 1)) == BatchResult(3, 2, 1)


def test_a_hijack_target_by_address_is_a_function_start_by_symbol_lookup(ftrace: Ftrace) -> None:
    from daemon.service.ftrace.targets import function_start  # noqa: PLC0415  (the service's use of the lookup)
    from daemon.service.pipeline.errors import InvalidArgument  # noqa: PLC0415

    k = ftrace.kernel
    start = k.kallsyms.addr("work_step_a")
    assert function_start(k, ftrace, f"{start:#x}", 0) == start
    for bad in (start + 8, k.kallsyms.addr("boot_params")):
        with pytest.raises(InvalidArgument, match="is not the start of a function"):
            function_start(k, ftrace, f"{bad:#x}", 0)
    base = k.module_text.base

    def module_symbols(addr: int) -> SymbolAt | None:
        return SymbolAt("fix_it", base, 0x40, addr - base, True, "fixmod") if base <= addr < base + 0x40 else None
    ftrace.add_records([], symbols=module_symbols)
    assert function_start(k, ftrace, f"{base:#x}", 0) == base, "a loaded module's function"
    with pytest.raises(InvalidArgument):
        function_start(k, ftrace, f"{base + 4:#x}", 0)
