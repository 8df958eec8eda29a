"""What the ftrace verbs report about a change: the functions an ops covers, and the stop-machine batches the
change applied (each pause observed in the metrics too)."""

from __future__ import annotations

from daemon.ftrace import BatchResult, Ftrace, FtraceOps
from daemon.service.pipeline.metrics import Metrics
from schemas.ftrace import BatchInfo


def batch_info(results: list[BatchResult | None]) -> BatchInfo | None:
    done = [r for r in results if r is not None]
    if not done:
        return None
    return BatchInfo(sites=sum(r.sites for r in done), data=sum(r.data for r in done),
                     pause_us=round(sum(r.pause_ns for r in done) / 1000, 1))


class Counts:
    """The counts of one kernel's ftrace, and the metrics its batches are observed in."""

    def __init__(self, ftrace: Ftrace, metrics: Metrics) -> None:
        self.ftrace = ftrace
        self.metrics = metrics

    def functions(self, ops: FtraceOps) -> int:
        """How many functions ``ops`` covers (its filter, or every record, minus its notrace set)."""
        base = ops.filter if ops.filter else self.ftrace.by_ip.keys()
        return sum(1 for ip in base if ip not in ops.notrace and ip in self.ftrace.by_ip)

    def batch(self, verb: str, *results: BatchResult | None) -> BatchInfo | None:
        """The batches of one verb's change, as its reply tells them (pauses observed in ``lpd_batch_pause``)."""
        for r in results:
            if r is not None and r.pause_ns:
                self.metrics.batch_pause.labels(verb).observe(r.pause_ns / 1e9)
        return batch_info(list(results))
