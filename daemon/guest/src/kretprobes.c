/*
 * kretprobes on arm64 (kernel/kprobes.c's pre_handler_kretprobe, arch_prepare_kretprobe and
 * __kretprobe_trampoline_handler, with arch/arm64's kretprobe_brk_handler).
 *
 *   entry   the kretprobe's kprobe sits at the function's address; its pre handler (from kprobe_brk_handler)
 *           takes an instance from this CPU's pool (none left: nmissed), saves the real return address (x30)
 *           and the caller's frame (x29) in it, pushes it on the task's list and points x30 at the probe's
 *           trampoline. The kprobe then steps the instruction at the function's address as usual.
 *   return  the function's `ret` lands in the trampoline (kretprobes_entry.S), which gets a pt_regs one way
 *           or the other and calls kretprobe_trampoline_handler: pop the task's newest instance, check its
 *           frame pointer, set regs->pc to the real return address (so a handler's backtrace starts there, as
 *           Linux's instruction_pointer_set), run the return handler (count; record pt_regs with x0 = the
 *           return value) unless the kretprobe was unregistered since, and put the instance back.
 *
 * Two kretprobes can never stack on one function here (one kprobe per address), but a return that lands
 * in a trampoline again (a hijacked return address that is itself a trampoline) simply pops the next instance.
 * Pools are per CPU with no atomics: tasks never migrate and nothing preempts a handler, so an instance is
 * always freed on the CPU that took it. Everything is notrace and so never probed.
 */
#include "kernel.h"

struct kretprobe kretprobe_table[KRETPROBE_MAX];

void __kretprobe_trampoline(void);
extern struct kprobe_ctlblk kprobe_ctlblk[MAX_CPUS];
notrace void kprobe_record(struct kprobe_ctlblk *kcb, const struct kprobe *p, const struct pt_regs *regs,
			   u64 cpu, u64 post, u64 aux);

/* arch_prepare_kretprobe, behind pre_handler_kretprobe's instance allocation */
notrace void pre_handler_kretprobe(struct kprobe *p, struct pt_regs *regs, u64 cpu)
{
	struct kretprobe *rp = p->rp;
	struct task_struct *t = this_cpu()->current;
	struct kretprobe_instance *ri;

	if (!rp || !(READ_ONCE(rp->flags) & KRPF_ARMED))
		return;
	ri = rp->free[cpu];
	if (!ri) {
		rp->nmissed[cpu]++;	/* maxactive instances already live on this CPU */
		return;
	}
	rp->free[cpu] = ri->next;
	ri->rp = rp;
	ri->ret_addr = regs->regs[30];
	ri->fp = regs->regs[29];
	ri->entry_ts = trace_clock();
	ri->cpu = cpu;
	ri->next = t->kretprobe_instances;
	t->kretprobe_instances = ri;
	regs->regs[30] = rp->trampoline;
}

/* Both trampolines call this with their pt_regs and x29 (the caller's frame, restored by the epilogue). */
notrace u64 kretprobe_trampoline_handler(struct pt_regs *regs, u64 fp)
{
	struct cpu_data *c = this_cpu();
	struct task_struct *t = c->current;
	struct kretprobe_instance *ri = t->kretprobe_instances;
	struct kretprobe *rp;
	u64 ret, cpu = c->cpu;

	if (!ri)
		panic("kretprobe: a return reached the trampoline with no instance on the task", regs->regs[30]);
	if (ri->fp != fp)
		panic("kretprobe: frame pointer mismatch on return (instances corrupt), fp", fp);
	t->kretprobe_instances = ri->next;
	rp = ri->rp;
	ret = ri->ret_addr;
	regs->pc = ret;
	if (READ_ONCE(rp->flags) & KRPF_ARMED) {
		rp->hits[cpu]++;
		if ((rp->flags & KRPF_RECORD) && rp->kp)	/* kp: written by the host just after arming */
			kprobe_record(&kprobe_ctlblk[cpu], rp->kp, regs, cpu, KPROBE_TRACE_RET,
				      trace_clock() - ri->entry_ts);
	}
	ri->next = rp->free[ri->cpu];
	rp->free[ri->cpu] = ri;
	return ret;
}

/* The BRK trampoline's debug exception: exception return resumes at the real return address, x30 = it too
 * (what a plain `ret` would have left there). */
notrace int kretprobe_brk_handler(struct pt_regs *regs)
{
	if (regs->pc != (u64)__kretprobe_trampoline)
		return -1;
	regs->regs[30] = kretprobe_trampoline_handler(regs, regs->regs[29]);
	return 0;
}
