"""Proof of effect: the guest's own counts of where patched calls went (``klp_ftrace_handler``, no host hook).

Per CPU (the emulated CPUs have no cross-CPU atomic read-modify-write, so each CPU counts in its own slot and the
host sums them), ``klp_ftrace_handler`` counts:

* ``klp_func.calls[cpu]``: calls it sent to that func's ``new_func`` — the replacement ran;
* ``klp_ops.orig_calls[cpu]``: entries of the old function it let through to the original (no func, a task not
  switched yet with nothing below, an atomic replace's NOP).

Both start at zero when the entry (or the function's ops) is written, i.e. when the patch is enabled. Whether an
original ran *since a transition completed* is the growth of ``orig_calls`` from a baseline the caller takes then
(:func:`orig_calls` at completion).
"""

from __future__ import annotations

from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.livepatch.klp import KlpFunc, KlpOps


def _per_cpu_sum(kernel: Kernel, addr: int) -> int:
    raw = kernel.memory.read(addr, 8 * kernel.config.nr_cpus)
    return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))


def func_calls(kernel: Kernel, func: KlpFunc) -> int:
    """Calls sent to ``func``'s replacement since it was pushed on its func stack (0 when it is not on one)."""
    if not func.guest:
        return 0
    return _per_cpu_sum(kernel, func.guest + abi.klp_func.offsetof("calls"))


def orig_calls(kernel: Kernel, ops: KlpOps) -> int:
    """Entries of ``ops``' old function that ran the original since its ops were registered."""
    return _per_cpu_sum(kernel, ops.guest + abi.klp_ops.offsetof("orig_calls"))
