/* Declarations shared by the guest kernel's C files. */
#ifndef GUEST_KERNEL_H
#define GUEST_KERNEL_H

#include "abi.h"

extern struct cpu_data cpu_data[MAX_CPUS];
extern struct task_struct tasks[MAX_TASKS];
extern struct boot_params boot_params;

static inline __attribute__((always_inline)) struct cpu_data *this_cpu(void)
{
	struct cpu_data *c;
	__asm__ __volatile__("mrs %0, tpidr_el1" : "=r"(c));
	return c;
}

static inline __attribute__((always_inline)) struct task_struct *current_task(void)
{
	return this_cpu()->current;
}

/* The trace clock: the generic timer's virtual count (CNTFRQ_HZ ticks per second). */
static inline __attribute__((always_inline)) u64 trace_clock(void)
{
	u64 t;
	__asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(t));
	return t;
}

/*
 * The bucket of a host-built struct ftrace_hash holding ip, or -1: open addressing with linear probing, tables at
 * most half full. Inline: the ops filters and the graph tracer's hashes test it on every traced call.
 */
static inline __attribute__((always_inline)) s64 hash_index(const struct ftrace_hash *hash, u64 ip)
{
	u64 mask = (1ULL << hash->size_bits) - 1;
	u64 i = ((ip >> 2) * HASH_MULTIPLIER) >> (64 - hash->size_bits);
	const u64 *buckets = (const u64 *)hash->buckets;

	for (;; i = (i + 1) & mask) {
		u64 entry = buckets[i];

		if (entry == ip)
			return (s64)i;
		if (entry == 0)
			return -1;
	}
}

static inline __attribute__((always_inline)) int hash_contains(const struct ftrace_hash *hash, u64 ip)
{
	return hash_index(hash, ip) >= 0;
}

/* ftrace.c: the next free entry of this CPU's trace ring, or NULL (detached, or full: counted as dropped) */
struct trace_entry *trace_ring_reserve(struct cpu_data *c);

/* ftrace_entry.S */
void return_to_handler(void);

/* entry.S */
void host_call(u64 reason, u64 arg0, u64 arg1);
void cpu_switch_to(struct task_struct *prev, struct task_struct *next);
void ret_from_fork(void);

/*
 * Mark a function as one the host's `call` verbs may run by default: its address goes into the
 * _callable_funcs table (between __start_callable_funcs and __stop_callable_funcs), as Linux's
 * NOKPROBE_SYMBOL() lists addresses in _kprobe_blacklist. The host reads the table from the image; a
 * function not in it is refused unless the daemon allows any call (labs).
 */
#define CALLABLE(fn) \
	static const void *const __callable_##fn __used __section("_callable_funcs") = (const void *)(fn)

/* sched.c */
void schedule(void);
void cond_resched(void);
void wait_on(volatile u64 *addr, u64 val);
u64 wait_on_interruptible(volatile u64 *addr, u64 val);
void __attribute__((noreturn)) panic(const char *msg, u64 value);

/* livepatch.c */
void klp_update_patch_state(struct task_struct *t);

/* lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int vsnprintf(char *buf, size_t size, const char *fmt, __builtin_va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...);

struct seq_file {
	char *buf;
	size_t size;
#ifdef LP_BUILD_6_6
	u64 from;	/* 6.6-lp1: a field before count (a patch built for 6.1 would write the wrong word) */
#endif
	size_t count;
};
int seq_printf(struct seq_file *m, const char *fmt, ...);

/* workload.c */
void loadgen_round(struct task_struct *t);

/* generated corpus */
typedef u64 (*corpus_fn_t)(u64);
struct corpus_param {
	u64 mul;
	u64 add;
	u64 chained; /* 1: f(x) = f_prev(x + mul) ^ add */
};
extern const corpus_fn_t corpus_fns[];
extern const struct corpus_param corpus_params[];
extern const u64 corpus_nr;

#endif
