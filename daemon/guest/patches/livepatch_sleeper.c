/*
 * A patch for a function a task can sleep in (Linux's test_klp_callbacks_busy): sleeper_middle adds 20
 * instead of 10. While a worker sleeps inside the original, the patching transition cannot switch it.
 */
#include "livepatch.h"

#define RESTART (-(u64)ERESTARTSYS)

u64 sleeper_inner(u64 flag);

u64 livepatch_sleeper_middle(u64 flag)
{
	u64 r = sleeper_inner(flag);

	return r == RESTART ? r : r + 20;
}
