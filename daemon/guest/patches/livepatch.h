/*
 * The patch side of the live-patch ABI: what a patch object may rely on besides kernel.h.
 *
 * A patch is one C file compiled with the kernel's own flags (so its functions have patchable entries and
 * can be traced too) and loaded into the module area; calls into the kernel go through PLT veneers.
 *
 * Callbacks are named per object in the patch's manifest and called by the host on a worker task, with the
 * object's name ("vmlinux") as a guest string:
 *
 *	int  pre_patch(const char *objname)	0, or a -errno that refuses the patch
 *	void post_patch(const char *objname)
 *	void pre_unpatch(const char *objname)
 *	void post_unpatch(const char *objname)
 *
 * The guest has no printk: KLP_LOG_DEFINE() gives a patch a log (symbol "klp_log": u64 len, then text) that
 * klp_logf() appends lines to and the host reads through the loaded module's symbols. Only callbacks log:
 * they run one at a time, so the log needs no lock.
 */
#ifndef GUEST_LIVEPATCH_H
#define GUEST_LIVEPATCH_H

#include "kernel.h"

#ifndef KLP_LOG_SIZE /* a patch may define a larger log before including this header */
#define KLP_LOG_SIZE 2048
#endif

struct klp_log {
	u64 len;
	char text[KLP_LOG_SIZE];
};

#define KLP_LOG_DEFINE() struct klp_log klp_log

extern struct klp_log klp_log;

static inline __attribute__((format(printf, 1, 2))) void klp_logf(const char *fmt, ...)
{
	__builtin_va_list ap;
	u64 len = klp_log.len;
	int n;

	if (len + 1 >= KLP_LOG_SIZE)
		return;
	__builtin_va_start(ap, fmt);
	n = vsnprintf(klp_log.text + len, KLP_LOG_SIZE - len, fmt, ap);
	__builtin_va_end(ap);
	len += (u64)n;
	klp_log.len = len < KLP_LOG_SIZE ? len : KLP_LOG_SIZE - 1;
}

/*
 * Shadow variables (Linux's klp_shadow_*, kernel/livepatch/shadow.c), implemented by the kernel: lookups walk
 * the table in the guest, writers go through the host (HC_SHADOW), which plays klp_shadow_lock. The data is
 * zeroed and 16-byte aligned. Differences from Linux: the constructor runs before the variable is published,
 * outside the host's lock (it must not sleep all the same), and a constructor may run for a variable that is
 * then dropped because another CPU published the same <obj, id> first (no destructor runs for it). The
 * destructor runs after the variable is unhashed; its memory is freed after a host grace period.
 */
typedef int (*klp_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*klp_shadow_dtor_t)(void *obj, void *shadow_data);

void *klp_shadow_get(void *obj, u64 id);
void *klp_shadow_alloc(void *obj, u64 id, u64 size, u64 gfp, klp_shadow_ctor_t ctor, void *ctor_data);
void *klp_shadow_get_or_alloc(void *obj, u64 id, u64 size, u64 gfp, klp_shadow_ctor_t ctor, void *ctor_data);
void klp_shadow_free(void *obj, u64 id, klp_shadow_dtor_t dtor);
void klp_shadow_free_all(u64 id, klp_shadow_dtor_t dtor);

#endif
