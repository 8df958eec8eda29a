"""The guest ABI: memory map, host-call numbers and every struct shared by guest C/asm and host Python.

This module is the single source of truth; ``python -m daemon.guest.build`` renders it into
``daemon/guest/include/generated/abi.h`` (checked by the C compiler with static asserts) before compiling.

Memory map (guest addresses; Unicorn runs the kernel at EL1 with the MMU off, so virtual == physical)::

    0xffff800000000000 +64 MiB    module text (r-x): executable sections and PLT veneers of loaded modules
    0xffff800004000000 +64 MiB    module data (rw-): their data, read-only data and bss
                                  The module area is 1.9 GiB below text, out of BL range of kernel text, as on
                                  real arm64: module calls into the kernel go through PLT veneers
    0xffff800080000000            kernel image: .text (r-x), .rodata (r--), .data/.bss (rw-), stacks in .bss
"""

from __future__ import annotations

from daemon.guest.layout import Struct, nested, u8, u32, u64

KIMAGE_VADDR = 0xFFFF_8000_8000_0000
HEAP_VADDR = 0xFFFF_8001_0000_0000  # host-allocated kernel data (ftrace ops, hashes, ring buffers): like vmalloc
HEAP_SIZE = 64 << 20
MODULES_VADDR = 0xFFFF_8000_0000_0000
MODULES_SIZE = 128 << 20
MODULES_TEXT_SIZE = MODULES_SIZE // 2  # first half r-x, second half rw-: no module page is writable and executable
MODULES_DATA_VADDR = MODULES_VADDR + MODULES_TEXT_SIZE
MODULES_DATA_SIZE = MODULES_SIZE - MODULES_TEXT_SIZE
PAGE_SIZE = 4096

MAX_CPUS = 8
MAX_TASKS = 96
MAX_TASKS_PER_CPU = 16
THREAD_SHIFT = 14
THREAD_SIZE = 1 << THREAD_SHIFT
HOST_BUFFER_SIZE = 256 << 10  # guest memory the host hands out for call arguments (strings, buffers)
TASK_COMM_LEN = 16
NR_JOB_ARGS = 8  # x0-x7: every argument AAPCS64 passes in registers

# Host calls: the guest stores a reason in its cpu_data.trap and executes `svc #0` (0.5 us into Python).
HC_BOOTED = 1  # arg0 = number of CPUs that came up
HC_PARK = 2  # a stop-machine request was seen at a safe point
HC_IDLE = 3  # nothing runnable: sleep until the host posts work (the host tracks its own posts)
HC_JOB_DONE = 4  # arg0 = task whose job completed (only when the host asked to be told)
HC_PANIC = 5  # arg0 = message (C string), arg1 = value
HC_SHADOW = 6  # arg0 = SHADOW_* operation, arg1 = struct klp_shadow_req *; the result comes back in trap.ret

TASK_KIND_IDLE = 0
TASK_KIND_WORKER = 1  # serves host jobs from its mailbox, like a kworker
TASK_KIND_LOADGEN = 2  # runs the self-checking workload in a loop

TASK_RUNNING = 0
TASK_WAITING = 1  # runnable again when *wait_addr != wait_val
TASK_INTERRUPTIBLE = 2  # the same, or when TIF_NOTIFY_SIGNAL is set (the wait then returns -ERESTARTSYS)

# task_struct.flags (thread flags)
TIF_PATCH_PENDING = 1 << 0  # livepatch: switch patch_state to klp_target_state at the next kernel exit
TIF_NOTIFY_SIGNAL = 1 << 1  # a fake signal: interruptible waits return so the task passes a kernel exit
ERESTARTSYS = 512  # returned (negated) by an interrupted wait; the worker restarts the job after the exit

# Livepatch per-task states (Linux KLP_TRANSITION_*); patch_state is u64, IDLE is all ones (-1)
KLP_TRANSITION_IDLE = (1 << 64) - 1
KLP_TRANSITION_UNPATCHED = 0
KLP_TRANSITION_PATCHED = 1

# Shadow-variable writers go through the host (its lock is klp_shadow_lock); readers walk the table in the guest
SHADOW_HASH_BITS = 7
SHADOW_RESERVE = 1  # allocate an unlinked, zeroed node for (obj, id), or return the linked one (req.existing)
SHADOW_LINK = 2  # publish a reserved node (or return the one another CPU linked first)
SHADOW_DISCARD = 3  # drop a reserved node (its constructor failed)
SHADOW_UNLINK = 4  # unhash (obj, id) and return it, or 0; freed after the next grace period
SHADOW_UNLINK_ID = 5  # unhash any node with this id and return it, or 0 (klp_shadow_free_all)

# ftrace_ops flags (Linux FTRACE_OPS_FL_*, same bits)
FTRACE_OPS_FL_ENABLED = 1 << 0
FTRACE_OPS_FL_DYNAMIC = 1 << 1
FTRACE_OPS_FL_RECURSION = 1 << 4
FTRACE_OPS_FL_STUB = 1 << 5
FTRACE_OPS_FL_REMOVING = 1 << 9
FTRACE_OPS_FL_IPMODIFY = 1 << 12
FTRACE_OPS_FL_PERMANENT = 1 << 16
FTRACE_OPS_FL_DIRECT = 1 << 17

CNTFRQ_HZ = 62_500_000  # cntvct_el0 ticks per second (the emulated generic timer's frequency)
TRACE_RECURSION_LIST = 1 << 0  # cpu_data.trace_recursion: inside ftrace_ops_list_func
TRACE_RECURSION_GRAPH = 1 << 1  # cpu_data.trace_recursion: inside ftrace_graph_func
FGRAPH_NOTRACE = 1 << 63  # task_struct.graph_state: beneath a set_graph_notrace function, nothing is hooked
FTRACE_RETFUNC_DEPTH = 50  # hooked returns a task can hold at once (deeper calls are not hooked, and counted)
# trace_entry.type
TRACE_FN = 0  # function tracer: a call (ip <- parent_ip at ts)
TRACE_GRAPH_ENT = 1  # function_graph: entry of ip at ts, depth = hooked returns below it on the task
TRACE_GRAPH_RET = 2  # function_graph: return of ip at ts, parent_ip = where it returned, duration in ticks
HASH_MULTIPLIER = 0x9E37_79B9_7F4A_7C15  # ftrace_hash bucket = ((ip >> 2) * HASH_MULTIPLIER) >> (64 - bits)

LOADGEN_OFF = 0
LOADGEN_CORPUS = 1  # call corpus functions and check each result
LOADGEN_MIX = 2  # corpus plus the kernel-like workload (cmdline rendering, getpid, call chains)

# kprobes (arm64 BRK probes, see daemon/kprobes): BRK immediates, kprobe kinds, handler flags, per-CPU status
KPROBES_BRK_IMM = 0x004  # the BRK a probe arms over the original instruction
KPROBES_BRK_SS_IMM = 0x006  # the BRK after the instruction in an out-of-line slot: single-step done
KRETPROBES_BRK_IMM = 0x007
KPROBE_MAX = 64  # probes registered at once (kprobe_table)
KPROBE_RING = 32  # register records kept per CPU (kprobe_ctlblk.ring, overwritten oldest first)
KP_STEP = 0  # run out of line in the probe's slot (instruction + BRK #KPROBES_BRK_SS_IMM)
KP_SIM_NOP = 1  # the rest are simulated in guest C: they read or write the PC
KP_SIM_B = 2  # B, BL
KP_SIM_BCOND = 3
KP_SIM_CBZ = 4  # CBZ, CBNZ (32 and 64 bit)
KP_SIM_TBZ = 5  # TBZ, TBNZ
KP_SIM_ADR = 6  # ADR, ADRP
KP_SIM_LDR_LIT = 7  # LDR (literal) w/x, LDRSW (literal)
KP_SIM_BR = 8  # BR, BLR, RET
KPF_ARMED = 1 << 0  # kprobe_table entry in use (the guest looks up armed entries only)
KPF_RECORD = 1 << 1  # pre handler: record pt_regs into this CPU's ring
KPF_SET_REG = 1 << 2  # pre handler: regs[set_reg] = set_val (fault injection)
KPF_CALL = 1 << 3  # pre handler: call call_fn(x0) (a handler running probed code: its hits are missed)
KPF_POST = 1 << 4  # post handler: count (and record, with KPF_RECORD)
KPROBE_HIT_ACTIVE = 1  # Linux's kprobe_status values
KPROBE_HIT_SS = 2
KPROBE_REENTER = 3
KPROBE_HIT_SSDONE = 4
KPF_KRETPROBE = 1 << 5  # pre handler: the entry of kretprobe kprobe.rp (hijack x30 to its trampoline)
KPROBE_FETCH_MAX = 4  # memory fetch args (+OFFS(%REG)) a probe's record reads at the hit
KPROBE_FETCH_VALID = 1 << 63  # kprobe.fetch[i] = VALID | base << 32 | (u32)offset; base: x0-x30, 31 sp, 32 pc
KPROBE_MEM_RANGES = 8  # readable guest ranges [lo, hi) the host lists for fetches (copy_from_kernel_nofault)
KPROBE_TRACE_RET = 2  # kprobe_trace.post of a kretprobe's return record (0: pre handler, 1: post handler)

# kretprobes (daemon/kprobes/kretprobes.py): a kprobe at the function's address whose pre handler takes an
# instance from the CPU's pool, saves x30 and x29 in it and points x30 at one of two trampolines
KRETPROBE_MAX = 16  # kretprobes registered at once (kretprobe_table)
KRETPROBE_MAXACTIVE_MAX = 256  # instances per CPU a kretprobe may ask for
KRETPROBE_INSTANCES_MAX = 4096  # instances a task may hold (the host's walk of a task's list stops there)
KRP_TRAMP_BRK = 0  # __kretprobe_trampoline: BRK #KRETPROBES_BRK_IMM, a genuine exception pt_regs (Linux 6.9+)
KRP_TRAMP_RETHOOK = 1  # arch_rethook_trampoline: registers saved by hand, pc and pstate synthesized (2016-6.8)
KRPF_ARMED = 1 << 0  # kretprobe_table entry live: returns run its handler
KRPF_RECORD = 1 << 1  # return handler: record pt_regs (x0 = the return value) into the CPU's kprobe ring
KRPF_USED = 1 << 2  # the entry's pool may still hold instances of hijacked returns (the host reuses it when not)

# fprobe (daemon/kprobes/fprobe.py): entry through an ftrace_ops, exit through the function-graph return hook
FTRACE_OPS_FL_SAVE_REGS = 1 << 2  # arm64 has no DYNAMIC_FTRACE_WITH_REGS: refused (-EINVAL)
FTRACE_OPS_FL_SAVE_REGS_IF_SUPPORTED = 1 << 3  # accepted: the callback gets ftrace_regs (args only)
TRACE_RECURSION_FPROBE = 1 << 2  # cpu_data.trace_recursion: inside an fprobe handler
FPROBE_MAX = 32  # fprobes registered at once (fprobe_table)
FPROBE_RING = 64  # fprobe records kept per CPU (fprobe_ctlblk.ring, overwritten oldest first)
FPF_ARMED = 1 << 0  # registered: handlers run (a return hooked before unregistering still returns, unhandled)
FPF_EXIT = 1 << 1  # hook the return (exit handler) as well as the entry
FPF_RECORD = 1 << 2  # record the args (entry) and the return value (exit) into the CPU's fprobe ring
ESR_ELX_EC_BRK64 = 0x3C

cpu_context = Struct(
    "cpu_context",
    [u64("x19_x28", 10), u64("fp"), u64("sp"), u64("pc")],
    doc="callee-saved registers of a switched-out task, as arm64's thread.cpu_context",
)

job = Struct(
    "job",
    [u64("seq"), u64("done"), u64("fn"), u64("args", NR_JOB_ARGS), u64("ret"), u64("notify")],
    doc="a worker's mailbox: the host writes fn/args then bumps seq; the worker bumps done",
)

loadgen = Struct(
    "loadgen",
    [u64("mode"), u64("rounds"), u64("calls"), u64("errors"), u64("expect_hits"), u64("seed"), u64("last_bad")],
    doc="a load generator's control word and its counters",
)

ftrace_ret_stack = Struct(
    "ftrace_ret_stack",
    [u64("ret"), u64("func"), u64("fp"), u64("calltime"), u64("fprobe", ctype="struct fprobe *")],
    doc="one hooked return: the original return address, the function, its caller's x29 (checked), entry time "
        "and the fprobe whose exit handler it is (NULL: the function_graph tracer's)",
)

task_struct = Struct(
    "task_struct",
    [
        nested("cpu_context", cpu_context),
        u64("pid"),
        u64("cpu"),
        u64("kind"),
        u64("state"),
        u64("wait_addr"),
        u64("wait_val"),
        u64("stack_lo"),
        u64("stack_hi"),
        u64("flags"),
        u64("patch_state"),
        u64("nr_switches"),
        nested("job", job),
        nested("lg", loadgen),
        u8("comm", TASK_COMM_LEN),
        u64("curr_ret_stack"),  # entries in use in ret_stack (the next call's depth)
        u64("trace_overrun"),  # calls not hooked because ret_stack was full
        u64("graph_state"),  # function_graph filters: the ret_stack depth just above the set_graph_function
        # entry the task is inside (0: outside), | FGRAPH_NOTRACE while the top entry is a set_graph_notrace one
        nested("ret_stack", ftrace_ret_stack, FTRACE_RETFUNC_DEPTH),
        u64("kretprobe_instances", ctype="struct kretprobe_instance *"),  # hijacked returns, newest first
    ],
    doc="one schedulable kernel task",
)

host_trap = Struct(
    "host_trap",
    [u64("reason"), u64("arg0"), u64("arg1"), u64("fp"), u64("lr"), u64("ret")],
    doc="why a vCPU trapped to the host, and its frame at the trap (for unwinding a parked task)",
)

ftrace_regs = Struct(
    "ftrace_regs",
    [u64("regs", 9), u64("direct_tramp"), u64("fp"), u64("lr"), u64("sp"), u64("pc")],
    doc="arm64 WITH_ARGS ftrace_regs: what ftrace_caller saves; writing pc redirects the traced call",
)

ftrace_hash = Struct(
    "ftrace_hash",
    [u64("size_bits"), u64("count"), u64("buckets")],
    doc="open-addressing set of record ips (0 = empty bucket), built by the host",
)

fgraph_hashes = Struct(
    "fgraph_hashes",
    [u64("function_hash", ctype="struct ftrace_hash *"), u64("notrace_hash", ctype="struct ftrace_hash *")],
    doc="set_graph_function / set_graph_notrace: the function_graph ops' private data; a NULL hash is not set",
)

ftrace_ops = Struct(
    "ftrace_ops",
    [
        u64("func"),  # first: ftrace_caller loads it at offset 0 (FTRACE_OPS_FUNC)
        u64("next", ctype="struct ftrace_ops *"),
        u64("flags"),
        u64("private"),
        u64("filter_hash", ctype="struct ftrace_hash *"),
        u64("notrace_hash", ctype="struct ftrace_hash *"),
        u64("direct_call"),
        u64("counts", MAX_CPUS),  # per-CPU hits, for counting callbacks
    ],
    doc="a registered callback with its filter and notrace hashes",
)

klp_func = Struct(
    "klp_func",
    [
        u64("new_func"),
        u64("below", ctype="struct klp_func *"),  # the next entry of the func_stack (an older patch), or NULL
        u64("transition"),
        u64("nop"),  # atomic replace: run the original function
        u64("calls", MAX_CPUS),  # per-CPU: calls klp_ftrace_handler sent to new_func (patch.effect)
    ],
    doc="one entry of a patched function's func_stack, as klp_ftrace_handler reads it",
)

klp_ops = Struct(
    "klp_ops",
    [
        u64("func_stack", ctype="struct klp_func *"),
        u64("old_func"),
        u64("orig_calls", MAX_CPUS),  # per-CPU: entries klp_ftrace_handler let through to the original
    ],
    doc="the private data of a patched function's ftrace_ops: the top of its func_stack",
)

klp_shadow = Struct(
    "klp_shadow",
    [u64("next", ctype="struct klp_shadow *"), u64("obj"), u64("id"), u64("data_size")],
    doc="a shadow variable; its data follows the header (16-byte aligned)",
)

klp_shadow_req = Struct(
    "klp_shadow_req",
    [u64("obj"), u64("id"), u64("data_size"), u64("node", ctype="struct klp_shadow *"), u64("existing"),
     u64("warn"), u64("err")],  # warn: klp_shadow_alloc (a duplicate is an error); err: the ctor's error
    doc="arguments and results of an HC_SHADOW host call",
)

ftrace_profile = Struct(
    "ftrace_profile",
    [u64("hash", ctype="struct ftrace_hash *"), u64("hits", ctype="u64 *")],
    doc="the function profiler's private data: hits[cpu << hash->size_bits | bucket] counts calls per function",
)

trace_entry = Struct(
    "trace_entry",
    [u64("ip"), u64("parent_ip"), u64("ts"), u64("pid_cpu"), u32("type"), u32("depth"), u64("duration")],
    doc="one tracer record (TRACE_FN or TRACE_GRAPH_ENT/RET); pid_cpu = pid << 8 | cpu",
)

ring_buffer = Struct(
    "ring_buffer",
    [u64("entries", ctype="struct trace_entry *"), u64("mask"), u64("head"), u64("tail"), u64("dropped")],
    doc="single-producer (this CPU) / single-consumer (host) ring of trace entries; full means drop newest",
)

cpu_data = Struct(
    "cpu_data",
    [
        u64("cpu"),
        u64("current", ctype="struct task_struct *"),
        u64("idle", ctype="struct task_struct *"),
        u64("stop_requested"),
        nested("trap", host_trap),
        u64("nr_tasks"),
        u64("tasks", MAX_TASKS_PER_CPU, ctype="struct task_struct *"),
        u64("rr"),
        u64("trace_hits"),
        u64("nr_switches"),
        u64("nr_idle"),
        u64("nr_parks"),
        u64("trace_recursion"),
        u64("recursion_misses"),
        nested("rb", ring_buffer),
        u64("pad", 3),
    ],
    doc="per-CPU data; TPIDR_EL1 holds its address",
)

boot_params = Struct(
    "boot_params",
    [
        u64("nr_cpus"),
        u64("workers_per_cpu"),
        u64("loadgens_per_cpu"),
        u64("secondaries_go"),
        u64("cpus_up"),
        u64("nr_tasks"),
        u64("count_armed"),
    ],
    doc="written by the host before boot; count_armed tells load generators that call sites count hits",
)

pt_regs = Struct(
    "pt_regs",
    [u64("regs", 31), u64("sp"), u64("pc"), u64("pstate")],
    doc="the registers a BRK exception saved (kprobes_entry.S): every GPR, sp, pc (ELR_EL1), pstate (SPSR_EL1)",
)

kprobe = Struct(
    "kprobe",
    [u64("addr"), u64("opcode"), u64("kind"), u64("slot"), u64("restore"), u64("flags"), u64("set_reg"),
     u64("set_val"), u64("call_fn"), u64("hits", MAX_CPUS), u64("nmissed", MAX_CPUS),
     u64("post_hits", MAX_CPUS), u64("rp", ctype="struct kretprobe *"), u64("fetch", KPROBE_FETCH_MAX)],
    doc="one registered kprobe: probed address, original instruction, KP_* kind, XOL slot (0: simulated), "
        "pc after stepping (addr + 4), KPF_* handler flags and per-CPU counters",
)

kprobe_trace = Struct(
    "kprobe_trace",
    [u64("ts"), u64("probe"), u64("cpu"), u64("post"), u64("pid"), u64("aux"), nested("regs", pt_regs),
     u64("mem", KPROBE_FETCH_MAX), u64("mem_fault")],
    doc="one register record of a KPF_RECORD probe: kprobe_table index, pre (post = 0), post handler (1) or "
        "kretprobe return (KPROBE_TRACE_RET, aux = ticks since the entry), the current task's pid, the memory "
        "fetches' u64s (bit i of mem_fault: fetch i was outside every readable range)",
)

kprobe_ctlblk = Struct(
    "kprobe_ctlblk",
    [u64("current", ctype="struct kprobe *"), u64("status"), u64("saved_irqflag"),
     u64("prev_kprobe", ctype="struct kprobe *"), u64("prev_status"), u64("ring_head"), u64("bugs"),
     u64("pad"), nested("ring", kprobe_trace, KPROBE_RING)],
    doc="per-CPU kprobe state (Linux's current_kprobe + kprobe_ctlblk) and its register ring",
)

kretprobe_instance = Struct(
    "kretprobe_instance",
    [u64("next", ctype="struct kretprobe_instance *"), u64("rp", ctype="struct kretprobe *"), u64("ret_addr"),
     u64("fp"), u64("entry_ts"), u64("cpu")],
    doc="one hijacked return: the real return address and the caller's x29 at entry (matched on return); on "
        "the task's list while live, on its CPU's free list otherwise",
)

kretprobe = Struct(
    "kretprobe",
    [u64("kp", ctype="struct kprobe *"), u64("trampoline"), u64("flags"), u64("maxactive"),
     u64("pool", ctype="struct kretprobe_instance *"), u64("free", MAX_CPUS, ctype="struct kretprobe_instance *"),
     u64("hits", MAX_CPUS), u64("nmissed", MAX_CPUS)],
    doc="a kretprobe: its entry kprobe, the trampoline address hijacked returns go to, KRPF_* flags, and "
        "per-CPU pools of maxactive instances (no cross-CPU atomics: tasks never migrate); hits are returns "
        "handled, nmissed entries with no free instance",
)

fprobe = Struct(
    "fprobe",
    [u64("flags"), u64("index"), u64("hits", MAX_CPUS), u64("exit_hits", MAX_CPUS), u64("nmissed", MAX_CPUS)],
    doc="an fprobe: the ftrace_ops' private data (FPF_* flags, the index its records carry, per-CPU counters; "
        "nmissed counts recursion and a full ret_stack)",
)

fprobe_trace = Struct(
    "fprobe_trace",
    [u64("ts"), u64("probe"), u64("pid"), u64("exit"), u64("ip"), u64("ret"), u64("args", 8), u64("sp"),
     u64("lr"), u64("retval"), u64("duration")],
    doc="one fprobe record: the ARGS only (x0-x7, sp, lr at entry; x0 at exit), never a pt_regs",
)

fprobe_ctlblk = Struct(
    "fprobe_ctlblk",
    [u64("head"), u64("pad"), nested("ring", fprobe_trace, FPROBE_RING)],
    doc="per-CPU fprobe record ring",
)

STRUCTS: list[Struct] = [cpu_context, job, loadgen, ftrace_ret_stack, task_struct, host_trap, ftrace_regs,
                         ftrace_hash, fgraph_hashes, ftrace_ops, ftrace_profile, klp_func, klp_ops, klp_shadow,
                         klp_shadow_req, trace_entry, ring_buffer, cpu_data, boot_params, pt_regs, kprobe,
                         kprobe_trace, kprobe_ctlblk, kretprobe_instance, kretprobe, fprobe, fprobe_trace,
                         fprobe_ctlblk]

CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.isupper() and isinstance(value, int) and not name.startswith("_")
}
