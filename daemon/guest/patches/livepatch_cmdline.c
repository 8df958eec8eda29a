/*
 * The basic live patch (Linux's test_klp_livepatch): /proc/cmdline's renderer replaced by one that says so.
 */
#include "livepatch.h"

int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	(void)v;
	seq_printf(m, "%s\n", "livepatch_cmdline: this has been live patched");
	return 0;
}
