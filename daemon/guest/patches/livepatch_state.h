/*
 * System-state patches (Linux's test_klp_state, test_klp_state2, test_klp_state3): they replace no function
 * and carry state KLP_STATE_ID at version KLP_STATE_VERSION in their manifests. The host refuses a patch
 * whose version of a state is lower than an installed patch's (state 0x1: v1, v2, v2: state3 may follow
 * state2 and state2 may follow state3, state may follow neither). The callbacks log each step with the
 * version, so tests can see which patch ran which callback and that a replaced patch's were skipped.
 */
#include "livepatch.h"

#define KLP_STATE_ID 0x1

KLP_LOG_DEFINE();

int pre_patch_callback(const char *objname)
{
	klp_logf("pre_patch_callback: %s: state 0x%x version %d\n", objname, KLP_STATE_ID, KLP_STATE_VERSION);
	return 0;
}

void post_patch_callback(const char *objname)
{
	klp_logf("post_patch_callback: %s: state 0x%x version %d\n", objname, KLP_STATE_ID, KLP_STATE_VERSION);
}

void pre_unpatch_callback(const char *objname)
{
	klp_logf("pre_unpatch_callback: %s: state 0x%x version %d\n", objname, KLP_STATE_ID, KLP_STATE_VERSION);
}

void post_unpatch_callback(const char *objname)
{
	klp_logf("post_unpatch_callback: %s: state 0x%x version %d\n", objname, KLP_STATE_ID, KLP_STATE_VERSION);
}
