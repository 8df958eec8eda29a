/*
 * An atomic-replace patch (Linux's test_klp_atomic_replace with replace=1): once its transition completes,
 * every earlier patch is gone, so /proc/cmdline shows this patch's text and nothing else remains patched.
 */
#include "livepatch.h"

int livepatch_atomic_replace_cmdline_proc_show(struct seq_file *m, void *v)
{
	(void)v;
	seq_printf(m, "%s\n", "livepatch_atomic_replace: this has been live patched");
	return 0;
}
