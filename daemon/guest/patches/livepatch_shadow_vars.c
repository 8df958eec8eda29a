/*
 * Shadow variables (Linux's test_klp_shadow_vars): the selftest sequence over 3 objects x 2 ids, logged to
 * klp_log with pointers printed as PTRn tokens (PTR0 is NULL), so a host can compare the transcript.
 *
 * Like the Linux module this patch replaces nothing and has no callbacks: the host runs the sequence by calling
 * shadow_selftest() (all passes, Linux's module init) or shadow_selftest_pass(0..6) one pass at a time (the
 * objects and the returned pointers are globals, so the host can inspect the table between passes).
 * The kernel's klp_shadow_* writers trap to the host (HC_SHADOW): its ShadowVars must be bound to the kernel.
 *
 * The shadow_stress_* functions are for several CPUs at once (no logging, per-CPU counters): objects are
 * the addresses base + 16 * i, never dereferenced; each variable holds {obj, ctor_data} (get_or_alloc passes
 * the constructing CPU). churn and read pass a safe point after each round, so grace periods can end mid-job.
 */
#define KLP_LOG_SIZE 8192 /* the whole transcript (about 2.7 KiB) */
#include "livepatch.h"

#define GFP_KERNEL 0 /* ignored by the kernel, printed as in Linux */
#define EINVAL 22
#define ENOMEM 12

#define NUM_OBJS 3	/* objects that need shadow variables */
#define SV_ID1 0x1234	/* the "char" field added to each object */
#define SV_ID2 0x1235	/* the "int" field */

KLP_LOG_DEFINE();

struct test_object {
	u64 payload[2]; /* 16 bytes: distinct objects differ in obj >> 4 (distinct buckets likely) */
};

struct test_object shadow_objs[NUM_OBJS];
char nfields1[NUM_OBJS];
int nfields2[NUM_OBJS];
char *pnfields1[NUM_OBJS];
int *pnfields2[NUM_OBJS];
char *pndup[NUM_OBJS];
char **sv1[NUM_OBJS];
int **sv2[NUM_OBJS];
u64 shadow_ctor_calls;
u64 shadow_dtor_calls;

/* Address-agnostic pointer names: the n-th distinct pointer seen is PTRn; ptr_id(NULL) comes first. */
#define MAX_PTRS 64
static void *ptrs[MAX_PTRS];
static int nr_ptrs;

static int ptr_id(void *ptr)
{
	for (int i = 0; i < nr_ptrs; i++)
		if (ptrs[i] == ptr)
			return i;
	if (nr_ptrs == MAX_PTRS)
		return -ENOMEM;
	ptrs[nr_ptrs] = ptr;
	return nr_ptrs++;
}

/* Wrappers echoing the call and its result, as the Linux module's. */
static void *shadow_get(void *obj, u64 id)
{
	void *sv = klp_shadow_get(obj, id);

	klp_logf("klp_shadow_get(obj=PTR%d, id=0x%llx) = PTR%d\n", ptr_id(obj), id, ptr_id(sv));
	return sv;
}

static void *shadow_alloc(void *obj, u64 id, u64 size, u64 gfp_flags, klp_shadow_ctor_t ctor, void *ctor_data)
{
	void **var = ctor_data;
	void *sv = klp_shadow_alloc(obj, id, size, gfp_flags, ctor, var);

	klp_logf("klp_shadow_alloc(obj=PTR%d, id=0x%llx, size=%llx, gfp_flags=GFP_KERNEL), ctor=PTR%d, "
		 "ctor_data=PTR%d = PTR%d\n", ptr_id(obj), id, size, ptr_id((void *)ctor), ptr_id(*var), ptr_id(sv));
	return sv;
}

static void *shadow_get_or_alloc(void *obj, u64 id, u64 size, u64 gfp_flags, klp_shadow_ctor_t ctor,
				 void *ctor_data)
{
	void **var = ctor_data;
	void *sv = klp_shadow_get_or_alloc(obj, id, size, gfp_flags, ctor, var);

	klp_logf("klp_shadow_get_or_alloc(obj=PTR%d, id=0x%llx, size=%llx, gfp_flags=GFP_KERNEL), ctor=PTR%d, "
		 "ctor_data=PTR%d = PTR%d\n", ptr_id(obj), id, size, ptr_id((void *)ctor), ptr_id(*var), ptr_id(sv));
	return sv;
}

static void shadow_free(void *obj, u64 id, klp_shadow_dtor_t dtor)
{
	klp_shadow_free(obj, id, dtor);
	klp_logf("klp_shadow_free(obj=PTR%d, id=0x%llx, dtor=PTR%d)\n", ptr_id(obj), id, ptr_id((void *)dtor));
}

static void shadow_free_all(u64 id, klp_shadow_dtor_t dtor)
{
	klp_shadow_free_all(id, dtor);
	klp_logf("klp_shadow_free_all(id=0x%llx, dtor=PTR%d)\n", id, ptr_id((void *)dtor));
}

/* Constructor: remember a pointer (ctor_data points to it); -EINVAL without ctor_data. */
int shadow_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	void **sv = shadow_data;
	void **var = ctor_data;

	(void)obj;
	if (!var)
		return -EINVAL;
	*sv = *var;
	shadow_ctor_calls++;
	klp_logf("shadow_ctor: PTR%d -> PTR%d\n", ptr_id(sv), ptr_id(*var));
	return 0;
}

void shadow_dtor(void *obj, void *shadow_data)
{
	shadow_dtor_calls++;
	klp_logf("shadow_dtor(obj=PTR%d, shadow_data=PTR%d)\n", ptr_id(obj), ptr_id(shadow_data));
}

/* One pass of the selftest: 0 or a -errno. Pass 0 resets the pointer names and the counters. */
int shadow_selftest_pass(int pass)
{
	void **sv;
	int i;

	switch (pass) {
	case 0: /* with an empty table, expect no match */
		nr_ptrs = 0;
		shadow_ctor_calls = shadow_dtor_calls = 0;
		ptr_id(NULL);
		sv = shadow_get(&shadow_objs[0], SV_ID1);
		if (sv)
			return -EINVAL;
		klp_logf("  got expected NULL result\n");
		return 0;
	case 1: /* alloc a char + int pair of shadow variables for each object */
		for (i = 0; i < NUM_OBJS; i++) {
			pnfields1[i] = &nfields1[i];
			ptr_id(pnfields1[i]);
			if (i % 2)
				sv1[i] = shadow_alloc(&shadow_objs[i], SV_ID1, sizeof(pnfields1[i]), GFP_KERNEL,
						      shadow_ctor, &pnfields1[i]);
			else
				sv1[i] = shadow_get_or_alloc(&shadow_objs[i], SV_ID1, sizeof(pnfields1[i]),
							     GFP_KERNEL, shadow_ctor, &pnfields1[i]);
			if (!sv1[i])
				return -ENOMEM;
			pnfields2[i] = &nfields2[i];
			ptr_id(pnfields2[i]);
			sv2[i] = shadow_alloc(&shadow_objs[i], SV_ID2, sizeof(pnfields2[i]), GFP_KERNEL, shadow_ctor,
					      &pnfields2[i]);
			if (!sv2[i])
				return -ENOMEM;
		}
		return 0;
	case 2: /* find the shadow variables and what they point to */
		for (i = 0; i < NUM_OBJS; i++) {
			sv = shadow_get(&shadow_objs[i], SV_ID1);
			if (!sv || (char **)sv != sv1[i] || *sv1[i] != pnfields1[i])
				return -EINVAL;
			klp_logf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv1[i]), ptr_id(*sv1[i]));
			sv = shadow_get(&shadow_objs[i], SV_ID2);
			if (!sv || (int **)sv != sv2[i] || *sv2[i] != pnfields2[i])
				return -EINVAL;
			klp_logf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv2[i]), ptr_id(*sv2[i]));
		}
		return 0;
	case 3: /* get_or_alloc returns the existing variables (no constructor call) */
		for (i = 0; i < NUM_OBJS; i++) {
			pndup[i] = &nfields1[i];
			ptr_id(pndup[i]);
			sv = shadow_get_or_alloc(&shadow_objs[i], SV_ID1, sizeof(pndup[i]), GFP_KERNEL, shadow_ctor,
						 &pndup[i]);
			if (!sv || (char **)sv != sv1[i] || *sv1[i] != pnfields1[i])
				return -EINVAL;
			klp_logf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv1[i]), ptr_id(*sv1[i]));
		}
		return 0;
	case 4: /* free the <objs[*], SV_ID1> pairs, with the destructor */
		for (i = 0; i < NUM_OBJS; i++) {
			shadow_free(&shadow_objs[i], SV_ID1, shadow_dtor);
			sv = shadow_get(&shadow_objs[i], SV_ID1);
			if (sv)
				return -EINVAL;
			klp_logf("  got expected NULL result\n");
		}
		return 0;
	case 5: /* the <objs[*], SV_ID2> pairs are still there */
		for (i = 0; i < NUM_OBJS; i++) {
			sv = shadow_get(&shadow_objs[i], SV_ID2);
			if (!sv || (int **)sv != sv2[i] || *sv2[i] != pnfields2[i])
				return -EINVAL;
			klp_logf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv2[i]), ptr_id(*sv2[i]));
		}
		return 0;
	case 6: /* free all the <objs[*], SV_ID2> pairs, without a destructor */
		shadow_free_all(SV_ID2, NULL);
		for (i = 0; i < NUM_OBJS; i++) {
			sv = shadow_get(&shadow_objs[i], SV_ID2);
			if (sv)
				return -EINVAL;
			klp_logf("  got expected NULL result\n");
		}
		return 0;
	}
	return -EINVAL;
}

#define NUM_PASSES 7

/* The whole selftest (the Linux module's init): on an error, free whatever it allocated. */
int shadow_selftest(void)
{
	for (int pass = 0; pass < NUM_PASSES; pass++) {
		int ret = shadow_selftest_pass(pass);

		if (ret) {
			klp_shadow_free_all(SV_ID1, NULL);
			klp_shadow_free_all(SV_ID2, NULL);
			return ret;
		}
	}
	return 0;
}

/* -- several CPUs at once ----------------------------------------------------------------------------- */

u64 shadow_stress_ctor_calls[MAX_CPUS];
u64 shadow_stress_dtor_calls[MAX_CPUS];
u64 shadow_stress_hits[MAX_CPUS];

static void *stress_obj(u64 base, u64 i)
{
	return (void *)(base + 16 * i);
}

int shadow_stress_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	u64 *d = shadow_data;

	d[0] = (u64)obj;
	d[1] = (u64)ctor_data;
	shadow_stress_ctor_calls[this_cpu()->cpu]++;
	return 0;
}

void shadow_stress_dtor(void *obj, void *shadow_data)
{
	u64 *d = shadow_data;

	if (d[0] == (u64)obj)
		shadow_stress_dtor_calls[this_cpu()->cpu]++;
}

/*
 * get_or_alloc <base + 16 i, id> for i < n, `rounds` times over; out[i] gets the data pointer. Returns the
 * number of bad results: NULL, data not holding obj, or a pointer that changed between rounds.
 */
u64 shadow_stress_get_or_alloc(u64 base, u64 n, u64 id, u64 *out, u64 rounds)
{
	u64 bad = 0;

	for (u64 r = 0; r < rounds; r++) {
		for (u64 i = 0; i < n; i++) {
			void *obj = stress_obj(base, i);
			u64 *d = klp_shadow_get_or_alloc(obj, id, 16, GFP_KERNEL, shadow_stress_ctor,
							 (void *)this_cpu()->cpu);

			if (!d || d[0] != (u64)obj || (r && out[i] != (u64)d))
				bad++;
			out[i] = (u64)d;
		}
	}
	return bad;
}

/* klp_shadow_free of each <base + 16 i, id>, with a destructor counting per CPU. */
u64 shadow_stress_free(u64 base, u64 n, u64 id)
{
	for (u64 i = 0; i < n; i++)
		klp_shadow_free(stress_obj(base, i), id, shadow_stress_dtor);
	return shadow_stress_dtor_calls[this_cpu()->cpu];
}

u64 shadow_stress_free_all(u64 id)
{
	klp_shadow_free_all(id, shadow_stress_dtor);
	return shadow_stress_dtor_calls[this_cpu()->cpu];
}

/* Allocate then free <base + 16 i, id> for i < n, `rounds` times: returns the number of failed allocations. */
u64 shadow_stress_churn(u64 base, u64 n, u64 id, u64 rounds)
{
	u64 bad = 0;

	for (u64 r = 0; r < rounds; r++) {
		for (u64 i = 0; i < n; i++)
			if (!klp_shadow_alloc(stress_obj(base, i), id, 16, GFP_KERNEL, shadow_stress_ctor, NULL))
				bad++;
		for (u64 i = 0; i < n; i++)
			klp_shadow_free(stress_obj(base, i), id, shadow_stress_dtor);
		cond_resched(); /* a safe point: a grace period may end here */
	}
	return bad;
}

/*
 * Look up <base + 16 i, id> for i < n, `rounds` times, while other CPUs add and free them: a hit must hold
 * its own obj (a reader never sees a node being reused). Returns the number of bad hits.
 */
u64 shadow_stress_read(u64 base, u64 n, u64 id, u64 rounds)
{
	u64 bad = 0, hits = 0;

	for (u64 r = 0; r < rounds; r++) {
		for (u64 i = 0; i < n; i++) {
			u64 *d = klp_shadow_get(stress_obj(base, i), id);

			if (d) {
				hits++;
				if (READ_ONCE(d[0]) != (u64)stress_obj(base, i))
					bad++;
			}
		}
		cond_resched(); /* no node pointer is held across it */
	}
	shadow_stress_hits[this_cpu()->cpu] += hits;
	return bad;
}
