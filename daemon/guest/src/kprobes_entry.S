/*
 * The exception vector table (VBAR_EL1) and the EL1 synchronous entry that builds a complete pt_regs: the one
 * place a kprobe gets every GPR, sp, pc and pstate. Only the BRK exceptions of kprobes arrive here: unicorn does
 * not run guest vectors itself, so the host emulates the CPU's exception entry for BRK #KPROBES_BRK_IMM and
 * #KPROBES_BRK_SS_IMM (ELR_EL1 = the BRK, SPSR_EL1 = pstate, ESR_EL1 = EC_BRK64 | IL | imm, DAIF masked,
 * pc = VBAR_EL1 + 0x200) and the code below does the rest, down to its eret (daemon/emu/machine.py).
 * Nothing here may be probed (it has no ftrace record, and the host refuses notrace code).
 */
#include "abi.h"
#include "pt_regs_asm.h"

	.text
	.align	11
	.globl	vectors
	.type	vectors, %function
vectors:
	.org	vectors + 0x0
	b	el1_bad_vector
	.org	vectors + 0x80
	b	el1_bad_vector
	.org	vectors + 0x100
	b	el1_bad_vector
	.org	vectors + 0x180
	b	el1_bad_vector
	.org	vectors + 0x200
	b	el1h_sync		// current EL with SP_ELx, synchronous: the BRK exceptions
	.org	vectors + 0x280
	b	el1_bad_vector
	.org	vectors + 0x300
	b	el1_bad_vector
	.org	vectors + 0x380
	b	el1_bad_vector
	.org	vectors + 0x400
	b	el1_bad_vector
	.org	vectors + 0x480
	b	el1_bad_vector
	.org	vectors + 0x500
	b	el1_bad_vector
	.org	vectors + 0x580
	b	el1_bad_vector
	.org	vectors + 0x600
	b	el1_bad_vector
	.org	vectors + 0x680
	b	el1_bad_vector
	.org	vectors + 0x700
	b	el1_bad_vector
	.org	vectors + 0x780
	b	el1_bad_vector
	.org	vectors + 0x800
	.size	vectors, . - vectors

	.globl	el1_bad_vector
	.type	el1_bad_vector, %function
el1_bad_vector:
	brk	#0x800			// BUG(): an exception this kernel never takes
	.size	el1_bad_vector, . - el1_bad_vector

/* kernel_entry: push pt_regs below the interrupted sp (AArch64 has no red zone), call the C handler, eret */
	.globl	el1h_sync
	.type	el1h_sync, %function
el1h_sync:
	pt_regs_push_x0_x29
	add	x0, sp, #PT_REGS_SIZE
	stp	x30, x0, [sp, #PT_REGS_REGS + 8 * 30]	// regs[30] and sp (they are adjacent)
	mrs	x1, elr_el1
	mrs	x2, spsr_el1
	stp	x1, x2, [sp, #PT_REGS_PC]
	mov	x0, sp
	mrs	x1, esr_el1
	bl	do_debug_exception
	ldp	x1, x2, [sp, #PT_REGS_PC]		// the handlers' pc and pstate
	msr	elr_el1, x1
	msr	spsr_el1, x2
	pt_regs_pop_x0_x29
	ldr	x30, [sp, #PT_REGS_REGS + 8 * 30]
	add	sp, sp, #PT_REGS_SIZE			// regs->sp is not restored (kernel mode, as Linux)
	eret
	.size	el1h_sync, . - el1h_sync
