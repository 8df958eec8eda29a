"""The composition root: builds one daemon (kernel, journal, service, broker link) and runs it.

``Daemon(settings).run()`` owns one TaskGroup with named tasks (``mqtt.bridge``, ``service.janitor``,
``app.ready``); ``stop()`` (SIGTERM/SIGINT when ``install_signals``) makes it publish ``offline`` and return.
Startup order: journal (boot sequence) -> kernel boot -> desired patches loaded and enabled again, then the
desired ftrace ops and hijacks -> replay of requests accepted and never answered -> broker (embedded when none
is configured) -> birth. Nothing here is process-global: a process may run many.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TextIO

import structlog

from daemon.emu.machine import VCpu
from daemon.emu.tlb import TlbMode
from daemon.errors import GuestPanic
from daemon.ftrace.core import Ftrace
from daemon.guest.build import GUEST_BUILDS
from daemon.kernel.kernel import Kernel, KernelConfig
from daemon.livepatch.core import Livepatch
from daemon.mqtt import BrokerConfig, EmbeddedBroker, MqttBridge
from daemon.service import Journal, Metrics, Service, kernel_identity
from daemon.service.ftrace import FtraceSubsystem
from daemon.service.kernel import KernelVerbs
from daemon.service.kprobes import KprobeSubsystem, RetprobeSubsystem
from daemon.service.livepatch import LivepatchSubsystem, trusted_keys
from daemon.service.livepatch.crash_guard import CrashLoopGuard, previous_panic, record_panic
from daemon.service.store import integrity
from daemon.service.store.checkpoint import Checkpointer
from daemon.service.store.desired import DesiredState
from daemon.settings import Settings

log = structlog.get_logger(__name__)

JANITOR_PERIOD_S = 2.0  # often and in small batches: a prune is one short transaction
PRUNE_BATCH = 250  # rows per prune: ~2 ms on the event loop
JANITOR_IDLE_PERIOD_S = 30.0  # a journal with no commit since the last pass: pruned by its time window this often
PRUNE_AGAIN_S = 0.05  # after a full batch: up to 5,000 rows/s, more than the daemon can accept


@functools.cache  # read once per process: package metadata lookups were ~20 ms of every fleet host's boot
def version() -> str:
    try:
        return metadata.version("livepatchd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def configure_logging(level: str = "info", stream: TextIO | None = None, fmt: str = "auto") -> None:
    """Log lines on stderr, with the bound context (host, request_id, verb). Called once, by the command.

    ``fmt``: ``console`` (human-readable), ``json`` (one object per line, for collectors), or ``auto``: console
    when the stream is a terminal. Third-party libraries log through the standard ``logging`` module (amqtt,
    asyncio, paho): a handler on the root logger renders their records with the same processors, so one
    session's output is one format, never JSON interleaved with plain text.
    """
    out = stream or sys.stderr
    human = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if human:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        shared.append(structlog.processors.format_exc_info)  # the console renderer prints tracebacks itself
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


Extension = Callable[[Service, Kernel], None]
"""Adds to a daemon's service for its kernel: more verbs (``service.serve(table)``), state sections, listeners."""


class _Crashed(Exception):
    """Raised inside the daemon's task group by ``crash()``: ends every task at once, with no graceful step."""


class Daemon:
    """One host: its emulated kernel, its journal, its MQTT identity (a fleet process holds many)."""

    def __init__(self, settings: Settings, *, install_signals: bool = False,
                 on_ready: Callable[[Daemon], None] | None = None,
                 extensions: Sequence[Extension] = (),
                 on_embedded_broker: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_embedded_broker = on_embedded_broker
        """Called with the URL of the embedded broker once it listens (``serve`` tells a terminal how to reach it)."""
        self.extensions = tuple(extensions)
        self.install_signals = install_signals
        self.on_ready = on_ready
        self.metrics = Metrics()
        self.kernel: Kernel | None = None
        self.ftrace: Ftrace | None = None
        self.livepatch: Livepatch | None = None
        self.desired: DesiredState | None = None
        self.service: Service | None = None
        self.bridge: MqttBridge | None = None
        self.broker_url: str | None = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stop_requested = False
        self._stop_lock = threading.Lock()
        """Orders ``stop()`` (any thread) and ``run()`` taking its loop: a stop asked for before the loop runs is
        kept and honoured at once (it was dropped: a daemon stopped right after its thread started ran on)."""
        self._crash = False
        self.crashed = False
        """True once ``run()`` returned after ``crash()``."""
        self.panic: GuestPanic | None = None
        """The guest panic that ended this boot (the daemon then crashed, as a panicked host dies)."""
        self._boot_seq = 0
        self._context: contextvars.Context | None = None

    def crash(self) -> None:
        """Die abruptly (an injected fault): the broker connection is cut without DISCONNECT, so the broker
        publishes the last will; nothing more is published, no request is drained. Call on the daemon's loop."""
        self._crash = True
        self._stop.set()

    def stop(self) -> None:
        """Ask the daemon to shut down (from any thread)."""
        with self._stop_lock:
            self._stop_requested = True
            loop = self._loop
            if loop is None or loop.is_closed():
                return  # run() sets the event when it starts (or has ended already)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: run() has ended
                loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        s = self.settings
        with self._stop_lock:
            self._loop = asyncio.get_running_loop()
            if self._stop_requested:
                self._stop.set()
        structlog.contextvars.bind_contextvars(host=s.host_id)
        self._context = contextvars.copy_context()  # a panic reported from a vCPU thread is logged with the host
        # off the loop: creating and fsyncing the journal and desired state is 50-150 ms of disk waits, which a
        # fleet's other hosts (on the same loop) would wait through too
        journal, desired, boot_seq = await asyncio.to_thread(open_state, s)
        self._boot_seq = boot_seq
        self.desired = desired  # re-applied at boot
        try:
            log.info("daemon_starting", boot_seq=boot_seq, state_dir=str(s.state_dir), nr_cpus=s.nr_cpus,
                     kernel_build=s.kernel_build)
            if self._stop.is_set():  # stopped before it started: no kernel to boot only to shut it down
                return
            self.kernel = await asyncio.to_thread(lambda: Kernel(KernelConfig(
                nr_cpus=s.nr_cpus, image=GUEST_BUILDS[s.kernel_build].image,
                count_instructions=s.count_guest_instructions, tcg_buffer_size=s.tcg_buffer_size_mb << 20,
                tlb_mode=TlbMode(s.tlb_mode))).boot())
            self.kernel.machine.on_vcpu_stopped.append(self._vcpu_stopped)
            if s.count_guest_instructions:
                vcpus = self.kernel.machine.vcpus
                self.metrics.guest_instructions.set_function(lambda: sum(v.instructions for v in vcpus))
            else:
                self.metrics.registry.unregister(self.metrics.guest_instructions)
            try:
                await self._serve(journal, self.kernel, boot_seq)
            finally:
                await asyncio.to_thread(self.kernel.shutdown)
        finally:
            journal.close()
            desired.close()
            log.info("daemon_stopped")

    async def _serve(self, journal: Journal, kernel: Kernel, boot_seq: int) -> None:
        s = self.settings
        service = self.service = Service(
            host=s.host_id, boot_seq=boot_seq, journal=journal, metrics=self.metrics,
            kernel=kernel_identity(build_id=kernel.image.build_id, release=s.kernel_release or s.kernel_build,
                                   nr_cpus=s.nr_cpus, booted_at=time.time()),
            max_payload_bytes=s.max_payload_bytes, request_timeout_s=s.request_timeout_s,
            read_fast_path=s.read_fast_path, fsync=not s.unsafe_skip_fsync, desired=self.desired)
        try:
            await self._run_service(service, journal, kernel, boot_seq)
        finally:
            service.close()

    async def _run_service(self, service: Service, journal: Journal, kernel: Kernel, boot_seq: int) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        service.attach(loop)
        if s.labels:  # what a fleet selects this host by (rollout targets, dashboard grouping)
            service.state.set_component("labels", dict(s.labels))
        # Each subsystem is built with what it uses and hands the service its verb table.
        service.serve(KernelVerbs(service, kernel, version=version(), call_timeout_s=s.call_timeout_s,
                                  allow_any_call=s.allow_any_call).verbs())
        self.ftrace = ftrace = await asyncio.to_thread(Ftrace, kernel)
        keys = trusted_keys(s.trusted_key_paths(), dev_key_dir=s.host_dir if s.dev_signing_key else None)
        self.livepatch = livepatch = Livepatch(kernel, ftrace, trusted_keys=keys, stall_after_s=s.transition_stall_s)
        ftrace_api = FtraceSubsystem(service, kernel, ftrace, desired=self.desired)
        service.serve(ftrace_api.verbs())
        guard = CrashLoopGuard(previous_panic(s.host_dir, boot_seq), s.crash_loop_grace_s)
        patches = LivepatchSubsystem(service, kernel, livepatch, desired=self.desired, guard=guard,
                                     restore_timeout_s=s.patch_restore_timeout_s,
                                     also_publish=[ftrace_api.publish])  # a patch's klp ops are ftrace ops too
        service.serve(patches.verbs())
        probes = KprobeSubsystem(service, kernel, desired=self.desired)
        service.serve(probes.verbs())
        retprobes = RetprobeSubsystem(service, kernel, probes.kprobes, ftrace, desired=self.desired)
        probes.stream_sources.append(retprobes.stream_lines)  # fprobe records on kprobe.stream too
        service.serve(retprobes.verbs())
        for extend in self.extensions:  # more verbs (a fleet host's faults, a test's), registered before any replay
            extend(service, kernel)
        await asyncio.to_thread(patches.restore)  # the desired patches, loaded and enabled again (load-at-boot)
        await asyncio.to_thread(ftrace_api.restore)  # then the desired ftrace ops and hijacks
        await asyncio.to_thread(probes.restore)  # and the desired kprobes (after ftrace's init of the sites)
        await asyncio.to_thread(retprobes.restore)  # kretprobes and fprobes
        replayed = await service.replay()
        # The image, kallsyms and the kernel's objects live as long as the daemon: keep them out of the cyclic
        # GC's generations, whose full collections otherwise stall a request now and then for tens of ms.
        gc.freeze()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(ftrace_api.close)  # the trace drainer, if a trace is running
            stack.callback(probes.close)  # the probe stream's drainer, if streaming
            config = await self._broker(stack)
            if s.metrics_port is not None:
                server = self.metrics.serve(s.metrics_addr, s.metrics_port)
                stack.callback(server.close)
                self.metrics_port = server.port
            if self.install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._stop.set)
                    stack.callback(loop.remove_signal_handler, sig)
            bridge = self.bridge = MqttBridge(service, config, version=version(), grace_s=s.shutdown_grace_s,
                                              max_concurrent=s.max_concurrent_requests, heartbeat_s=s.heartbeat_s,
                                              status_expiry_s=s.status_expiry_s)
            service.events.emit("daemon.started", boot_seq=boot_seq, replayed=replayed)
            try:
                await self._tasks(service, journal, bridge)
            except* _Crashed:
                self.crashed = True

    async def _tasks(self, service: Service, journal: Journal, bridge: MqttBridge) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(bridge.run(), name="mqtt.bridge")
            janitor = tg.create_task(self._janitor(service), name="service.janitor")
            checkpointer = tg.create_task(Checkpointer(journal, metrics=service.metrics).run(),
                                           name="service.checkpointer")
            ready = tg.create_task(self._ready(bridge), name="app.ready")
            await self._stop.wait()
            if self._crash:
                log.warning("daemon_crashed")
                bridge.sever()
                raise _Crashed  # the group cancels every task at once, as a dead process's would stop
            log.info("daemon_stopping")
            service.events.emit("daemon.stopping", reason="requested")
            ready.cancel()
            janitor.cancel()
            checkpointer.cancel()
            bridge.stop()

    def _vcpu_stopped(self, vcpu: VCpu) -> None:
        """On the vCPU's thread: a vCPU that stopped on a guest panic takes the whole host down with it; one that
        died otherwise (a fault outside a job) leaves the host serving on the others, degraded (status, state,
        info say which)."""
        loop = self._loop
        if isinstance(vcpu.error, GuestPanic) and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._panicked, vcpu.error, context=self._context)
        elif vcpu.error is not None and self.service is not None:
            log.error("vcpu_dead", cpu=vcpu.index, error=str(vcpu.error))
            self.service.state.cpu_died(vcpu.index)

    def _panicked(self, error: GuestPanic) -> None:
        if self.panic is not None or (self._stop.is_set() and not self._crash):
            return
        self.panic = error
        log.error("kernel_panic", message=error.message, details=error.details)
        try:  # what the crash-loop guard reads at the next boot
            record_panic(self.settings.host_dir, self._boot_seq, error.message)
        except OSError as exc:
            log.error("panic_record_failed", error=str(exc))
        self.crash()

    async def _broker(self, stack: contextlib.AsyncExitStack) -> BrokerConfig:
        s = self.settings
        nodes = s.brokers()
        if nodes is None:
            embedded = await stack.enter_async_context(EmbeddedBroker())
            self.broker_url = embedded.url
            log.info("embedded_broker_started", url=embedded.url)
            if self.on_embedded_broker is not None:
                self.on_embedded_broker(embedded.url)
            # amqtt speaks 3.1.1 only: never offer it 5
            return BrokerConfig.loopback(embedded.port, protocol="3.1.1", keepalive_s=s.keepalive_s,
                                         reconnect_min_s=s.reconnect_min_s, reconnect_max_s=s.reconnect_max_s)
        self.broker_url = ",".join(node.url for node in nodes)
        return BrokerConfig(nodes, tls_context=s.tls_context(), protocol=s.mqtt_protocol, keepalive_s=s.keepalive_s,
                            session_expiry_s=s.session_expiry_s, reconnect_min_s=s.reconnect_min_s,
                            reconnect_max_s=s.reconnect_max_s)

    async def _ready(self, bridge: MqttBridge) -> None:
        await bridge.online.wait()
        log.info("daemon_online", broker=self.broker_url, metrics_port=self.metrics_port)
        if self.on_ready is not None:
            self.on_ready(self)

    async def _janitor(self, service: Service) -> None:
        journal, metrics = service.journal, service.metrics
        metrics_due = 0.0
        pruned = 0
        seen_commit: float | None = None  # the first pass always runs (the size metrics are set at once)
        full_pass = time.monotonic()
        while True:
            # a full batch: more is waiting (under sustained load requests arrive faster than one batch per
            # period); small batches keep each prune, which runs on the event loop, to a couple of ms
            await asyncio.sleep(PRUNE_AGAIN_S if pruned >= PRUNE_BATCH else JANITOR_PERIOD_S)
            now = time.monotonic()
            if pruned < PRUNE_BATCH and journal.last_commit == seen_commit and now - full_pass < JANITOR_IDLE_PERIOD_S:
                continue  # nothing new: only the time window moved (a fleet process holds a thousand journals)
            seen_commit, full_pass = journal.last_commit, now
            try:
                pruned = journal.prune(self.settings.journal_keep, self.settings.journal_keep_s, batch=PRUNE_BATCH)
            except sqlite3.OperationalError as exc:  # a full disk: pruning frees nothing until it can write
                log.warning("journal_prune_failed", error=str(exc))
                pruned = 0
            if pruned:
                metrics.journal_pruned.inc(pruned)
                log.debug("journal_pruned", requests=pruned)
            now = time.monotonic()
            if now >= metrics_due:
                metrics_due = now + JANITOR_PERIOD_S
                metrics.journal_rows.set(journal.rows())
                metrics.journal_bytes.labels("db").set(journal.db_bytes())
                metrics.journal_bytes.labels("wal").set(journal.wal_bytes())


def open_state(s: Settings) -> tuple[Journal, DesiredState, int]:
    """Check, then open this host's journal and desired state and count this start; StateError (a message
    naming the file and what to do) when that is impossible: damaged files, a full or read-only disk."""
    problems = integrity.check(s.journal_path, s.desired_path)
    if problems:
        raise integrity.refuse(problems)
    journal: Journal | None = None
    desired: DesiredState | None = None
    try:
        journal = Journal(s.journal_path, durable=s.journal_durable)
        desired = DesiredState(s.desired_path, durable=s.journal_durable, fsync=not s.unsafe_skip_fsync)
        boot_seq = journal.next_boot_seq()
        if journal.pending:
            raise sqlite3.OperationalError("database or disk is full")
        desired.mark_boot(boot_seq)
    except (OSError, sqlite3.Error) as exc:
        for db in (journal, desired):
            with contextlib.suppress(Exception):
                if db is not None:
                    db.close()
        raise integrity.StateError(_why(s, exc)) from None
    return journal, desired, boot_seq


def _why(s: Settings, exc: BaseException) -> str:
    text = str(exc)
    reason = (exc.strerror or "") if isinstance(exc, OSError) else text  # without the path, which may say anything
    code = exc.errno if isinstance(exc, OSError) else None
    if code == 28 or (code is None and "full" in reason):
        what = "the file system is full"
    elif code in (13, 30) or (code is None and "readonly" in reason):
        what = "it is read-only or not writable (cannot write)"
    else:
        what = text
    return (f"cannot use the state directory {s.host_dir}: {what} ({text}). Free space or fix its permissions "
            "(or choose another with --state-dir), then start again.")


def serve(settings: Settings) -> int:
    """``livepatchd serve``: run one daemon until SIGTERM/SIGINT."""
    configure_logging(settings.log_level, fmt=settings.log_format)
    # The process's own setting, so here and not in Daemon (a test process runs many daemons in threads): the
    # event loop hands the GIL to a handler thread on every socket or SQLite call, and waits the switch
    # interval to get it back while that thread computes (an update plan, a filter): CPython's 5 ms, several
    # times per request, was most of a read's latency under a mixed load (bench.mixed_load).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)

    def tell_lpctl(url: str) -> None:  # the one thing a new user needs from the first screen of output
        print(f"export LPCTL_BROKER={url} LPCTL_HOST={settings.host_id}    # lpctl's way to this daemon",
              file=sys.stderr, flush=True)
    daemon = Daemon(settings, install_signals=True, on_embedded_broker=tell_lpctl if sys.stderr.isatty() else None)
    try:
        asyncio.run(daemon.run())
    except integrity.StateError as exc:
        print(f"livepatchd serve: {exc}", file=sys.stderr)
        return STATE_EXIT
    if daemon.panic is not None:
        print(f"livepatchd serve: the kernel panicked ({daemon.panic.message}); start again to reboot it",
              file=sys.stderr)
        return PANIC_EXIT
    return 0


STATE_EXIT = 3
"""``livepatchd serve``'s exit code when the state directory cannot be used (damaged, full, read-only)."""
PANIC_EXIT = 4
"""``livepatchd serve``'s exit code after its kernel panicked (a service manager restarts it: the reboot)."""
