/*
 * The function_graph tracer (arm64 WITH_ARGS style): an ordinary ftrace_ops callback that hooks the traced
 * call's return, and the C half of return_to_handler that unhooks it.
 *
 *   entry   ftrace_graph_func: push {fregs->lr, ip, fregs->fp, now} on current's ret_stack, record
 *           TRACE_GRAPH_ENT, set fregs->lr = return_to_handler (ftrace_caller restores x30 from it)
 *   return  the traced function's `ret` lands in return_to_handler (ftrace_entry.S), which saves x0-x7 and
 *           calls ftrace_return_to_handler(x29): pop, check the frame pointer, record TRACE_GRAPH_RET with
 *           the duration, hand back the original return address
 *
 * The frame pointer is the caller's x29: what the traced function sees at entry (fregs->fp) and what its
 * epilogue has restored by the time it returns, leaf or not. The host unwinder uses the same ret_stack to see
 * through return_to_handler in a sleeping task's frame records.
 *
 * set_graph_function and set_graph_notrace are the hashes in op->private (struct fgraph_hashes, NULL when the
 * tracer has neither); where a task stands is one word next to its ret_stack, graph_state:
 *   depth            the ret_stack depth just above the set_graph_function entry the task is inside (0: outside
 *                    any). A call outside is neither pushed nor hooked, so it costs no return.
 *   FGRAPH_NOTRACE   set while the top ret_stack entry is a set_graph_notrace function: that entry is pushed and
 *                    hooked without a record so that its return clears the bit, and nothing is pushed above
 *                    it, so the next return on the task is always that entry's.
 * One word so that the return path tests it once; it is tested whatever the hashes, because it describes
 * hooked returns, which outlive a session.
 */
#include "kernel.h"

notrace static void graph_record(struct cpu_data *c, u32 type, u64 ip, u64 parent_ip, u64 ts, u64 depth,
				 u64 duration)
{
	struct trace_entry *e = trace_ring_reserve(c);

	if (!e)
		return;
	e->ip = ip;
	e->parent_ip = parent_ip;
	e->ts = ts;
	e->pid_cpu = (c->current->pid << 8) | c->cpu;
	e->type = type;
	e->depth = (u32)depth;
	e->duration = duration;
	WRITE_ONCE(c->rb.head, c->rb.head + 1);
}

notrace void ftrace_graph_func(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();
	struct task_struct *t = c->current;
	const struct fgraph_hashes *h = (const struct fgraph_hashes *)op->private;
	struct ftrace_ret_stack *rs;
	u64 depth, now, state, next;

	/* the list function's guard only covers shared sites: a CALL_OPS site calls this directly */
	if (c->trace_recursion & TRACE_RECURSION_GRAPH) {
		c->recursion_misses++;
		return;
	}
	c->trace_recursion |= TRACE_RECURSION_GRAPH;
	if (!READ_ONCE(c->rb.entries))
		goto out;	/* the tracer is detaching: hook nothing new */
	state = next = t->graph_state;
	if (state & FGRAPH_NOTRACE)
		goto out;	/* beneath a set_graph_notrace function */
	depth = t->curr_ret_stack;
	if (h) {
		if (h->function_hash && !state) {
			if (!hash_contains(h->function_hash, ip))
				goto out;
			next = depth + 1;	/* entering: its return takes the task outside again */
		}
		if (h->notrace_hash && hash_contains(h->notrace_hash, ip))
			next = state | FGRAPH_NOTRACE;	/* notrace wins over set_graph_function, as in the kernel */
	}
	if (depth >= FTRACE_RETFUNC_DEPTH) {
		t->trace_overrun++;
		goto out;
	}
	now = trace_clock();
	rs = &t->ret_stack[depth];
	rs->ret = fregs->lr;
	rs->func = ip;
	rs->fp = fregs->fp;
	rs->calltime = now;
	rs->fprobe = NULL;
	WRITE_ONCE(t->curr_ret_stack, depth + 1);
	t->graph_state = next;
	if (!(next & FGRAPH_NOTRACE))
		graph_record(c, TRACE_GRAPH_ENT, ip, parent_ip, now, depth, 0);
	fregs->lr = (u64)return_to_handler;
out:
	c->trace_recursion &= ~TRACE_RECURSION_GRAPH;
}

void fprobe_exit(const struct ftrace_ret_stack *rs, const struct ftrace_regs *fregs);

/* Called by return_to_handler with the returning function's x29 and the return values it saved (x0-x8);
 * returns where that function really returns. An entry an fprobe pushed goes to its exit handler. */
notrace u64 ftrace_return_to_handler(u64 fp, const struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();
	struct task_struct *t = c->current;
	u64 depth = t->curr_ret_stack, now, state;
	struct ftrace_ret_stack *rs;

	if (depth == 0 || depth > FTRACE_RETFUNC_DEPTH)
		panic("function_graph: return_to_handler with an empty return stack", depth);
	rs = &t->ret_stack[depth - 1];
	if (rs->fp != fp)
		panic("function_graph: frame pointer mismatch on return (ret_stack corrupt), fp", fp);
	WRITE_ONCE(t->curr_ret_stack, depth - 1);
	if (rs->fprobe) {	/* fprobe.c's: no graph record, no graph_state of its own */
		fprobe_exit(rs, fregs);
		return rs->ret;
	}
	state = t->graph_state;
	if (state) {	/* inside a set_graph_function, or leaving a set_graph_notrace one */
		if (state & FGRAPH_NOTRACE) {
			t->graph_state = state & ~FGRAPH_NOTRACE;	/* never recorded */
			return rs->ret;
		}
		if (state == depth)
			t->graph_state = 0;	/* leaving the set_graph_function the task was inside */
	}
	now = trace_clock();
	graph_record(c, TRACE_GRAPH_RET, rs->func, rs->ret, now, depth - 1, now - rs->calltime);
	return rs->ret;
}
