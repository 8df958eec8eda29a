/*
 * Tasks and the per-CPU scheduler.
 *
 * Each CPU owns a fixed list of tasks: its idle task (tasks[cpu]), worker tasks that run host jobs from a
 * mailbox, and load generators. Scheduling is cooperative: a task gives up the CPU in schedule(), called
 * from wait_on() and cond_resched(). schedule() is also the safe point where a CPU parks for stop-machine,
 * so no CPU is ever parked in the middle of a function's prologue or of a half-written call site.
 */
#include "kernel.h"

struct cpu_data cpu_data[MAX_CPUS];
struct task_struct tasks[MAX_TASKS];
struct boot_params boot_params;
u8 task_stacks[MAX_TASKS][THREAD_SIZE] __aligned(THREAD_SIZE) __section(".bss..stacks");
u8 host_buffer[HOST_BUFFER_SIZE] __aligned(4096);

void worker_main(u64 arg);
void loadgen_main(u64 arg);

notrace static int task_runnable(const struct task_struct *t)
{
	u64 state = READ_ONCE(t->state);

	if (state == TASK_RUNNING)
		return 1;
	if (state == TASK_INTERRUPTIBLE && (READ_ONCE(t->flags) & TIF_NOTIFY_SIGNAL))
		return 1;
	return READ_ONCE(*(volatile u64 *)t->wait_addr) != t->wait_val;
}

/* The next runnable non-idle task after prev in round-robin order; prev itself if only it; else idle. */
notrace static struct task_struct *pick_next_task(struct cpu_data *c, struct task_struct *prev)
{
	u64 n = c->nr_tasks;

	for (u64 i = 1; i <= n; i++) {
		u64 idx = (c->rr + i) % n;
		struct task_struct *t = c->tasks[idx];

		if (t != c->idle && task_runnable(t)) {
			c->rr = idx;
			return t;
		}
	}
	return c->idle;
}

notrace void schedule(void)
{
	struct cpu_data *c = this_cpu();
	struct task_struct *prev = c->current;
	struct task_struct *next;

	if (READ_ONCE(c->stop_requested))
		host_call(HC_PARK, 0, 0);
	next = pick_next_task(c, prev);
	if (next == prev)
		return;
	c->current = next;
	c->nr_switches++;
	next->nr_switches++;
	cpu_switch_to(prev, next);
}

notrace void cond_resched(void)
{
	schedule();
}

/* Sleep while *addr == val. The host (or another task) changes *addr to wake us. */
notrace void wait_on(volatile u64 *addr, u64 val)
{
	struct task_struct *t = current_task();

	while (READ_ONCE(*addr) == val) {
		t->wait_addr = (u64)addr;
		t->wait_val = val;
		WRITE_ONCE(t->state, TASK_WAITING);
		schedule();
		WRITE_ONCE(t->state, TASK_RUNNING);
	}
}

/*
 * The same, but a fake signal (TIF_NOTIFY_SIGNAL, sent by livepatch to stalled tasks) ends the wait early:
 * returns -ERESTARTSYS, which callers pass up so the task leaves the kernel and its job is restarted.
 */
notrace u64 wait_on_interruptible(volatile u64 *addr, u64 val)
{
	struct task_struct *t = current_task();

	while (READ_ONCE(*addr) == val) {
		if (READ_ONCE(t->flags) & TIF_NOTIFY_SIGNAL)
			return -(u64)ERESTARTSYS;
		t->wait_addr = (u64)addr;
		t->wait_val = val;
		WRITE_ONCE(t->state, TASK_INTERRUPTIBLE);
		schedule();
		WRITE_ONCE(t->state, TASK_RUNNING);
	}
	return 0;
}

notrace void panic(const char *msg, u64 value)
{
	for (;;) {
		host_call(HC_PANIC, (u64)msg, value);
		__builtin_trap();
	}
}

notrace static void cpu_idle(struct cpu_data *c)
{
	for (;;) {
		klp_update_patch_state(c->idle);
		schedule();
		if (pick_next_task(c, c->idle) == c->idle && !READ_ONCE(c->stop_requested))
			host_call(HC_IDLE, 0, 0);
	}
}

notrace static void task_init(struct task_struct *t, u64 pid, u64 cpu, u64 kind, void (*body)(u64), const char *comm)
{
	u64 lo = (u64)task_stacks[pid];
	u64 hi = lo + THREAD_SIZE;
	u64 *final_frame = (u64 *)(hi - 16);

	memset(t, 0, sizeof(*t));
	t->pid = pid;
	t->cpu = cpu;
	t->kind = kind;
	t->state = TASK_RUNNING;
	t->patch_state = KLP_TRANSITION_IDLE;
	t->stack_lo = lo;
	t->stack_hi = hi;
	final_frame[0] = 0;
	final_frame[1] = 0;
	t->cpu_context.x19_x28[0] = (u64)body;
	t->cpu_context.x19_x28[1] = pid;
	t->cpu_context.fp = (u64)final_frame;
	t->cpu_context.sp = (u64)final_frame;
	t->cpu_context.pc = (u64)ret_from_fork;
	snprintf((char *)t->comm, TASK_COMM_LEN, comm, cpu, pid);
}

notrace static void cpu_add_task(struct cpu_data *c, struct task_struct *t)
{
	if (c->nr_tasks >= MAX_TASKS_PER_CPU)
		panic("too many tasks on one cpu", c->cpu);
	c->tasks[c->nr_tasks++] = t;
}

/* CPU 0: build every CPU's task list, release the secondaries, report to the host, then idle. */
notrace void start_kernel(void)
{
	struct boot_params *bp = &boot_params;
	u64 ncpu = bp->nr_cpus;
	u64 pid = ncpu;

	if (ncpu == 0 || ncpu > MAX_CPUS)
		panic("bad nr_cpus", ncpu);
	if (ncpu * (1 + bp->workers_per_cpu + bp->loadgens_per_cpu) > MAX_TASKS)
		panic("too many tasks", ncpu);
	for (u64 cpu = 0; cpu < ncpu; cpu++) {
		struct cpu_data *c = &cpu_data[cpu];
		struct task_struct *idle = &tasks[cpu];

		/* The idle task runs on the boot stack; its context is saved on its first switch-out. */
		memset(idle, 0, sizeof(*idle));
		idle->pid = cpu;
		idle->cpu = cpu;
		idle->kind = TASK_KIND_IDLE;
		idle->patch_state = KLP_TRANSITION_IDLE;
		idle->stack_lo = (u64)task_stacks[cpu];
		idle->stack_hi = idle->stack_lo + THREAD_SIZE;
		snprintf((char *)idle->comm, TASK_COMM_LEN, "swapper/%d", cpu);
		c->idle = idle;
		c->current = idle;
		cpu_add_task(c, idle);
	}
	for (u64 cpu = 0; cpu < ncpu; cpu++) {
		for (u64 i = 0; i < bp->workers_per_cpu; i++, pid++) {
			task_init(&tasks[pid], pid, cpu, TASK_KIND_WORKER, worker_main, "kworker/%d:%d");
			cpu_add_task(&cpu_data[cpu], &tasks[pid]);
		}
		for (u64 i = 0; i < bp->loadgens_per_cpu; i++, pid++) {
			task_init(&tasks[pid], pid, cpu, TASK_KIND_LOADGEN, loadgen_main, "loadgen/%d:%d");
			cpu_add_task(&cpu_data[cpu], &tasks[pid]);
		}
	}
	bp->nr_tasks = pid;
	bp->cpus_up = 1;
	WRITE_ONCE(bp->secondaries_go, 1);
	while (READ_ONCE(bp->cpus_up) != ncpu)
		barrier();
	host_call(HC_BOOTED, ncpu, pid);
	cpu_idle(&cpu_data[0]);
}

notrace void secondary_start_kernel(void)
{
	struct cpu_data *c = this_cpu();

	while (!READ_ONCE(boot_params.secondaries_go))
		barrier();
	__atomic_fetch_add(&boot_params.cpus_up, 1, __ATOMIC_SEQ_CST);
	cpu_idle(c);
}

/*
 * A worker runs one host job at a time: fn(args). Returning to this loop between jobs is the model's
 * "kernel exit" (the point where Linux's livepatch switches a task that has left the kernel). A job that
 * returns -ERESTARTSYS was interrupted by a fake signal: the task takes the exit path, then restarts it, as a
 * syscall is restarted after signal handling.
 */
notrace void worker_main(u64 arg)
{
	struct task_struct *t = current_task();
	struct job *j = &t->job;

	(void)arg;
	for (;;) {
		u64 seq;
		u64 (*fn)(u64, u64, u64, u64, u64, u64, u64, u64);

		wait_on(&j->seq, j->done);
		seq = READ_ONCE(j->seq);
		fn = (void *)j->fn;
		for (;;) {
			u64 ret = fn(j->args[0], j->args[1], j->args[2], j->args[3], j->args[4], j->args[5], j->args[6],
				     j->args[7]);

			if (ret != -(u64)ERESTARTSYS || !(READ_ONCE(t->flags) & TIF_NOTIFY_SIGNAL)) {
				j->ret = ret;
				break;
			}
			WRITE_ONCE(t->flags, t->flags & ~(u64)TIF_NOTIFY_SIGNAL);
			klp_update_patch_state(t);
		}
		WRITE_ONCE(t->flags, t->flags & ~(u64)TIF_NOTIFY_SIGNAL);
		klp_update_patch_state(t);
		WRITE_ONCE(j->done, seq);
		if (j->notify)
			host_call(HC_JOB_DONE, (u64)t, seq);
	}
}

/*
 * Where the host resumes a worker whose job faulted (an unmapped access, an undefined instruction): the host
 * has failed the job and marked it done, and points this CPU here on the worker's own stack, emptied. As a
 * kthread that oopses is gone while the kernel runs on, the job's frames are dropped; what they left behind on
 * this CPU (a hooked return, a trace recursion bit) is cleared, and the worker serves its mailbox again.
 */
notrace void __attribute__((noreturn)) worker_fault_exit(void)
{
	struct task_struct *t = current_task();

	t->curr_ret_stack = 0;
	t->graph_state = 0;
	this_cpu()->trace_recursion = 0;
	WRITE_ONCE(t->flags, t->flags & ~(u64)TIF_NOTIFY_SIGNAL);
	klp_update_patch_state(t);
	worker_main(0);
	__builtin_unreachable();
}

notrace void loadgen_main(u64 arg)
{
	struct task_struct *t = current_task();

	t->lg.seed = 0x9e3779b97f4a7c15ULL * (arg + 1);
	for (;;) {
		wait_on(&t->lg.mode, LOADGEN_OFF);
		loadgen_round(t);
		klp_update_patch_state(t);
		cond_resched();
	}
}
