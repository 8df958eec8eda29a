/* Fixed-width types and the attributes every guest file uses. */
#ifndef GUEST_TYPES_H
#define GUEST_TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
typedef unsigned long size_t;

#define NULL ((void *)0)

/*
 * Like Linux with CC_USING_PATCHABLE_FUNCTION_ENTRY: "notrace" removes the patchable entry, so the function
 * gets no __patchable_function_entries record and can never be traced (scheduler, entry code, ftrace itself).
 */
#define notrace __attribute__((patchable_function_entry(0, 0)))
#define noinline __attribute__((noinline))
#define __used __attribute__((used))
#define __aligned(x) __attribute__((aligned(x)))
#define __section(s) __attribute__((section(s)))
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define barrier() __asm__ __volatile__("" ::: "memory")

#endif
