"""What one ftrace update cost: the result type of every ftrace call that patches call sites."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.arch.arm64 import patching


@dataclass(frozen=True)
class BatchResult:
    """One stop-machine batch: ``sites`` instructions rewritten, ``data`` words stored, the pause it took.

    ftrace's own type, so that its users (livepatch, the service) need not know the architecture's text patcher.
    """

    sites: int
    data: int
    pause_ns: int

    @classmethod
    def of(cls, result: patching.BatchResult) -> BatchResult:
        return cls(result.sites, result.data, result.pause_ns)
