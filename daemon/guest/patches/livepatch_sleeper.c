/*
 * A patch for a function a task can sleep in (Linux's test_klp_callbacks_busy): sleeper_middle adds 20
 * instead of 10. While a worker sleeps inside the original, the patching transition cannot switch it.
 * Its callbacks log, so tests can check which ones run when a stalled transition is reversed.
 */
#include "livepatch.h"

#define RESTART (-(u64)ERESTARTSYS)

KLP_LOG_DEFINE();

u64 sleeper_inner(u64 flag);

u64 livepatch_sleeper_middle(u64 flag)
{
	u64 r = sleeper_inner(flag);

	return r == RESTART ? r : r + 20;
}

int pre_patch_callback(const char *objname)
{
	klp_logf("pre_patch_callback: %s\n", objname);
	return 0;
}

void post_patch_callback(const char *objname)
{
	klp_logf("post_patch_callback: %s\n", objname);
}

void pre_unpatch_callback(const char *objname)
{
	klp_logf("pre_unpatch_callback: %s\n", objname);
}

void post_unpatch_callback(const char *objname)
{
	klp_logf("post_unpatch_callback: %s\n", objname);
}
