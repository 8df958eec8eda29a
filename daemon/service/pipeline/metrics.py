"""Prometheus metrics of one daemon, in its own registry (many daemons may share a process: no globals)."""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
"""Stop-machine pauses: p99 is a few ms even for 10,000 sites (bench/stop_machine)."""
LATENCY_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


TRANSITION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0)


@dataclass
class MetricsServer:
    server: Any
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class Metrics:
    """Request counts by verb and result, the request-path latency histogram, journal and broker counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lpd_requests", "Requests answered, by verb and result (ok or the error code)",
                                ["verb", "result"], registry=r)
        self.latency = Histogram("lpd_request_duration_seconds",
                                 "Time in the daemon per request: from the message taken off the socket queue to "
                                 "its reply handed to the MQTT client (the broker round trip excluded)",
                                 ["verb"], buckets=LATENCY_BUCKETS, registry=r)
        self.replayed = Counter("lpd_requests_replayed", "Requests re-executed from the journal after a restart",
                                registry=r)
        self.replies_dropped = Counter("lpd_replies_dropped", "Replies given up: they could not be published "
                                       "(a reply topic no broker takes, an unreadable journal row)", registry=r)
        self.duplicates = Counter("lpd_requests_duplicate", "Repeated request ids answered from the journal",
                                  registry=r)
        self.checkpoint = Histogram("lpd_journal_checkpoint_seconds", "WAL checkpoints of the journal (in their "
                                    "low-priority thread, beside the request path), by what started them (idle, "
                                    "backlog)", ["trigger"], buckets=PAUSE_BUCKETS, registry=r)
        self.storage_full = Counter("lpd_requests_storage_full", "Requests that found the state directory full "
                                    "(mutating ones refused with storage_full, reads served unjournaled)", registry=r)
        self.journal_rows = Gauge("lpd_journal_rows", "Requests kept in the journal (the dedup window)", registry=r)
        self.journal_bytes = Gauge("lpd_journal_bytes", "Size of the journal's files", ["file"], registry=r)
        self.journal_pruned = Counter("lpd_journal_pruned", "Answered requests pruned past the dedup window",
                                      registry=r)
        self.reconnects = Counter("lpd_mqtt_reconnects", "Successful broker connections after the first", registry=r)
        self.connected = Gauge("lpd_mqtt_connected", "1 while connected to the broker", registry=r)
        self.boot_seq = Gauge("lpd_boot_seq", "This run's boot sequence number", registry=r)
        self.guest_instructions = Gauge("lpd_guest_instructions", "Guest instructions executed by every vCPU since "
                                        "boot (counted only with count_guest_instructions; else absent)",
                                        registry=r)
        # -- ftrace verbs (daemon/service/ftrace_*.py) --
        self.batch_pause = Histogram("lpd_batch_pause_seconds",
                                     "Stop-machine pause of each text-patching batch a request applied (first vCPU "
                                     "parked to last resumed), by verb", ["verb"], buckets=PAUSE_BUCKETS, registry=r)
        self.trace_records = Counter("lpd_trace_records", "Function-tracer records drained from the guest rings",
                                     registry=r)
        self.trace_dropped = Counter("lpd_trace_dropped", "Function-tracer records lost: a guest ring was full "
                                     "(reason=ring) or the daemon's unread buffer was (reason=buffer)", ["reason"],
                                     registry=r)
        # -- patch verbs (daemon/service/patch_*.py) --
        self.livepatches = Gauge("lpd_livepatches", "Loaded live patches, by state (enabled, disabled, transition)",
                                 ["state"], registry=r)
        self.transitions = Counter("lpd_livepatch_transitions", "Livepatch transitions ended, by target (patched, "
                                   "unpatched) and how (completed, forced)", ["target", "how"], registry=r)
        self.transition_duration = Histogram("lpd_livepatch_transition_seconds", "Livepatch transitions, from start "
                                             "(or reversal) to completion, by target", ["target"],
                                             buckets=TRANSITION_BUCKETS, registry=r)
        self.transition_stalls = Counter("lpd_livepatch_transition_stalls", "Transitions reported stalled (blocked "
                                         "past the stall threshold)", registry=r)
        self.transition_reversals = Counter("lpd_livepatch_transition_reversals", "Transitions reversed, by "
                                            "whom (request, policy)", ["by"], registry=r)

    def serve(self, addr: str, port: int) -> MetricsServer:
        """Serve ``/metrics`` on ``addr:port`` (port 0: any free port; see ``.port``) in a daemon thread."""
        server, thread = start_http_server(port, addr, registry=self.registry)
        return MetricsServer(server, thread)
