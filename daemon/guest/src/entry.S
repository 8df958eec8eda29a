/*
 * Low-level entry: CPU bring-up, context switch, the host-call trap and the counting trampoline.
 * Nothing here has a patchable entry: it is the machinery that tracing and scheduling stand on.
 */
#include "abi.h"

/*
 * Every vCPU starts here with TPIDR_EL1 = &cpu_data[cpu]. Its idle task is tasks[cpu], whose stack is
 * task_stacks[cpu]; the top 16 bytes hold the final frame record {0, 0} where every unwind must end.
 */
	.section .head.text, "ax"
	.globl primary_entry
	.globl secondary_entry
	.type primary_entry, %function
	.type secondary_entry, %function
primary_entry:
	adrp	x19, start_kernel
	add	x19, x19, :lo12:start_kernel
	b	1f
secondary_entry:
	adrp	x19, secondary_start_kernel
	add	x19, x19, :lo12:secondary_start_kernel
1:	adrp	x0, vectors		// the BRK exceptions of kprobes (kprobes_entry.S)
	add	x0, x0, :lo12:vectors
	msr	vbar_el1, x0
	isb
	mrs	x0, tpidr_el1
	ldr	x1, [x0, #CPU_DATA_CPU]
	add	x1, x1, #1
	lsl	x1, x1, #THREAD_SHIFT
	adrp	x2, task_stacks
	add	x2, x2, :lo12:task_stacks
	add	x2, x2, x1
	sub	sp, x2, #16
	stp	xzr, xzr, [sp]
	mov	x29, sp
	mov	x30, xzr
	blr	x19
	brk	#0x800
	.size primary_entry, . - primary_entry
	.size secondary_entry, . - secondary_entry

	.text
/*
 * void host_call(u64 reason, u64 arg0, u64 arg1): record why we trap and the caller's frame, then svc.
 * The host's svc hook runs on this vCPU's own thread (0.5 us), which is the only safe place to stop it.
 */
	.globl host_call
	.type host_call, %function
host_call:
	mrs	x9, tpidr_el1
	add	x9, x9, #CPU_DATA_TRAP
	stp	x0, x1, [x9, #HOST_TRAP_REASON]
	str	x2, [x9, #HOST_TRAP_ARG1]
	stp	x29, x30, [x9, #HOST_TRAP_FP]
	svc	#0
	ret
	.size host_call, . - host_call

/* void cpu_switch_to(prev, next): save prev's callee-saved context, load next's (arm64 cpu_switch_to). */
	.globl cpu_switch_to
	.type cpu_switch_to, %function
cpu_switch_to:
	add	x8, x0, #TASK_STRUCT_CPU_CONTEXT
	mov	x9, sp
	stp	x19, x20, [x8], #16
	stp	x21, x22, [x8], #16
	stp	x23, x24, [x8], #16
	stp	x25, x26, [x8], #16
	stp	x27, x28, [x8], #16
	stp	x29, x9, [x8], #16
	str	x30, [x8]
	add	x8, x1, #TASK_STRUCT_CPU_CONTEXT
	ldp	x19, x20, [x8], #16
	ldp	x21, x22, [x8], #16
	ldp	x23, x24, [x8], #16
	ldp	x25, x26, [x8], #16
	ldp	x27, x28, [x8], #16
	ldp	x29, x9, [x8], #16
	ldr	x30, [x8]
	mov	sp, x9
	ret
	.size cpu_switch_to, . - cpu_switch_to

/* A new task's first instructions: x19 = body, x20 = its argument, x29 = its final frame record. */
	.globl ret_from_fork
	.type ret_from_fork, %function
ret_from_fork:
	mov	x0, x20
	blr	x19
	brk	#0x800			// task bodies never return
	.size ret_from_fork, . - ret_from_fork

/*
 * The counting trampoline: a call-site target for tests and benchmarks of text patching. Entered from
 * `mov x9, x30; bl count_tramp` in a function's prologue with x9 = the caller's LR and x30 = the
 * instruction after the BL, so it may use only x9-x17 and must return with x30 restored, like ftrace_caller.
 */
	.globl count_tramp
	.type count_tramp, %function
count_tramp:
	mrs	x10, tpidr_el1
	ldr	x11, [x10, #CPU_DATA_TRACE_HITS]
	add	x11, x11, #1
	str	x11, [x10, #CPU_DATA_TRACE_HITS]
	mov	x10, x30
	mov	x30, x9
	ret	x10
	.size count_tramp, . - count_tramp
