/*
 * fprobe (kernel/trace/fprobe.c on arm64): function entry and exit probes on ftrace, with the ARGS only.
 *
 *   entry   fprobe_entry is an ordinary ftrace_ops callback (op->private = struct fprobe): it sees the
 *           ftrace_regs ftrace_caller saved (x0-x8, fp, lr, sp, pc) and nothing else: arm64 has no
 *           DYNAMIC_FTRACE_WITH_REGS, so there is no pt_regs to give and none is made up. It counts, records
 *           x0-x7, sp and lr, and for a probe with an exit handler pushes a ret_stack entry tagged with the
 *           fprobe and swaps fregs->lr for return_to_handler, as the function_graph entry does.
 *   exit    return_to_handler's C half (fgraph.c) sees the tag and calls fprobe_exit with the saved x0-x8:
 *           count and record the return value (x0) with the duration.
 *
 * A recursion guard per CPU (an fprobe handler calling traced code) counts nmissed, as
 * ftrace_test_recursion_trylock does; so does a full ret_stack for an exit that cannot be hooked.
 */
#include "kernel.h"

struct fprobe fprobe_table[FPROBE_MAX]; /* ops->private; an entry a hooked return still names is not reused */
struct fprobe_ctlblk fprobe_ctlblk[MAX_CPUS];

notrace static void fprobe_record(struct cpu_data *c, const struct fprobe *fp, u64 exit, u64 ip, u64 ret,
				  const struct ftrace_regs *fregs, u64 duration)
{
	struct fprobe_ctlblk *fcb = &fprobe_ctlblk[c->cpu];
	struct fprobe_trace *e = &fcb->ring[fcb->head % FPROBE_RING];

	e->ts = trace_clock();
	e->probe = fp->index;
	e->pid = c->current ? c->current->pid : 0;
	e->exit = exit;
	e->ip = ip;
	e->ret = ret;
	for (int i = 0; i < 8; i++)
		e->args[i] = exit ? 0 : fregs->regs[i];
	e->sp = exit ? 0 : fregs->sp;
	e->lr = exit ? 0 : fregs->lr;
	e->retval = exit ? fregs->regs[0] : 0;
	e->duration = duration;
	barrier();
	WRITE_ONCE(fcb->head, fcb->head + 1);
}

notrace void fprobe_entry(u64 ip, u64 parent_ip, struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();
	struct task_struct *t = c->current;
	struct fprobe *fp = (struct fprobe *)op->private;
	u64 cpu = c->cpu, depth;
	struct ftrace_ret_stack *rs;

	if (!(READ_ONCE(fp->flags) & FPF_ARMED))
		return;
	if (c->trace_recursion & TRACE_RECURSION_FPROBE) {
		fp->nmissed[cpu]++;
		return;
	}
	c->trace_recursion |= TRACE_RECURSION_FPROBE;
	fp->hits[cpu]++;
	if (fp->flags & FPF_RECORD)
		fprobe_record(c, fp, 0, ip, parent_ip, fregs, 0);
	if (fp->flags & FPF_EXIT) {
		depth = t->curr_ret_stack;
		if (depth >= FTRACE_RETFUNC_DEPTH) {
			fp->nmissed[cpu]++;
			t->trace_overrun++;
			goto out;
		}
		rs = &t->ret_stack[depth];
		rs->ret = fregs->lr;
		rs->func = ip;
		rs->fp = fregs->fp;
		rs->calltime = trace_clock();
		rs->fprobe = fp;
		WRITE_ONCE(t->curr_ret_stack, depth + 1);
		fregs->lr = (u64)return_to_handler;
	}
out:
	c->trace_recursion &= ~TRACE_RECURSION_FPROBE;
}

/* From ftrace_return_to_handler, the entry already popped; fregs holds the return values (x0-x8). */
notrace void fprobe_exit(const struct ftrace_ret_stack *rs, const struct ftrace_regs *fregs)
{
	struct cpu_data *c = this_cpu();
	struct fprobe *fp = rs->fprobe;

	if (!(READ_ONCE(fp->flags) & FPF_ARMED))
		return;	/* unregistered since the entry: the return goes back, unhandled */
	fp->exit_hits[c->cpu]++;
	if (fp->flags & FPF_RECORD)
		fprobe_record(c, fp, 1, rs->func, rs->ret, fregs, trace_clock() - rs->calltime);
}
