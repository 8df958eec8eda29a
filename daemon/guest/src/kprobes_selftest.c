/*
 * Functions for the kprobes tests: between them they hold every instruction class the kprobe decoder treats
 * differently (stepped out of line, each simulated class, and the refused ones), in traceable functions.
 */
#include "kernel.h"

u64 kpt_table[4] = { 0x1111, 0x2222, 0x3333, 0x4444 };
u64 kpt_counter;

noinline u64 kpt_leaf(u64 x)
{
	return x * 3 + 1;
}

/* CBZ, TBZ/TBNZ, B.cond, B, ADRP (kpt_table), loads and stores */
noinline u64 kpt_branches(u64 x)
{
	u64 r = 0;

	if (!x)
		return 7;
	for (u64 i = 0; i < (x & 15); i++) {
		if (x & (1ULL << i))
			r += i;
		else
			r ^= i << 3;
	}
	if (x & (1ULL << 40))
		r += 0x100;
	return r + kpt_table[x & 3];
}

/* LDR (literal) x and w, LDRSW (literal), ADR, BR */
noinline u64 kpt_literal(u64 x)
{
	u64 v, w, s, a;

	__asm__ __volatile__(
		"ldr	%0, 1f\n\t"
		"ldr	%w1, 2f\n\t"
		"ldrsw	%2, 2f\n\t"
		"adr	%3, 1f\n\t"
		"adr	x9, 3f\n\t"
		"br	x9\n\t"
		".balign 8\n"
		"1:	.quad 0x1122334455667788\n"
		"2:	.word 0x80000001\n"
		"3:"
		: "=&r"(v), "=&r"(w), "=&r"(s), "=&r"(a) : : "x9");
	return (v ^ x) + w + s + (a & 7);
}

static u64 (*volatile kpt_fn)(u64) = kpt_leaf;

/* BL, BLR, RET */
noinline u64 kpt_calls(u64 x)
{
	return kpt_leaf(x) + kpt_fn(x + 1);
}

/* load/store exclusive (an LL/SC loop): refused */
noinline u64 kpt_atomic(u64 x)
{
	return __atomic_fetch_add(&kpt_counter, x, __ATOMIC_RELAXED);
}

/* MRS DAIF (the step masks DAIF) and an exception-generating instruction: refused */
noinline u64 kpt_sysregs(u64 x)
{
	u64 daif;

	__asm__ __volatile__("mrs %0, daif" : "=r"(daif));
	if (x == 0xdead)
		__builtin_trap();
	return daif | x;
}

/* TBZ, TBNZ, CBNZ (32-bit) */
noinline u64 kpt_testbit(u64 x)
{
	u64 r = x;

	__asm__ __volatile__(
		"tbz	%1, #3, 1f\n\t"
		"add	%0, %0, #0x10\n"
		"1:	tbnz	%1, #40, 2f\n\t"
		"add	%0, %0, #0x200\n"
		"2:	cbnz	%w1, 3f\n\t"
		"add	%0, %0, #0x300\n"
		"3:"
		: "+r"(r) : "r"(x));
	return r;
}

/* A loop over the probed functions, for load on every vCPU while probes come and go */
noinline u64 kpt_loop(u64 n)
{
	u64 s = 0;

	for (u64 i = 0; i < n; i++)
		s = (s << 1 | s >> 63) ^ kpt_branches(i * 0x9e3779b97f4a7c15ULL) ^ kpt_calls(i) ^ kpt_testbit(i) ^
		    kpt_literal(i);
	return s;
}

/* a load through the argument: a bad pointer faults while the load is stepped out of line */
noinline u64 kpt_load(const u64 *p)
{
	return *(const volatile u64 *)p + 1;
}

/* real recursion (the asm keeps the compiler from turning it into a loop): kretprobes nest on one function */
noinline u64 kpt_recurse(u64 n)
{
	u64 r;

	if (n == 0)
		return 1;
	r = kpt_recurse(n - 1);
	__asm__ __volatile__("" : "+r"(r));
	return n * 2 + r;
}
