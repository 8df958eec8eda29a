/*
 * Kernel-like workload functions: the things live patches and tracers act on. They are noinline so that each
 * keeps its own patchable entry and frame (an inlined copy could not be traced, patched or seen on a stack).
 *
 *   cmdline_proc_show     renders the command line into a seq_file (Linux's /proc/cmdline; the function the
 *                         livepatch selftests patch)
 *   __arm64_sys_getpid    a getpid-like syscall (the selftests' syscall test patches it)
 *   sleeper_*             a nested call chain whose innermost function sleeps until released, holding a task
 *                         inside patchable functions (transition stalls)
 *   work_chain            a chain of small functions calling each other
 *   args8_weighted        uses all eight register arguments (x0-x7), each with its own weight
 *
 * CALLABLE() marks what the host's call verbs may run by default: the reader, the syscall, and the helpers the
 * tests and the README call (lkdtm_READ_UNMAPPED included: it checks that a fault ends only its call).
 */
#include "kernel.h"

char saved_command_line[256] = "console=ttyAMA0 root=/dev/vda rw livepatchd.emulated=1";

#if defined(LP_BUILD_6_1_LP2) || defined(LP_BUILD_6_6)
u64 cmdline_proc_reads;

/* 6.1-lp2 and 6.6-lp1: the stable fix checks the seq_file and counts the reads (a larger body). */
noinline int cmdline_proc_show(struct seq_file *m, void *v)
{
	(void)v;
	if (!m || !m->buf || !m->size)
		return -22;	/* -EINVAL */
	WRITE_ONCE(cmdline_proc_reads, READ_ONCE(cmdline_proc_reads) + 1);
	seq_printf(m, "%s\n", saved_command_line);
	return 0;
}
#else
noinline int cmdline_proc_show(struct seq_file *m, void *v)
{
	(void)v;
	seq_printf(m, "%s\n", saved_command_line);
	return 0;
}
#endif

/* Read "/proc/cmdline" into buf: returns the number of bytes written. */
noinline u64 proc_cmdline_read(char *buf, u64 size)
{
	struct seq_file m = { buf, size, 0 };

	cmdline_proc_show(&m, NULL);
	if (m.count < size)
		buf[m.count] = '\0';
	return m.count;
}
CALLABLE(proc_cmdline_read);

noinline u64 __arm64_sys_getpid(u64 regs)
{
	(void)regs;
	return current_task()->pid;
}
CALLABLE(__arm64_sys_getpid);

/*
 * Call the getpid syscall n times; returns how many calls returned this task's pid. Yields every 4096 calls,
 * as a long kernel loop calls cond_resched(): however large n is, stop-machine and the CPU's other tasks
 * (workers with jobs of their own) make progress meanwhile.
 */
noinline u64 getpid_loop(u64 n)
{
	u64 pid = current_task()->pid, good = 0;

	for (u64 i = 0; i < n; i++) {
		good += __arm64_sys_getpid(0) == pid;
		if ((i & 4095) == 4095)
			cond_resched();
	}
	return good;
}
CALLABLE(getpid_loop);

#define RESTART (-(u64)ERESTARTSYS)

/*
 * The sleep is interruptible: a fake signal unwinds the chain with -ERESTARTSYS and the job restarts. Bit 0 of
 * the (8-byte aligned) flag's address asks for an uninterruptible sleep instead (D state: no signal ends it).
 */
noinline u64 sleeper_inner(u64 flag)
{
	volatile u64 *f = (volatile u64 *)(flag & ~1UL);

	if (flag & 1) {
		wait_on(f, 0);
		return READ_ONCE(*f) + 1;
	}
	if (wait_on_interruptible(f, 0))
		return RESTART;
	return READ_ONCE(*f) + 1;
}

noinline u64 sleeper_middle(u64 flag)
{
	u64 r = sleeper_inner(flag);

	return r == RESTART ? r : r + 10;
}

/* Sleep until *flag != 0, three patchable frames deep. Returns *flag + 111. */
noinline u64 sleeper_outer(u64 flag)
{
	u64 r = sleeper_middle(flag);

	return r == RESTART ? r : r + 100;
}
CALLABLE(sleeper_outer);

#ifdef LP_BUILD_6_6
/*
 * 6.6-lp1 renamed klp_demo_target to klp_demo_compute: there is no klp_demo_target in that build, so a patch
 * for it (livepatch_demo_target) cannot be built for it.
 */
#define klp_demo_target klp_demo_compute
#endif

/* The live-patching stress target: the original returns 3x + 1 (the test patch returns 5x + 2). */
noinline u64 klp_demo_target(u64 x)
{
	return x * 3 + 1;
}
CALLABLE(klp_demo_target);

/*
 * Call klp_demo_target(i) for i < n, counting into counts[0..2] the results that are the original's, the
 * patch's, and neither. Yields every 64 calls, so stop-machine and transitions make progress meanwhile.
 */
notrace u64 klp_check_loop(u64 n, u64 *counts)
{
	for (u64 i = 0; i < n; i++) {
		u64 r = klp_demo_target(i);

		if (r == i * 3 + 1)
			counts[0]++;
		else if (r == i * 5 + 2)
			counts[1]++;
		else
			counts[2]++;
		if ((i & 63) == 63)
			cond_resched();
	}
	return n;
}

/* The benchmark loop for a live-patched call: n calls of klp_demo_target, results summed. */
notrace u64 bench_klp_target(u64 n)
{
	u64 sum = 0;

	for (u64 i = 0; i < n; i++)
		sum += klp_demo_target(i);
	return sum;
}

noinline u64 work_step_c(u64 x)
{
	return (x ^ (x >> 7)) * 0x2545f4914f6cdd1dULL;
}
CALLABLE(work_step_c);

noinline u64 work_step_b(u64 x)
{
	return work_step_c(x + 3) + 5;
}
CALLABLE(work_step_b);

noinline u64 work_step_a(u64 x)
{
	return work_step_b(x * 3) ^ 0x55;
}
CALLABLE(work_step_a);

noinline u64 work_chain(u64 x)
{
	return work_step_a(x) + work_step_c(x);
}
CALLABLE(work_chain);

/* sum of (i + 1) * arg_i mod 2**64: a wrong, missing or shifted argument changes the result */
noinline u64 args8_weighted(u64 a, u64 b, u64 c, u64 d, u64 e, u64 f, u64 g, u64 h)
{
	return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h;
}
CALLABLE(args8_weighted);

notrace static u64 work_chain_expect(u64 x)
{
	u64 c1 = ((x * 3 + 3) ^ ((x * 3 + 3) >> 7)) * 0x2545f4914f6cdd1dULL;
	u64 c2 = (x ^ (x >> 7)) * 0x2545f4914f6cdd1dULL;

	return ((c1 + 5) ^ 0x55) + c2;
}

notrace static u64 corpus_expect(u64 i, u64 x)
{
	const struct corpus_param *p = &corpus_params[i];

	if (p->chained)
		return corpus_expect(i - 1, x + p->mul) ^ p->add;
	return x * p->mul + p->add;
}

notrace static u64 xorshift(u64 *s)
{
	u64 x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* Short rounds keep safe points frequent: a round right after a large invalidation retranslates its targets. */
#define LOADGEN_CALLS_PER_ROUND 16

/*
 * One round of self-checking load. The round contains no safe point, so it runs entirely between two
 * stop-machine batches: count_armed is constant across it, and expect_hits counts exactly the traced calls
 * that a counting trampoline on every corpus site must have seen.
 */
notrace void loadgen_round(struct task_struct *t)
{
	struct loadgen *lg = &t->lg;
	u64 armed = READ_ONCE(boot_params.count_armed);
	u64 hits = 0;

	for (int k = 0; k < LOADGEN_CALLS_PER_ROUND; k++) {
		u64 r = xorshift(&lg->seed);
		u64 i = r % corpus_nr;

		if (corpus_fns[i](r) != corpus_expect(i, r)) {
			lg->errors++;
			lg->last_bad = i;
		}
		hits += 1 + corpus_params[i].chained;
	}
	lg->calls += LOADGEN_CALLS_PER_ROUND;
	if (lg->mode == LOADGEN_MIX) {
		char buf[128];
		u64 x = xorshift(&lg->seed);

		if (proc_cmdline_read(buf, sizeof(buf)) != strlen(saved_command_line) + 1 ||
		    strcmp(buf + strlen(saved_command_line), "\n") != 0)
			lg->errors++;
		if (__arm64_sys_getpid(0) != t->pid)
			lg->errors++;
		if (work_chain(x) != work_chain_expect(x))
			lg->errors++;
		lg->calls += 3;
	}
	if (armed)
		lg->expect_hits += hits;
	lg->rounds++;
}

/*
 * Crash triggers for tests, as Linux's LKDTM (drivers/misc/lkdtm): make the guest fail in a known way so
 * that the host's fault handling can be checked on the real machine.
 */
noinline u64 lkdtm_BUG(u64 unused)
{
	(void)unused;
	__asm__ __volatile__("brk #0x800");
	return 0;
}

noinline u64 lkdtm_PANIC(u64 value)
{
	panic("lkdtm_PANIC", value);
}

noinline u64 lkdtm_READ_UNMAPPED(u64 addr)
{
	return READ_ONCE(*(volatile u64 *)addr);
}
CALLABLE(lkdtm_READ_UNMAPPED);

/*
 * Benchmark body: `calls` corpus calls from a fixed seed, each result checked. Deterministic, so a counting
 * run (block hook) and a timed run (no hooks) execute exactly the same instructions. Returns the number of
 * wrong results.
 */
notrace u64 bench_corpus(u64 calls, u64 seed)
{
	u64 s = seed | 1, bad = 0;

	for (u64 k = 0; k < calls; k++) {
		u64 r = xorshift(&s);
		u64 i = r % corpus_nr;

		bad += corpus_fns[i](r) != corpus_expect(i, r);
	}
	return bad;
}
