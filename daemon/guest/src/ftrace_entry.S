/*
 * ftrace_caller for DYNAMIC_FTRACE_WITH_ARGS + CALL_OPS + DIRECT_CALLS, as arm64's entry-ftrace.S.
 *
 * Entered from a traced function's `mov x9, x30; bl ftrace_caller` (or from its module PLT) with:
 *   x9  = the traced function's return address (parent_ip)
 *   x30 = rec->ip + 4, where the traced function resumes
 *   x0-x8 = its arguments; x10-x17 free.
 * The call site's ops pointer sits in the 8-byte literal before the function: clearing the low 3 bits of
 * x30 gives literal + 16 whether or not a BTI precedes the site.
 *
 * Stack while the callback runs (FTRACE_REGS_SIZE = 112):
 *   sp + 0   .. 111   struct ftrace_regs (x0-x8, direct_tramp, fp, lr, sp, pc)
 *   sp + 112 .. 127   frame record {x29 -> next, x30}: ftrace_caller itself
 *   sp + 128 .. 143   frame record {caller's x29, x9}: the traced function's caller
 */
#include "abi.h"

#define FREGS(f)	FTRACE_REGS_##f
#define FRAME_SIZE	(FTRACE_REGS_SIZE + 32)

	.text
	.globl ftrace_caller
	.type ftrace_caller, %function
	.balign 8
ftrace_caller:
	bic	x11, x30, #7
	ldr	x11, [x11, #-16]			// x11 = ops from the call-site literal
	ldr	x17, [x11, #FTRACE_OPS_DIRECT_CALL]
	cbnz	x17, ftrace_caller_direct		// a lone direct ops: jump, saving nothing

	mov	x10, sp
	sub	sp, sp, #FRAME_SIZE
	stp	x0, x1, [sp, #FREGS(REGS) + 0]
	stp	x2, x3, [sp, #FREGS(REGS) + 16]
	stp	x4, x5, [sp, #FREGS(REGS) + 32]
	stp	x6, x7, [sp, #FREGS(REGS) + 48]
	str	x8, [sp, #FREGS(REGS) + 64]
	str	xzr, [sp, #FREGS(DIRECT_TRAMP)]
	str	x29, [sp, #FREGS(FP)]
	str	x9, [sp, #FREGS(LR)]
	str	x10, [sp, #FREGS(SP)]
	str	x30, [sp, #FREGS(PC)]
	stp	x29, x9, [sp, #FTRACE_REGS_SIZE + 16]
	add	x29, sp, #FTRACE_REGS_SIZE + 16
	stp	x29, x30, [sp, #FTRACE_REGS_SIZE]
	add	x29, sp, #FTRACE_REGS_SIZE

	sub	x0, x30, #4				// ip = rec->ip
	mov	x1, x9					// parent_ip
	mov	x2, x11					// op
	mov	x3, sp					// fregs
	ldr	x4, [x2, #FTRACE_OPS_FUNC]
	blr	x4					// op->func(ip, parent_ip, op, fregs)

	ldp	x0, x1, [sp, #FREGS(REGS) + 0]
	ldp	x2, x3, [sp, #FREGS(REGS) + 16]
	ldp	x4, x5, [sp, #FREGS(REGS) + 32]
	ldp	x6, x7, [sp, #FREGS(REGS) + 48]
	ldr	x8, [sp, #FREGS(REGS) + 64]
	ldr	x29, [sp, #FREGS(FP)]
	ldr	x17, [sp, #FREGS(DIRECT_TRAMP)]
	cbnz	x17, ftrace_caller_direct_late
	ldr	x30, [sp, #FREGS(LR)]
	ldr	x9, [sp, #FREGS(PC)]			// an IPMODIFY callback may have changed it
	add	sp, sp, #FRAME_SIZE
	ret	x9

ftrace_caller_direct_late:
	ldr	x9, [sp, #FREGS(LR)]
	ldr	x30, [sp, #FREGS(PC)]
	add	sp, sp, #FRAME_SIZE
ftrace_caller_direct:
	br	x17					// x9 = parent, x30 = resume point
	.size ftrace_caller, . - ftrace_caller

/*
 * Where a call hooked by ftrace_graph_func returns (its saved LR was swapped for this address). The return
 * values are live in x0-x7 (and x8, the indirect result pointer, in case a caller relies on it), so they are
 * saved in an ftrace_regs-shaped frame around the C handler, which pops the task's ret_stack and returns the
 * original return address. x29 is already the caller's frame (the traced function's epilogue restored it),
 * so the handler's own frame record links straight to it:
 *   sp + 0 .. 111   struct ftrace_regs (only x0-x8 used)
 */
	.globl return_to_handler
	.type return_to_handler, %function
	.balign 8
return_to_handler:
	sub	sp, sp, #FTRACE_REGS_SIZE
	stp	x0, x1, [sp, #FREGS(REGS) + 0]
	stp	x2, x3, [sp, #FREGS(REGS) + 16]
	stp	x4, x5, [sp, #FREGS(REGS) + 32]
	stp	x6, x7, [sp, #FREGS(REGS) + 48]
	str	x8, [sp, #FREGS(REGS) + 64]
	mov	x0, x29					// the caller's frame, as ftrace_graph_func saw it
	mov	x1, sp					// the return values, for an fprobe's exit handler
	bl	ftrace_return_to_handler
	mov	x30, x0					// the original return address
	ldp	x0, x1, [sp, #FREGS(REGS) + 0]
	ldp	x2, x3, [sp, #FREGS(REGS) + 16]
	ldp	x4, x5, [sp, #FREGS(REGS) + 32]
	ldp	x6, x7, [sp, #FREGS(REGS) + 48]
	ldr	x8, [sp, #FREGS(REGS) + 64]
	add	sp, sp, #FTRACE_REGS_SIZE
	ret
	.size return_to_handler, . - return_to_handler

/* The smallest valid callback and direct trampoline. */
	.globl ftrace_stub
	.type ftrace_stub, %function
ftrace_stub:
	ret
	.size ftrace_stub, . - ftrace_stub

	.globl ftrace_stub_direct_tramp
	.type ftrace_stub_direct_tramp, %function
ftrace_stub_direct_tramp:
	mov	x10, x30
	mov	x30, x9
	ret	x10
	.size ftrace_stub_direct_tramp, . - ftrace_stub_direct_tramp

/*
 * A sample direct trampoline (samples/ftrace/ftrace-direct.c): calls my_direct_func(ip) and returns into
 * the traced function with x30 restored to its caller.
 */
	.globl my_tramp
	.type my_tramp, %function
my_tramp:
	sub	sp, sp, #32
	stp	x9, x30, [sp]
	str	x0, [sp, #16]
	sub	x0, x30, #4
	bl	my_direct_func
	ldp	x30, x9, [sp]
	ldr	x0, [sp, #16]
	add	sp, sp, #32
	ret	x9
	.size my_tramp, . - my_tramp
