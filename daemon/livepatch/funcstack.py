"""Func stacks (kernel/livepatch/patch.c): one ftrace ops per patched old function, newest patch on top.

In guest memory each old function has a ``struct klp_ops`` (the ftrace ops' private data) pointing at the top
``struct klp_func``; entries link downwards through ``below``. ``klp_ftrace_handler`` only ever reads them, so
every change is one 8-byte store of a fully written entry (push) or, inside a stop-machine pause, one relink
(pop) after which the entry can be freed at once: no CPU is ever parked inside the handler.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.errors import FtraceError, PatchFtraceFailed
from daemon.ftrace import Ftrace, FtraceOps, OpsFlag
from daemon.guest import abi
from daemon.kernel.kernel import Kernel
from daemon.livepatch.klp import KlpFunc, KlpObject, KlpOps, KlpPatch

KLP_OPS_FLAGS = OpsFlag.IPMODIFY | OpsFlag.PERMANENT | OpsFlag.DYNAMIC


class FuncStacks:
    """The klp_ops of one kernel, by old function address."""

    def __init__(self, kernel: Kernel, ftrace: Ftrace, say: Callable[[str], None]) -> None:
        self.kernel = kernel
        self.ftrace = ftrace
        self.say = say
        self.ops: dict[int, KlpOps] = {}

    def push(self, func: KlpFunc) -> None:
        """klp_patch_func: the first func of an old function registers its IPMODIFY ops (-EBUSY if owned)."""
        ops = self.ops.get(func.old_addr)
        heap, mem = self.kernel.heap, self.kernel.memory
        guest = heap.alloc(abi.klp_func.size)
        below = ops.stack[0].guest if ops else 0
        mem.write(guest, abi.klp_func.pack(new_func=func.new_addr, below=below, transition=1, nop=int(func.nop),
                                           calls=()))
        if ops is None:
            kops = heap.alloc(abi.klp_ops.size)
            mem.write(kops, abi.klp_ops.pack(func_stack=guest, old_func=func.old_addr, orig_calls=()))
            fops = FtraceOps(f"klp:{func.old_name}", "klp_ftrace_handler", flags=KLP_OPS_FLAGS, private=kops)
            try:
                self.ftrace.set_filter_ips(fops, [func.old_addr])
                self.ftrace.register(fops)
            except FtraceError as exc:
                heap.free(guest, abi.klp_func.size)
                heap.free(kops, abi.klp_ops.size)
                self.say(f"failed to register ftrace handler for function '{func.old_name}' ({exc.errno})")
                raise PatchFtraceFailed(f"failed to register ftrace handler for function {func.old_name!r} "
                                        f"({exc.errno}): {exc.message}", function=func.old_name,
                                        reason=exc.code) from exc
            self.ops[func.old_addr] = KlpOps(func.old_addr, func.old_name, fops, kops, [func])
        else:
            mem.write_u64(ops.guest + abi.klp_ops.offsetof("func_stack"), guest)  # publish: one store
            ops.stack.insert(0, func)
        func.guest = guest
        func.patched = True

    def pop(self, func: KlpFunc) -> None:
        """klp_unpatch_func: unlink from the stack (unregistering the ops with its last entry)."""
        ops = self.ops[func.old_addr]
        i = ops.stack.index(func)
        if len(ops.stack) == 1:
            self.ftrace.unregister(ops.ftrace_ops)
            self.kernel.heap.free(ops.guest, abi.klp_ops.size)
            del self.ops[func.old_addr]
        else:
            nxt = ops.stack[i + 1].guest if i + 1 < len(ops.stack) else 0
            at = (ops.guest + abi.klp_ops.offsetof("func_stack") if i == 0
                  else ops.stack[i - 1].guest + abi.klp_func.offsetof("below"))
            self.kernel.stop_machine(lambda: self.kernel.memory.write_u64(at, nxt))
            ops.stack.remove(func)
        self.kernel.heap.free(func.guest, abi.klp_func.size)
        func.guest = 0
        func.patched = False

    def set_transition(self, func: KlpFunc, value: int) -> None:
        """func->transition as the handler sees it (call inside a pause, or on an entry not yet published)."""
        self.kernel.memory.write_u64(func.guest + abi.klp_func.offsetof("transition"), value)


def add_nops(patch: KlpPatch, installed: list[KlpPatch]) -> None:
    """klp_add_nops: a NOP func for every function an installed patch changes and ``patch`` does not."""
    nops = nop_funcs(patch, installed)
    vmlinux = next((o for o in patch.objects if o.name == "vmlinux"), None)
    if vmlinux is None:
        vmlinux = KlpObject("vmlinux", [])
        patch.objects.append(vmlinux)
    vmlinux.funcs.extend(nops)


def nop_funcs(patch: KlpPatch, installed: list[KlpPatch]) -> list[KlpFunc]:
    """The NOP funcs :func:`add_nops` would add to ``patch`` now (``patch`` is left as it is)."""
    mine = {f.old_addr for f in patch.funcs()}
    out = []
    for old in installed:
        if old is patch or not old.enabled:
            continue
        for f in old.funcs():
            if f.old_addr not in mine:
                mine.add(f.old_addr)
                out.append(KlpFunc(f.old_name, f.old_sympos, f.old_addr, f.old_size, f.old_name, f.old_addr,
                                   f.old_size, nop=True))
    return out
