/*
 * A patch that reads a kernel struct whose layout differs between builds: in 6.6-lp1 struct seq_file gained a
 * field (`from`) before `count`, which moved from offset 16 to 24. The replacement renders a line, then reads
 * how full the seq_file is (`count`) and its capacity (`size`, at the same offset in every build) and says so.
 *
 * Built once per build (`patch build --all-builds`), each bundle is compiled with its build's struct layout
 * and reads `count` where that build keeps it. One object for every build could not be right on all of them:
 * 6.1's offset on 6.6 reads `from` (0), and the build-id check refuses such a bundle anyway.
 */
#include "livepatch.h"

int livepatch_seq_count_cmdline_proc_show(struct seq_file *m, void *v)
{
	size_t used;

	(void)v;
	seq_printf(m, "%s\n", "livepatch_seq_count: this has been live patched");
	used = m->count;
	seq_printf(m, "seq_file: %u of %u bytes used\n", (unsigned)used, (unsigned)m->size);
	return 0;
}
