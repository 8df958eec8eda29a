"""What a hijack names: the traceable function it redirects, and where to — a function start in kernel or module
text, or one of the guest's direct trampolines — with the checks that refuse the rest."""

from __future__ import annotations

from daemon.errors import BadDirectCall, SymbolError
from daemon.ftrace import Ftrace
from daemon.kernel.kernel import Kernel
from daemon.service.pipeline.errors import InvalidArgument
from schemas.ftrace import DIRECT_TRAMPOLINES


def function_start(kernel: Kernel, ftrace: Ftrace, target: str, sympos: int) -> int:
    """A function's first instruction in kernel or module text, by name or by hex address."""
    if target.lower().startswith("0x"):
        try:
            addr = int(target, 16)
        except ValueError:
            raise InvalidArgument(f"{target!r} is not a hex address", target=target) from None
        at = ftrace.symbol_at(addr)  # kernel or loaded module symbol
        is_start = at is not None and at.is_function_start
    elif target in kernel.kallsyms:
        sym = kernel.kallsyms.lookup(target, sympos)
        if not sym.is_func:
            raise InvalidArgument(f"{target!r} is not a function", target=target)
        addr, is_start = sym.addr, True
    elif target in ftrace.by_name:  # a loaded module's function
        addr, is_start = ftrace.record(target, sympos).func_addr, True
    else:
        raise SymbolError(f"unknown symbol {target!r}", symbol=target)
    if not is_start or not kernel.is_text(addr):
        raise InvalidArgument(f"{target} ({addr:#x}) is not the start of a function in kernel or module text",
                              target=target, address=addr)
    return addr


def direct_trampoline(kernel: Kernel, target: str) -> int:
    if target not in DIRECT_TRAMPOLINES:
        raise BadDirectCall(f"{target!r} is not a direct trampoline this daemon allows: use one of "
                            f"{', '.join(DIRECT_TRAMPOLINES)} (or mode 'ipmodify' to redirect to a function)",
                            target=target, allowed=list(DIRECT_TRAMPOLINES))
    return kernel.kallsyms.addr(target)


def check_no_loop(ftrace: Ftrace, redirects: dict[int, int], function: str, start: int, target: int) -> None:
    """Refuse A -> A and A -> B -> ... -> A (``redirects``: function start -> target of the IPMODIFY hijacks):
    the redirected call would re-enter its own redirect forever."""
    seen, addr = set(), target
    while True:
        if addr == start:
            raise InvalidArgument(f"redirecting {function} to {ftrace.describe(target)} would loop back "
                                  f"to {function}", function=function, target=ftrace.describe(target))
        if addr in seen or addr not in redirects:
            return
        seen.add(addr)
        addr = redirects[addr]
