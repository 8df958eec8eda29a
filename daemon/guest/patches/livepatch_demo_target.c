/*
 * The stress patch: klp_demo_target's 3x + 1 becomes 5x + 2, so a caller can tell which version ran
 * (klp_check_loop counts both and flags anything else).
 */
#include "livepatch.h"

u64 livepatch_klp_demo_target(u64 x)
{
	return x * 5 + 2;
}
