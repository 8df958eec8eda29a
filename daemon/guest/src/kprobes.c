/*
 * kprobes on arm64 (arch/arm64/kernel/probes/kprobes.c and simulate-insn.c): the debug-exception handlers, the
 * out-of-line single step, the simulation of PC-relative instructions, and the built-in pre/post handlers.
 *
 * The host registers a probe by filling a kprobe_table entry (decoded kind, XOL slot = instruction followed
 * by BRK #KPROBES_BRK_SS_IMM, or no slot for a simulated instruction) and then writing BRK #KPROBES_BRK_IMM
 * over the instruction in a stop-machine batch. Every hit runs here, in the guest, from the exception entry in
 * kprobes_entry.S: no host code runs per hit beyond the CPU's exception entry that unicorn leaves to the host.
 * Everything is notrace: no ftrace record, so the host refuses to probe it (Linux's NOKPROBE_SYMBOL).
 */
#include "kernel.h"

#define DAIF_MASK 0x3c0ULL

struct kprobe kprobe_table[KPROBE_MAX];
struct kprobe_ctlblk kprobe_ctlblk[MAX_CPUS];
u64 kprobe_nr; /* entries of kprobe_table the lookup scans (the host keeps it above every armed entry) */
u64 kprobe_mem_ranges[2 * KPROBE_MEM_RANGES]; /* [lo, hi) pairs the host maps readable (hi = 0: unused) */

notrace void panic(const char *msg, u64 value);

static inline __attribute__((always_inline)) u64 sext(u64 v, int bits)
{
	return (u64)(((s64)(v << (64 - bits))) >> (64 - bits));
}

static inline __attribute__((always_inline)) u64 get_x(const struct pt_regs *regs, u32 n)
{
	return n == 31 ? 0 : regs->regs[n];
}

static inline __attribute__((always_inline)) void set_x(struct pt_regs *regs, u32 n, u64 v)
{
	if (n != 31)
		regs->regs[n] = v;
}

notrace static struct kprobe *get_kprobe(u64 addr)
{
	u64 n = READ_ONCE(kprobe_nr);

	for (u64 i = 0; i < n && i < KPROBE_MAX; i++) {
		struct kprobe *p = &kprobe_table[i];

		if ((READ_ONCE(p->flags) & KPF_ARMED) && p->addr == addr)
			return p;
	}
	return NULL;
}

/* aarch64_insn_condition: the condition codes of B.cond against the saved NZCV */
notrace static int condition_holds(u64 pstate, u32 cond)
{
	int n = (pstate >> 31) & 1, z = (pstate >> 30) & 1, c = (pstate >> 29) & 1, v = (pstate >> 28) & 1;
	int r;

	switch (cond >> 1) {
	case 0: r = z; break;			/* EQ / NE */
	case 1: r = c; break;			/* CS / CC */
	case 2: r = n; break;			/* MI / PL */
	case 3: r = v; break;			/* VS / VC */
	case 4: r = c && !z; break;		/* HI / LS */
	case 5: r = n == v; break;		/* GE / LT */
	case 6: r = n == v && !z; break;	/* GT / LE */
	default: return 1;			/* AL / NV */
	}
	return (cond & 1) ? !r : r;
}

/* simulate-insn.c: execute an instruction that reads or writes the PC as if it ran at p->addr */
notrace static void kprobe_simulate(const struct kprobe *p, struct pt_regs *regs)
{
	u32 op = (u32)p->opcode;
	u64 pc = p->addr, next = pc + 4;

	switch (p->kind) {
	case KP_SIM_NOP:
		break;
	case KP_SIM_B:
		if (op & 0x80000000u)
			regs->regs[30] = pc + 4;
		next = pc + sext((u64)(op & 0x3ffffff) << 2, 28);
		break;
	case KP_SIM_BCOND:
		if (condition_holds(regs->pstate, op & 0xf))
			next = pc + sext((u64)((op >> 5) & 0x7ffff) << 2, 21);
		break;
	case KP_SIM_CBZ: {
		u64 v = get_x(regs, op & 31);

		if (!(op >> 31))
			v = (u32)v;
		if ((v != 0) == !!(op & (1u << 24)))
			next = pc + sext((u64)((op >> 5) & 0x7ffff) << 2, 21);
		break;
	}
	case KP_SIM_TBZ: {
		u32 bit = ((op >> 31) << 5) | ((op >> 19) & 31);
		u64 set = (get_x(regs, op & 31) >> bit) & 1;

		if (set == !!(op & (1u << 24)))
			next = pc + sext((u64)((op >> 5) & 0x3fff) << 2, 16);
		break;
	}
	case KP_SIM_ADR: {
		u64 imm = ((op >> 29) & 3) | ((u64)((op >> 5) & 0x7ffff) << 2);

		if (op >> 31)
			set_x(regs, op & 31, (pc & ~0xfffULL) + sext(imm << 12, 33));
		else
			set_x(regs, op & 31, pc + sext(imm, 21));
		break;
	}
	case KP_SIM_LDR_LIT: {
		u64 addr = pc + sext((u64)((op >> 5) & 0x7ffff) << 2, 21);
		u32 opc = op >> 30;

		if (opc == 0)
			set_x(regs, op & 31, *(const volatile u32 *)addr);
		else if (opc == 1)
			set_x(regs, op & 31, *(const volatile u64 *)addr);
		else
			set_x(regs, op & 31, (u64)(s64)*(const volatile int *)addr);
		break;
	}
	case KP_SIM_BR: {
		u64 target = get_x(regs, (op >> 5) & 31);

		if (((op >> 21) & 3) == 1) /* BLR */
			regs->regs[30] = pc + 4;
		next = target;
		break;
	}
	default:
		panic("kprobe: unknown simulated instruction kind", p->kind);
	}
	regs->pc = next;
}

notrace void pre_handler_kretprobe(struct kprobe *p, struct pt_regs *regs, u64 cpu);
notrace int kretprobe_brk_handler(struct pt_regs *regs);

/* copy_from_kernel_nofault's check: only an address inside a mapped range is read (a fault would kill the job) */
notrace static int kprobe_readable(u64 addr)
{
	for (u64 i = 0; i < KPROBE_MEM_RANGES; i++) {
		u64 lo = kprobe_mem_ranges[2 * i], hi = kprobe_mem_ranges[2 * i + 1];

		if (hi && addr >= lo && addr < hi && hi - addr >= 8)
			return 1;
	}
	return 0;
}

/* +OFFS(%REG) fetch args: the u64 at base + offset, read now (the record's regs are the hit's) */
notrace static void kprobe_fetch(const struct kprobe *p, const struct pt_regs *regs, struct kprobe_trace *t)
{
	u64 fault = 0;

	if (!p->fetch[0]) {	/* the host packs fetches from 0: a probe without any pays one load */
		t->mem_fault = 0;
		return;
	}
	for (u64 i = 0; i < KPROBE_FETCH_MAX; i++) {
		u64 f = p->fetch[i], v = 0;

		if (f & KPROBE_FETCH_VALID) {
			u64 reg = (f >> 32) & 0xff;
			u64 base = reg < 31 ? regs->regs[reg] : reg == 31 ? regs->sp : regs->pc;
			u64 addr = base + (u64)(s64)(int)(u32)f;

			if (kprobe_readable(addr))
				v = *(const volatile u64 *)addr;
			else
				fault |= 1ULL << i;
		}
		t->mem[i] = v;
	}
	t->mem_fault = fault;
}

/* also the kretprobe return handler's (kretprobes.c): post = KPROBE_TRACE_RET, aux = ticks since the entry */
notrace void kprobe_record(struct kprobe_ctlblk *kcb, const struct kprobe *p, const struct pt_regs *regs,
			   u64 cpu, u64 post, u64 aux)
{
	struct kprobe_trace *t = &kcb->ring[kcb->ring_head % KPROBE_RING];
	const volatile u64 *src = (const volatile u64 *)regs;
	volatile u64 *dst = (volatile u64 *)&t->regs;

	t->ts = trace_clock();
	t->probe = (u64)(p - kprobe_table);
	t->cpu = cpu;
	t->post = post;
	t->aux = aux;
	t->pid = this_cpu()->current ? this_cpu()->current->pid : 0;
	for (u64 i = 0; i < PT_REGS_SIZE / 8; i++)
		dst[i] = src[i];
	kprobe_fetch(p, regs, t);
	barrier();
	WRITE_ONCE(kcb->ring_head, kcb->ring_head + 1);
}

/* The built-in pre handler: record, inject, call */
notrace static void kprobe_pre_handler(struct kprobe *p, struct pt_regs *regs, struct kprobe_ctlblk *kcb, u64 cpu)
{
	u64 flags = p->flags;

	if (flags & KPF_RECORD)
		kprobe_record(kcb, p, regs, cpu, 0, 0);
	if ((flags & KPF_SET_REG) && p->set_reg < 31)
		regs->regs[p->set_reg] = p->set_val;
	if (flags & KPF_KRETPROBE)
		pre_handler_kretprobe(p, regs, cpu);
	if ((flags & KPF_CALL) && p->call_fn)
		((u64 (*)(u64))p->call_fn)(regs->regs[0]);
}

notrace static void kprobe_post_handler(struct kprobe *p, struct pt_regs *regs, struct kprobe_ctlblk *kcb, u64 cpu)
{
	p->post_hits[cpu]++;
	if (p->flags & KPF_RECORD)
		kprobe_record(kcb, p, regs, cpu, 1, 0);
}

/*
 * Linux's aggr_kprobe: several probes on one address share its BRK and its slot (the host writes each entry
 * with the same kind, slot and restore), the lowest armed entry is the one get_kprobe finds, and every armed
 * entry at that address runs its own handlers and counts its own hits. The rest of the table lies above it.
 */
notrace static struct kprobe *next_at(struct kprobe *p, struct kprobe *q)
{
	u64 n = READ_ONCE(kprobe_nr);
	struct kprobe *end = &kprobe_table[n < KPROBE_MAX ? n : KPROBE_MAX];

	for (q++; q < end; q++)
		if (q->addr == p->addr && (READ_ONCE(q->flags) & KPF_ARMED))
			return q;
	return NULL;
}

notrace static void aggr_pre_handler(struct kprobe *p, struct pt_regs *regs, struct kprobe_ctlblk *kcb, u64 cpu)
{
	for (struct kprobe *q = p; q; q = next_at(p, q)) {
		q->hits[cpu]++;
		kprobe_pre_handler(q, regs, kcb, cpu);
	}
}

notrace static void aggr_post_handler(struct kprobe *p, struct pt_regs *regs, struct kprobe_ctlblk *kcb, u64 cpu)
{
	for (struct kprobe *q = p; q; q = next_at(p, q))
		if (q->flags & KPF_POST)
			kprobe_post_handler(q, regs, kcb, cpu);
}

notrace static void post_kprobe_handler(struct kprobe *p, struct kprobe_ctlblk *kcb, struct pt_regs *regs, u64 cpu)
{
	if (p->restore)
		regs->pc = p->restore;
	if (kcb->status == KPROBE_REENTER) { /* restore_previous_kprobe */
		kcb->current = kcb->prev_kprobe;
		kcb->status = kcb->prev_status;
		kcb->prev_kprobe = NULL;
		return;
	}
	kcb->status = KPROBE_HIT_SSDONE;
	aggr_post_handler(p, regs, kcb, cpu);
	kcb->current = NULL; /* reset_current_kprobe */
	kcb->status = 0;
}

notrace static void setup_singlestep(struct kprobe *p, struct pt_regs *regs, struct kprobe_ctlblk *kcb, u64 cpu,
				     int reenter)
{
	kcb->status = reenter ? KPROBE_REENTER : KPROBE_HIT_SS;
	if (p->slot) {
		/* step out of line with interrupts, SError and debug masked; the slot's BRK comes back here */
		kcb->saved_irqflag = regs->pstate & DAIF_MASK;
		regs->pstate |= DAIF_MASK;
		regs->pc = p->slot;
	} else {
		kprobe_simulate(p, regs);
		post_kprobe_handler(p, kcb, regs, cpu);
	}
}

notrace static int kprobe_brk_handler(struct pt_regs *regs)
{
	u64 cpu = this_cpu()->cpu;
	struct kprobe_ctlblk *kcb = &kprobe_ctlblk[cpu];
	struct kprobe *p = get_kprobe(regs->pc);

	if (!p)
		return -1;
	if (kcb->current) { /* reenter_kprobe: arm64 does not nest debug exceptions, the hit is missed */
		if (kcb->status != KPROBE_HIT_ACTIVE && kcb->status != KPROBE_HIT_SSDONE) {
			kcb->bugs++;
			panic("Failed to recover from reentered kprobes.", regs->pc);
		}
		for (struct kprobe *q = p; q; q = next_at(p, q))
			q->nmissed[cpu]++;
		kcb->prev_kprobe = kcb->current;
		kcb->prev_status = kcb->status;
		kcb->current = p;
		setup_singlestep(p, regs, kcb, cpu, 1);
		return 0;
	}
	kcb->current = p;
	kcb->status = KPROBE_HIT_ACTIVE;
	aggr_pre_handler(p, regs, kcb, cpu);	/* the built-in handlers never skip the step */
	setup_singlestep(p, regs, kcb, cpu, 0);
	return 0;
}

notrace static int kprobe_ss_brk_handler(struct pt_regs *regs)
{
	u64 cpu = this_cpu()->cpu;
	struct kprobe_ctlblk *kcb = &kprobe_ctlblk[cpu];
	struct kprobe *cur = kcb->current;

	if (!cur || (kcb->status != KPROBE_HIT_SS && kcb->status != KPROBE_REENTER) || regs->pc != cur->slot + 4)
		return -1;
	regs->pstate = (regs->pstate & ~DAIF_MASK) | kcb->saved_irqflag;
	post_kprobe_handler(cur, kcb, regs, cpu);
	return 0;
}

/* el1h_sync's C half: dispatch a debug exception by its ESR (BRK immediate) */
notrace void do_debug_exception(struct pt_regs *regs, u64 esr)
{
	u64 imm = esr & 0xffff;
	int ret = -1;

	if ((esr >> 26) == ESR_ELX_EC_BRK64) {
		if (imm == KPROBES_BRK_IMM)
			ret = kprobe_brk_handler(regs);
		else if (imm == KPROBES_BRK_SS_IMM)
			ret = kprobe_ss_brk_handler(regs);
		else if (imm == KRETPROBES_BRK_IMM)
			ret = kretprobe_brk_handler(regs);
	}
	if (ret)
		panic("unexpected debug exception", regs->pc);
}
