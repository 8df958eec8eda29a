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

#define KLP_LOG_SIZE 2048

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

#endif
