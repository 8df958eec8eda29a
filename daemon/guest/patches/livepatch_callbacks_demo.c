/*
 * Callbacks (Linux's test_klp_callbacks_demo): each callback logs "<callback>: <object>" to klp_log, and
 * pre_patch returns pre_patch_ret, which the host may set beforehand (-19, -ENODEV, refuses the patch, as
 * the selftests' module parameter does).
 *
 * It also replaces work_step_c with a function that computes the same value and counts its calls per CPU,
 * so the load generators' self-checks keep passing while the patch is live and tests can see it run.
 */
#include "livepatch.h"

KLP_LOG_DEFINE();
int pre_patch_ret;
u64 livepatch_work_step_c_calls[MAX_CPUS];

u64 livepatch_work_step_c(u64 x)
{
	livepatch_work_step_c_calls[this_cpu()->cpu]++;
	return (x ^ (x >> 7)) * 0x2545f4914f6cdd1dULL;
}

int pre_patch_callback(const char *objname)
{
	klp_logf("pre_patch_callback: %s\n", objname);
	return pre_patch_ret;
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
