/* The vCPUs' TLB fill: guest virtual = guest physical.
 *
 * Unicorn calls it on every miss of its virtual TLB (every 1 KiB target page on AArch64), so it stays in C: a
 * Python callback costs ~3 us per miss. The entry grants every access; what the guest may do is decided one
 * level down, by the permissions of the memory region the physical address falls in (mem_map_ptr), exactly as
 * with the emulated CPU TLB:
 *
 *   access                      CPU TLB              virtual TLB + this fill
 *   store to text or rodata     UC_ERR_WRITE_PROT    UC_ERR_WRITE_PROT
 *   fetch from data or heap     UC_ERR_FETCH_PROT    UC_ERR_FETCH_PROT
 *   read outside every region   UC_ERR_READ_UNMAPPED UC_ERR_READ_UNMAPPED
 *
 * Narrowing the entry's perms to the region's instead would turn each of these into a guest exception
 * (UC_ERR_EXCEPTION, the kernel has no vector table), and refusing the fill likewise: the host could no longer
 * tell a write to text from a wild read.
 */
#include <stdbool.h>
#include <stdint.h>

struct uc_tlb_entry {
    uint64_t paddr;
    uint32_t perms;
};

enum { LP_PROT_ALL = 7 }; /* UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC */

/* Unicorn's AArch64 target page is 1 KiB: a fill covers vaddr & ~0x3ff, never a 4 KiB page (that would alias
 * four guest pages onto one). */
#define LP_TARGET_PAGE_MASK (~(uint64_t)0x3ff)

/* user_data: the engine's own miss counter (one per vCPU, so no two threads share it). */
bool lp_tlb_fill(void *uc, uint64_t vaddr, int type, struct uc_tlb_entry *result, void *user_data)
{
    (void)uc;
    (void)type;
    ++*(uint64_t *)user_data;
    result->paddr = vaddr & LP_TARGET_PAGE_MASK;
    result->perms = LP_PROT_ALL;
    return true;
}
