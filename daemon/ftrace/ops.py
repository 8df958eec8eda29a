"""``ftrace_ops`` as the host holds them: flags, filters as sets of record ips, and the guest struct."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING

from daemon.guest import abi

if TYPE_CHECKING:
    from daemon.ftrace.hashes import GuestHash


class OpsFlag(IntFlag):
    """FTRACE_OPS_FL_*: the bits the guest reads share abi's values."""

    ENABLED = abi.FTRACE_OPS_FL_ENABLED
    DYNAMIC = abi.FTRACE_OPS_FL_DYNAMIC
    SAVE_REGS = abi.FTRACE_OPS_FL_SAVE_REGS
    SAVE_REGS_IF_SUPPORTED = abi.FTRACE_OPS_FL_SAVE_REGS_IF_SUPPORTED
    RECURSION = abi.FTRACE_OPS_FL_RECURSION
    STUB = abi.FTRACE_OPS_FL_STUB
    REMOVING = abi.FTRACE_OPS_FL_REMOVING
    IPMODIFY = abi.FTRACE_OPS_FL_IPMODIFY
    PERMANENT = abi.FTRACE_OPS_FL_PERMANENT
    DIRECT = abi.FTRACE_OPS_FL_DIRECT


@dataclass(eq=False)
class FtraceOps:
    """A callback to attach to functions.

    ``func`` is a guest function (symbol or address) with the ftrace_func_t signature. ``filter`` is the set
    of record ips it wants (``None``: every function); ``notrace`` the ips it excludes. Set them with
    :meth:`daemon.ftrace.core.Ftrace.set_filter` so that expressions are checked and a registered ops is
    updated in place.
    """

    name: str
    func: str | int = "ftrace_stub"
    flags: OpsFlag = field(default_factory=lambda: OpsFlag(0))
    filter: frozenset[int] | None = None
    notrace: frozenset[int] = frozenset()
    direct_call: int = 0
    private: int = 0
    addr: int = 0  # struct ftrace_ops in guest memory, while registered
    hashes: dict[str, GuestHash] = field(default_factory=dict)
    saved_hits: int = 0  # the counts it had when last unregistered

    @property
    def registered(self) -> bool:
        return bool(self.flags & OpsFlag.ENABLED)

    def covers(self, ip: int) -> bool:
        return (self.filter is None or ip in self.filter) and ip not in self.notrace
