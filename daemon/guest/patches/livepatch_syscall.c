/*
 * The syscall patch (Linux's test_klp_syscall): getpid replaced by a version that still returns the pid and
 * clears the caller's pid from klp_pids the first time each listed task calls it. The host fills klp_pids
 * before enabling the patch; the number of non-zero entries left is the number of listed tasks that have
 * not yet run the new function (the selftest's npids). Each entry is cleared only by its own task, so the
 * array needs no lock.
 */
#include "livepatch.h"

u64 klp_pids[MAX_TASKS];

u64 livepatch_sys_getpid(u64 regs)
{
	u64 pid = current_task()->pid;

	(void)regs;
	for (u64 i = 0; i < MAX_TASKS; i++) {
		if (klp_pids[i] == pid) {
			klp_pids[i] = 0;
			break;
		}
	}
	return pid;
}
