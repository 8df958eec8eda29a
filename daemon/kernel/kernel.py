"""The booted emulated kernel: image in memory, the SMP machine, tasks, host jobs and stack traces.

The host runs a kernel function by posting a *job* to an idle worker task's mailbox (``job.fn/args``, then
``job.seq``) and kicking that worker's CPU; the worker calls the function in the guest and, when done, traps
with ``HC_JOB_DONE`` so the host's future resolves. No ``emu_start`` per call, no Python on the guest path.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from daemon.emu.machine import Machine, Resume, VCpu
from daemon.emu.memory import PAGE_SIZE, Backing, Memory, Perm, Region
from daemon.emu.tlb import DEFAULT_TLB_MODE, TlbMode
from daemon.errors import GuestCallTimeout, GuestError, GuestFault, GuestPanic, ImageError
from daemon.guest import abi
from daemon.guest.build import IMAGE_PATH
from daemon.kernel.heap import GuestAllocator
from daemon.kernel.image import KernelImage
from daemon.kernel.kallsyms import Kallsyms, Symbol
from daemon.kernel.structs import StructRef
from daemon.kernel.unwind import StackTrace, unwind
from daemon.kernel.worker import HostWorker

T = TypeVar("T")

HostCall = Callable[[int, int, int], None]
"""A guest host call's handler: (trapping CPU's index, first argument, second argument)."""

KIND_NAMES = {abi.TASK_KIND_IDLE: "idle", abi.TASK_KIND_WORKER: "worker", abi.TASK_KIND_LOADGEN: "loadgen"}


@dataclass(frozen=True)
class KernelConfig:
    """How to build one emulated kernel. Nothing here is process-global: many kernels may coexist."""

    nr_cpus: int = 2
    workers_per_cpu: int = 4
    loadgens_per_cpu: int = 1
    tcg_buffer_size: int = 32 << 20
    image: Path = IMAGE_PATH
    boot_timeout: float = 10.0
    count_instructions: bool = False  # block hook on every vCPU: exact counts, slow (benchmarks' counting runs)
    tlb_mode: TlbMode = DEFAULT_TLB_MODE  # the vCPUs' TLB (daemon.emu.tlb): virtual (fast stores) or cpu


@dataclass(frozen=True)
class TaskInfo:
    pid: int
    cpu: int
    kind: str
    comm: str
    addr: int
    waiting: bool
    running: bool  # current on its CPU


@dataclass
class _Job:
    fn: int
    args: tuple[int, ...]
    future: Future[int] = field(default_factory=Future)


@functools.lru_cache(maxsize=4)
def _load_image(path: Path, mtime_ns: int, size: int) -> tuple[KernelImage, Kallsyms]:
    """Parse an image once per process (it is immutable): a fleet of kernels shares one parse."""
    del mtime_ns, size  # part of the cache key only
    image = KernelImage.load(path)
    return image, Kallsyms((s.name, s.addr, s.size, s.kind == "func") for s in image.symbols)


_LOAD_LOCK = threading.Lock()
"""lru_cache does not hold back concurrent misses: without it, every host of a fleet booting at once on the
executor's threads parsed the same image (half of a fleet's boot time went there)."""


def load_image(path: Path) -> tuple[KernelImage, Kallsyms]:
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageError(f"cannot read kernel image {path}: {exc.strerror}", path=str(path)) from exc
    with _LOAD_LOCK:
        return _load_image(path.resolve(), st.st_mtime_ns, st.st_size)


def _page_up(x: int) -> int:
    return -(-x // PAGE_SIZE) * PAGE_SIZE


class Kernel:
    """One emulated arm64 kernel. ``boot()`` it, ``call()`` its functions, ``shutdown()`` when done."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()
        self.image, self.kallsyms = load_image(self.config.image)
        self.memory = Memory()
        self._map_image()
        # The module area: module text (r-x) then module data (rw-), one backing; the module loader takes
        # page-multiple blocks from their allocators, so every block stays page aligned.
        modules = Backing(abi.MODULES_SIZE)
        self.module_text = self.memory.add(
            Region("modules.text", abi.MODULES_VADDR, abi.MODULES_TEXT_SIZE, Perm.RX, modules))
        self.module_data = self.memory.add(Region("modules.data", abi.MODULES_DATA_VADDR, abi.MODULES_DATA_SIZE,
                                                  Perm.RW, modules, abi.MODULES_TEXT_SIZE))
        self.module_text_alloc = GuestAllocator(abi.MODULES_VADDR, abi.MODULES_TEXT_SIZE, "module text")
        self.module_data_alloc = GuestAllocator(abi.MODULES_DATA_VADDR, abi.MODULES_DATA_SIZE, "module data")
        self.cpu_data_addr = self.kallsyms.addr("cpu_data")
        self.tasks_addr = self.kallsyms.addr("tasks")
        self.boot_params = StructRef(self.memory, abi.boot_params, self.kallsyms.addr("boot_params"))
        self.host_buffer = GuestAllocator(self.kallsyms.addr("host_buffer"), abi.HOST_BUFFER_SIZE, "host buffer")
        self.heap_region = self.memory.add(
            Region("heap", abi.HEAP_VADDR, abi.HEAP_SIZE, Perm.RW, Backing(abi.HEAP_SIZE)))
        self.heap = GuestAllocator(abi.HEAP_VADDR, abi.HEAP_SIZE, "kernel heap")
        self.machine = Machine(self.memory, nr_cpus=self.config.nr_cpus, cpu_data_addr=self.cpu_data_addr,
                               tcg_buffer_size=self.config.tcg_buffer_size,
                               count_instructions=self.config.count_instructions,
                               tlb_mode=self.config.tlb_mode)
        self.machine.on_host_call(abi.HC_BOOTED, self._on_booted)
        self.machine.on_host_call(abi.HC_JOB_DONE, self._on_job_done)
        self.machine.on_host_call(abi.HC_PANIC, self._on_panic)
        self.machine.on_vcpu_stopped.append(self._fail_jobs)
        self.machine.on_fault = self._on_fault
        self.faults_recovered = 0
        self.worker = HostWorker()
        """The host's periodic work for this kernel (transition driver, trace drainer): stopped by shutdown()."""
        self._booted = threading.Event()
        self._started = False
        self._jobs_lock = threading.Lock()
        self._idle_workers: dict[int, list[int]] = {}
        self._running: dict[int, _Job] = {}
        self._pending: dict[int, collections.deque[_Job]] = {}

    # -- memory layout ---------------------------------------------------------------------------------------

    def _map_image(self) -> None:
        sym = self.kallsyms.addr
        base, srodata, sdata, end = abi.KIMAGE_VADDR, sym("_srodata"), sym("_sdata"), _page_up(sym("_end"))
        if sym("_text") != base:
            raise ImageError(f"image is linked at {sym('_text'):#x}, expected {base:#x}")
        backing = Backing(end - base)
        for section in self.image.sections.values():
            if section.data:
                off = section.addr - base
                backing.view[off : off + len(section.data)] = section.data
        self.text = self.memory.add(Region("kernel.text", base, srodata - base, Perm.RX, backing, 0))
        self.memory.add(Region("kernel.rodata", srodata, sdata - srodata, Perm.R, backing, srodata - base))
        self.memory.add(Region("kernel.data", sdata, end - sdata, Perm.RW, backing, sdata - base))

    def is_text(self, addr: int) -> bool:
        return self.text.contains(addr, 4) or self.module_text.contains(addr, 4)

    @property
    def text_ranges(self) -> tuple[tuple[int, int], ...]:
        """Guest ranges that may hold code: what a stop-machine batch invalidates."""
        return ((self.text.base, self.text.end), (self.module_text.base, self.module_text.end))

    # -- the machine, as the layers above see it -------------------------------------------------------------

    def stop_machine(self, callback: Callable[[], T], *, invalidate: Iterable[tuple[int, int]] = ()) -> T:
        """Run ``callback`` while every live CPU is parked at a safe point (Linux's stop_machine).

        ``invalidate`` lists guest ranges [begin, end) of text the callback may write: every CPU drops its
        translations of them before it resumes. If the callback raises, the CPUs resume all the same.
        """
        return self.machine.stop_machine(callback, invalidate)

    def on_host_call(self, reason: int, handler: HostCall) -> None:
        """Serve a guest host call (``abi.HC_*``): ``handler`` runs on the trapping CPU's thread."""
        self.machine.on_host_call(reason, lambda vcpu, a0, a1: handler(vcpu.index, a0, a1))

    @property
    def cpus_online(self) -> list[int]:
        """The CPUs still running (none once the kernel shut down)."""
        return [v.index for v in self.machine.vcpus if v.alive]

    @property
    def cpus_alive(self) -> bool:
        """Every CPU still runs (false once one died or the kernel shuts down)."""
        return all(v.alive for v in self.machine.vcpus)

    def kick(self, cpu: int) -> None:
        """Wake ``cpu`` if it idles: the host changed something its tasks wait for."""
        self.machine.kick(cpu)

    # -- boot and shutdown -----------------------------------------------------------------------------------

    def boot(self) -> Kernel:
        """Start the vCPUs and wait for the kernel to come up. A kernel boots once (its engines hold state)."""
        if self._started:
            raise GuestError("kernel already booted: a Kernel boots once; create another for a fresh machine")
        self._started = True
        cfg = self.config
        self.boot_params.set("nr_cpus", cfg.nr_cpus)
        self.boot_params.set("workers_per_cpu", cfg.workers_per_cpu)
        self.boot_params.set("loadgens_per_cpu", cfg.loadgens_per_cpu)
        self.machine.start(self.kallsyms.addr("primary_entry"), self.kallsyms.addr("secondary_entry"))
        if not self._booted.wait(cfg.boot_timeout):
            self.machine.check()
            raise GuestError(f"kernel did not boot within {cfg.boot_timeout} s")
        self.machine.check()
        for t in self.tasks():
            if t.kind == "worker":
                self._idle_workers.setdefault(t.cpu, []).append(t.addr)
        if cfg.tlb_mode is TlbMode.VIRTUAL:
            self._size_tlbs()
        return self

    TLB_SIZING_BYTES = 1536 << 10
    TLB_SIZING_ROUNDS = 3

    def _size_tlbs(self) -> None:
        """Grow every vCPU's TLB from QEMU's 256 entries to 2048 before any real work (~1 ms a vCPU).

        QEMU doubles a TLB only when it is flushed while more than 70 % full, and the machine flushes a TLB only
        at a host call after it churned (daemon.emu.tlb.grow_tlb_if_churning): a long job or a load generator
        would never let it grow. Each round zeroes 1,536 pages of a fresh heap block, which fills the TLB
        and makes the job's completion flush it: 256 -> 512 -> 1024 -> 2048 entries, room for the corpus walk's
        ~900 pages of text and tables.
        """
        scratch = self.heap.alloc(self.TLB_SIZING_BYTES)  # fresh heap: zero, so zeroing it changes nothing
        try:
            for _ in range(self.TLB_SIZING_ROUNDS):
                futures = [self.submit("memset", scratch, 0, self.TLB_SIZING_BYTES, cpu=c)
                           for c in range(self.config.nr_cpus)]
                for f in futures:
                    f.result(self.config.boot_timeout)
        finally:
            self.heap.free(scratch, self.TLB_SIZING_BYTES)

    def shutdown(self) -> None:
        """Stop the host's work on this kernel, then its vCPUs (every thread of the kernel ends here)."""
        self.worker.stop()
        self.machine.shutdown()

    def __enter__(self) -> Kernel:
        return self if self._started else self.boot()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _on_booted(self, _vcpu: VCpu, _ncpus: int, _ntasks: int) -> None:
        self._booted.set()

    def _on_panic(self, vcpu: VCpu, msg: int, value: int) -> None:
        text = self.memory.read_cstr(msg)
        raise GuestPanic(f"guest panic on vCPU {vcpu.index}: {text} ({value:#x})", cpu=vcpu.index, message=text,
                         value=value)

    # -- tasks -----------------------------------------------------------------------------------------------

    def task(self, index: int) -> StructRef:
        return StructRef(self.memory, abi.task_struct, self.tasks_addr + index * abi.task_struct.size)

    def task_refs(self) -> list[StructRef]:
        """Every task's struct, in the order of the task table (idle tasks first, as the guest boots them)."""
        return [self.task(i) for i in range(self.boot_params.get("nr_tasks"))]

    def cpu(self, index: int) -> StructRef:
        return StructRef(self.memory, abi.cpu_data, self.cpu_data_addr + index * abi.cpu_data.size)

    def tasks(self) -> list[TaskInfo]:
        current = {self.cpu(c).get("current") for c in range(self.config.nr_cpus)}
        out = []
        for i in range(self.boot_params.get("nr_tasks")):
            t = self.task(i)
            out.append(TaskInfo(
                pid=t.get("pid"), cpu=t.get("cpu"), kind=KIND_NAMES.get(t.get("kind"), "?"),
                comm=t.get_bytes("comm").split(b"\0", 1)[0].decode(), addr=t.addr,
                waiting=t.get("state") in (abi.TASK_WAITING, abi.TASK_INTERRUPTIBLE), running=t.addr in current))
        return out

    def stack_of(self, task: StructRef) -> StackTrace:
        """The task's stack: from its saved context, or from its CPU's trap frame if it is current there.

        Only meaningful while the task cannot move: it is asleep, or its CPU is parked (inside stop_machine).
        """
        cpu = self.cpu(task.get("cpu"))
        if cpu.get("current") == task.addr:
            pc, fp = cpu.get("trap.lr"), cpu.get("trap.fp")
        else:
            pc, fp = task.get("cpu_context.pc"), task.get("cpu_context.fp")
        return self._unwind(task, pc, fp)

    def _unwind(self, task: StructRef, pc: int, fp: int) -> StackTrace:
        hooks = [self.kallsyms.addr(n) for n in ("__kretprobe_trampoline", "arch_rethook_trampoline")
                 if n in self.kallsyms]
        return unwind(self.memory, pc=pc, fp=fp, stack_lo=task.get("stack_lo"), stack_hi=task.get("stack_hi"),
                      is_text=self.is_text, return_hook=self.kallsyms.addr("return_to_handler"),
                      ret_stack=self.ret_stack_of(task), retprobe_hooks=hooks,
                      retprobe_instances=self.kretprobe_instances_of(task))

    def kretprobe_instances_of(self, task: StructRef) -> list[tuple[int, int]]:
        """The task's hijacked returns (kretprobes), bottom first: (real return address, caller's fp)."""
        ri = abi.kretprobe_instance
        out: list[tuple[int, int]] = []
        a = task.get("kretprobe_instances")
        while a and len(out) < abi.KRETPROBE_INSTANCES_MAX:
            out.append((self.memory.read_u64(a + ri.offsetof("ret_addr")), self.memory.read_u64(a + ri.offsetof("fp"))))
            a = self.memory.read_u64(a + ri.offsetof("next"))
        return out[::-1]

    def ret_stack_of(self, task: StructRef) -> list[tuple[int, int]]:
        """The task's hooked returns (function_graph), bottom first: (original return address, caller's fp)."""
        depth = min(task.get("curr_ret_stack"), abi.FTRACE_RETFUNC_DEPTH)
        base = task.addr + abi.task_struct.offsetof("ret_stack")
        size, ret, fp = abi.ftrace_ret_stack.size, abi.ftrace_ret_stack.offsetof("ret"), \
            abi.ftrace_ret_stack.offsetof("fp")
        return [(self.memory.read_u64(base + i * size + ret), self.memory.read_u64(base + i * size + fp))
                for i in range(depth)]

    # -- host jobs -------------------------------------------------------------------------------------------

    def resolve(self, fn: str | int) -> int:
        if isinstance(fn, int):
            return fn
        sym: Symbol = self.kallsyms.lookup(fn)
        return sym.addr

    def submit(self, fn: str | int, *args: int, cpu: int = 0) -> Future[int]:
        """Run ``fn(*args)`` on a worker task of ``cpu``; the future gets its return value (x0)."""
        if not 0 <= cpu < self.config.nr_cpus:
            raise GuestError(f"no CPU {cpu} (this kernel has {self.config.nr_cpus})", cpu=cpu)
        if len(args) > abi.NR_JOB_ARGS:
            raise GuestError(f"at most {abi.NR_JOB_ARGS} arguments", count=len(args))
        if not self.machine.vcpus[cpu].alive:
            raise GuestError(f"CPU {cpu} is not running", cpu=cpu)
        job = _Job(self.resolve(fn), tuple(a & 0xFFFF_FFFF_FFFF_FFFF for a in args))
        with self._jobs_lock:
            idle = self._idle_workers.get(cpu)
            if not idle:
                self._pending.setdefault(cpu, collections.deque()).append(job)
                return job.future
            worker = idle.pop()
        self._post(worker, cpu, job)
        return job.future

    def call(self, fn: str | int, *args: int, cpu: int = 0, timeout: float = 10.0) -> int:
        """Run ``fn(*args)`` in the guest and wait for its result (``GuestCallTimeout`` after ``timeout`` s)."""
        future = self.submit(fn, *args, cpu=cpu)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # the vCPU died in the meantime: its error, not a timeout
                return future.result()
            addr = self.resolve(fn)
            sym = self.kallsyms.containing(addr)
            name = sym.name if sym is not None and sym.addr == addr else self.kallsyms.describe(addr)
            raise GuestCallTimeout(
                f"{name} ({addr:#x}) on CPU {cpu} did not return within {timeout} s; it keeps running on its "
                "worker until it returns", job=future, function=name, address=f"{addr:#x}", cpu=cpu,
                timeout_s=timeout) from None

    def _post(self, worker: int, cpu: int, job: _Job) -> None:
        t = StructRef(self.memory, abi.task_struct, worker)
        t.set("job.fn", job.fn)
        for i in range(abi.NR_JOB_ARGS):
            t.set("job.args", job.args[i] if i < len(job.args) else 0, index=i)
        t.set("job.notify", 1)
        with self._jobs_lock:
            self._running[worker] = job
        t.set("job.seq", t.get("job.seq") + 1)  # last: publishes the job to the guest
        self.machine.kick(cpu)

    def _on_job_done(self, vcpu: VCpu, worker: int, _seq: int) -> None:
        t = StructRef(self.memory, abi.task_struct, worker)
        result = t.get("job.ret")
        with self._jobs_lock:
            job = self._running.pop(worker)
            pending = self._pending.get(vcpu.index)
            nxt = pending.popleft() if pending else None
            if nxt is None:
                self._idle_workers[vcpu.index].append(worker)
        if nxt is not None:
            self._post(worker, vcpu.index, nxt)
        job.future.set_result(result)

    def _on_fault(self, vcpu: VCpu, fault: GuestFault) -> Resume | None:
        """A fault on ``vcpu``: if its current task is a worker running a job, that job ends with the fault and
        the worker goes back to its mailbox (guest ``worker_fault_exit``, on its emptied stack), as Linux kills a
        kthread that oopses and runs on; a fault anywhere else (idle, a load generator) stops the vCPU."""
        task = StructRef(self.memory, abi.task_struct, self.cpu(vcpu.index).get("current"))
        if task.get("kind") != abi.TASK_KIND_WORKER or task.get("job.seq") == task.get("job.done"):
            return None
        with self._jobs_lock:
            job = self._running.pop(task.addr, None)
            if job is None:
                return None
            pending = self._pending.get(vcpu.index)
            nxt = pending.popleft() if pending else None
            if nxt is None:
                self._idle_workers[vcpu.index].append(task.addr)
        self._describe_fault(fault, task)
        task.set("job.ret", (-14) & 0xFFFF_FFFF_FFFF_FFFF)  # -EFAULT, for a reader of the mailbox
        task.set("job.done", task.get("job.seq"))  # before any next post: the restarted loop waits for a new seq
        if nxt is not None:
            self._post(task.addr, vcpu.index, nxt)
        self.faults_recovered += 1
        job.future.set_exception(fault)
        return Resume(self.kallsyms.addr("worker_fault_exit"), task.get("stack_hi") - 32)

    def _describe_fault(self, fault: GuestFault, task: StructRef) -> None:
        """Symbolize the fault (pc, the function it was in, the task's backtrace) for the reply."""
        d = fault.details
        d["symbol"] = self.kallsyms.describe(d["pc"])
        d["pid"] = task.get("pid")
        trace = self._unwind(task, d["pc"], d.pop("fp"))
        # return addresses are described at their call (pc - 4), like %pB: a call ending its function stays in it
        d["backtrace"] = [self.kallsyms.describe(pc if i == 0 else pc - 4) for i, pc in enumerate(trace.pcs)]
        fault.message = f"{fault.message} in {d['symbol']}"
        fault.args = (fault.message,)

    def _fail_jobs(self, vcpu: VCpu) -> None:
        """A vCPU stopped: its jobs can never finish; fail them with its error instead of letting them hang."""
        error = vcpu.error or GuestError(f"vCPU {vcpu.index} stopped", cpu=vcpu.index)
        with self._jobs_lock:
            doomed = [job for worker, job in self._running.items() if self._worker_cpu(worker) == vcpu.index]
            doomed += self._pending.pop(vcpu.index, collections.deque())
        for job in doomed:
            if not job.future.done():
                job.future.set_exception(error)

    def _worker_cpu(self, worker: int) -> int:
        return StructRef(self.memory, abi.task_struct, worker).get("cpu")

    # -- guest memory helpers --------------------------------------------------------------------------------

    def read_string(self, fn: str, size: int = 4096, cpu: int = 0) -> str:
        """Call ``fn(buf, size)`` (a reader like proc_cmdline_read) and return what it wrote into buf."""
        buf = self.host_buffer.alloc(size)
        try:
            n = self.call(fn, buf, size, cpu=cpu)
        except GuestCallTimeout as late:
            self.free_when_done(late.job, buf, size)
            raise
        except BaseException:
            self.host_buffer.free(buf, size)
            raise
        try:
            return self.memory.read(buf, min(n, size)).decode("utf-8", "replace")
        finally:
            self.host_buffer.free(buf, size)

    def free_when_done(self, job: Future[int], buf: int, size: int) -> None:
        """Give ``buf`` back to the host buffer once ``job`` (still writing into it) has returned."""
        job.add_done_callback(lambda _job: self.host_buffer.free(buf, size))

    # -- load generators -------------------------------------------------------------------------------------

    def loadgens(self) -> list[StructRef]:
        return [self.task(i) for i in range(self.boot_params.get("nr_tasks"))
                if self.task(i).get("kind") == abi.TASK_KIND_LOADGEN]

    def set_load(self, mode: int, cpus: Sequence[int] | None = None) -> None:
        """Start (LOADGEN_CORPUS / LOADGEN_MIX) or stop (LOADGEN_OFF) the load generators."""
        for t in self.loadgens():
            if cpus is None or t.get("cpu") in cpus:
                t.set("lg.mode", mode)
                self.machine.kick(t.get("cpu"))

    def load_stats(self) -> dict[str, int]:
        keys = ("rounds", "calls", "errors", "expect_hits")
        totals = dict.fromkeys(keys, 0)
        for t in self.loadgens():
            for k in keys:
                totals[k] += t.get(f"lg.{k}")
        totals["trace_hits"] = sum(self.cpu(c).get("trace_hits") for c in range(self.config.nr_cpus))
        return totals
