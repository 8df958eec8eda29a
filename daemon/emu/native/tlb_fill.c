/*
 * Unicorn UC_HOOK_TLB_FILL callback for the virtual TLB: guest virtual == guest physical, with the permissions
 * of the region that holds the page; an address outside every region, or an access the region does not allow,
 * is refused (the engine then stops with UC_ERR_EXCEPTION and the host reports the refusal recorded here).
 *
 * One table per engine (user_data), written only by that engine's vCPU thread, so no locking. Unicorn passes
 * the page address (vaddr & TARGET_PAGE_MASK, 1 KiB pages on AArch64); regions are 4 KiB aligned, so a page
 * never straddles two of them. Built without libc: the file must compile the same on every host.
 */
typedef unsigned long long u64;
typedef unsigned int u32;

enum { UC_PROT_READ = 1, UC_PROT_WRITE = 2, UC_PROT_EXEC = 4 };
enum { UC_MEM_READ = 16, UC_MEM_WRITE = 17, UC_MEM_FETCH = 18 };

struct uc_tlb_entry {
	u64 paddr;
	u32 perms; /* uc_prot */
};

struct lpd_region {
	u64 base;
	u64 end;
	u64 perms;
};

#define LPD_MAX_REGIONS 32

struct lpd_tlb_table {
	u64 nr_regions;
	u64 fills;         /* successful fills: TLB misses served */
	u64 refused;       /* fills refused (faults, and probes that fail) */
	u64 refused_page;  /* the last refusal */
	u64 refused_type;  /* its uc_mem_type */
	u64 refused_perms; /* its region's perms, or ~0 if no region holds the page */
	struct lpd_region regions[LPD_MAX_REGIONS]; /* sorted by base, disjoint */
};

static u32 needed(int type)
{
	switch (type) {
	case UC_MEM_READ:
		return UC_PROT_READ;
	case UC_MEM_WRITE:
		return UC_PROT_WRITE;
	case UC_MEM_FETCH:
		return UC_PROT_EXEC;
	default:
		return UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC; /* unknown access: never granted */
	}
}

__attribute__((visibility("default"))) _Bool lpd_tlb_fill(void *uc, u64 vaddr, int type, struct uc_tlb_entry *e,
							   void *user_data)
{
	struct lpd_tlb_table *t = user_data;
	u64 lo = 0, hi = t->nr_regions;

	(void)uc;
	while (lo < hi) { /* the last region with base <= vaddr */
		u64 mid = lo + (hi - lo) / 2;
		if (t->regions[mid].base <= vaddr)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo > 0 && vaddr < t->regions[lo - 1].end) {
		u32 perms = (u32)t->regions[lo - 1].perms;
		u32 want = needed(type);
		if ((perms & want) == want) {
			e->paddr = vaddr;
			e->perms = perms;
			t->fills++;
			return 1;
		}
		t->refused_perms = perms;
	} else {
		t->refused_perms = ~0ULL;
	}
	t->refused++;
	t->refused_page = vaddr;
	t->refused_type = (u64)type;
	return 0;
}
