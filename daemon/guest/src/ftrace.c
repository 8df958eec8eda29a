/*
 * The guest half of ftrace: the stub and list ops, ftrace_ops_list_func with real hash lookups, direct-call
 * dispatch, and the tracers (function tracer into per-CPU ring buffers, counting and nop callbacks; the
 * function_graph tracer is in fgraph.c).
 * Everything here runs per traced call; the host only builds the data it reads.
 */
#include "kernel.h"

typedef void (*ftrace_func_t)(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs);

notrace void ftrace_ops_list_func(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs);
notrace void ftrace_ops_nop_func(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs);

/* The end of the ops list, and the two static ops a call-site literal may point at (kernel/trace/ftrace.c). */
struct ftrace_ops ftrace_list_end = { .func = (u64)ftrace_ops_nop_func, .flags = FTRACE_OPS_FL_STUB };
struct ftrace_ops ftrace_list_ops = { .func = (u64)ftrace_ops_list_func, .flags = FTRACE_OPS_FL_STUB };
struct ftrace_ops ftrace_nop_ops = { .func = (u64)ftrace_ops_nop_func, .flags = FTRACE_OPS_FL_STUB };
struct ftrace_ops *ftrace_ops_list = &ftrace_list_end;
u64 direct_hits[MAX_CPUS];

notrace void ftrace_ops_nop_func(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	(void)ip, (void)parent_ip, (void)op, (void)fregs;
}

/* ftrace_ops_test: an empty filter means every function, an empty notrace hash excludes none. */
notrace static int ftrace_ops_test(const struct ftrace_ops *op, u64 ip)
{
	const struct ftrace_hash *filter = op->filter_hash, *notrace_hash = op->notrace_hash;

	if (filter && filter->count && !hash_contains(filter, ip))
		return 0;
	if (notrace_hash && notrace_hash->count && hash_contains(notrace_hash, ip))
		return 0;
	return 1;
}

notrace void ftrace_ops_list_func(u64 ip, u64 parent_ip, struct ftrace_ops *ignored, struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();

	(void)ignored;
	if (c->trace_recursion & TRACE_RECURSION_LIST) {
		c->recursion_misses++;
		return;
	}
	c->trace_recursion |= TRACE_RECURSION_LIST;
	for (struct ftrace_ops *op = READ_ONCE(ftrace_ops_list); op != &ftrace_list_end; op = op->next) {
		if (op->flags & (FTRACE_OPS_FL_STUB | FTRACE_OPS_FL_REMOVING))
			continue;
		if (ftrace_ops_test(op, ip))
			((ftrace_func_t)op->func)(ip, parent_ip, op, fregs);
	}
	c->trace_recursion &= ~TRACE_RECURSION_LIST;
}

/* The func of a direct ops when it shares a site: ftrace_caller jumps to direct_tramp on its way out. */
notrace void call_direct_funcs(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	(void)ip, (void)parent_ip;
	fregs->direct_tramp = READ_ONCE(op->direct_call);
}

notrace void my_direct_func(u64 ip)
{
	(void)ip;
	direct_hits[this_cpu()->cpu]++;
}

/*
 * An IPMODIFY callback for hijacks: the traced call continues at op->private instead (ftrace_caller returns
 * to fregs->pc with the caller's x30, so the replacement returns straight to the original caller).
 */
notrace void ftrace_redirect_call(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	(void)ip, (void)parent_ip;
	fregs->pc = op->private;
}

/* samples/ftrace/ftrace-ops.c's callbacks */
notrace void ops_func_nop(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	(void)ip, (void)parent_ip, (void)op, (void)fregs;
}

notrace void ops_func_count(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	(void)ip, (void)parent_ip, (void)fregs;
	op->counts[this_cpu()->cpu]++;
}

/* The function profiler (function_profile_enabled): per-CPU hit counts per function, summed by the host. */
notrace void function_profile_call(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	const struct ftrace_profile *p = (const struct ftrace_profile *)op->private;
	s64 i = hash_index(p->hash, ip);

	(void)parent_ip, (void)fregs;
	if (i >= 0)
		p->hits[(this_cpu()->cpu << p->hash->size_bits) | (u64)i]++;
}

/* Single producer: only this CPU writes its ring, and nothing interrupts it between reserve and publish. */
notrace struct trace_entry *trace_ring_reserve(struct cpu_data *c)
{
	struct ring_buffer *rb = &c->rb;
	u64 head = rb->head;

	if (!rb->entries)
		return NULL;
	if (head - READ_ONCE(rb->tail) > rb->mask) {
		rb->dropped++;
		return NULL;
	}
	return &rb->entries[head & rb->mask];
}

/* The function tracer: one record per call into this CPU's ring buffer, which the host drains. */
notrace void function_trace_call(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();
	struct trace_entry *e = trace_ring_reserve(c);

	(void)op, (void)fregs;
	if (!e)
		return;
	e->ip = ip;
	e->parent_ip = parent_ip;
	e->ts = trace_clock();
	e->pid_cpu = (c->current->pid << 8) | c->cpu;
	e->type = TRACE_FN;
	WRITE_ONCE(c->rb.head, c->rb.head + 1);
}

/* Benchmark tracees (samples/ftrace/ftrace-ops.c) and the notrace loop that calls them. */
noinline void tracee_relevant(void)
{
	barrier();
}

noinline void tracee_irrelevant(void)
{
	barrier();
}

notrace u64 bench_tracee(u64 calls)
{
	for (u64 i = 0; i < calls; i++)
		tracee_relevant();
	return calls;
}

/* A traced caller of that loop: with set_graph_function on it, every tracee_relevant call runs inside it. */
noinline u64 bench_tracee_caller(u64 calls)
{
	return bench_tracee(calls);
}
