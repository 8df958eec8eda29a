/*
 * The guest half of livepatch (kernel/livepatch/patch.c, transition.c, shadow.c): what runs per patched call
 * and per task, with the host driving transitions from outside.
 *
 *   klp_ftrace_handler      the ftrace callback of every patched function: picks the func_stack entry this
 *                           task must run and points fregs->pc at it
 *   klp_update_patch_state  a task passing a kernel exit adopts klp_target_state if it was asked to
 *   klp_shadow_*            shadow variables: lookups walk the table here; writers go through the host, whose
 *                           lock plays klp_shadow_lock (the emulated CPUs have no cross-CPU atomic
 *                           read-modify-write, so a guest spinlock could not be made correct)
 */
#include "kernel.h"

/* The state a task switches to; KLP_TRANSITION_IDLE between transitions. Written by the host while parked. */
u64 klp_target_state = KLP_TRANSITION_IDLE;

/* Shadow-variable buckets; nodes are linked by the host with one 8-byte store (readers never see half). */
struct klp_shadow *klp_shadow_hash[1 << SHADOW_HASH_BITS];

notrace void klp_ftrace_handler(u64 ip, u64 parent_ip, struct ftrace_ops *fops, struct ftrace_regs *fregs)
{
	struct klp_ops *ops = (struct klp_ops *)fops->private;
	struct klp_func *func = READ_ONCE(ops->func_stack);
	u64 cpu = this_cpu()->cpu;

	(void)ip, (void)parent_ip;
	if (!func)
		goto original;
	if (READ_ONCE(func->transition)) {
		/* During a transition a task that has not switched yet keeps the version below the new one. */
		if (READ_ONCE(current_task()->patch_state) == KLP_TRANSITION_UNPATCHED) {
			func = func->below;
			if (!func)
				goto original; /* no older patch: the original function runs */
		}
	}
	if (func->nop)
		goto original; /* atomic replace dropped this function: the original runs (setting pc would loop) */
	func->calls[cpu]++; /* per CPU: the emulated CPUs have no atomic read-modify-write across CPUs */
	fregs->pc = func->new_func;
	return;
original:
	ops->orig_calls[cpu]++;
}

/* klp_update_patch_state: called by a task on its way out of the kernel (and by idle tasks). */
notrace void klp_update_patch_state(struct task_struct *t)
{
	if (READ_ONCE(t->flags) & TIF_PATCH_PENDING) {
		WRITE_ONCE(t->flags, t->flags & ~(u64)TIF_PATCH_PENDING);
		WRITE_ONCE(t->patch_state, READ_ONCE(klp_target_state));
	}
}

/* -- shadow variables ------------------------------------------------------------------------------------ */

notrace static u64 shadow_bucket(u64 obj)
{
	return ((obj >> 4) * HASH_MULTIPLIER) >> (64 - SHADOW_HASH_BITS);
}

notrace static void *shadow_data(struct klp_shadow *s)
{
	return (u8 *)s + KLP_SHADOW_SIZE;
}

notrace static struct klp_shadow *shadow_request(u64 op, struct klp_shadow_req *req)
{
	host_call(HC_SHADOW, op, (u64)req);
	return (struct klp_shadow *)this_cpu()->trap.ret;
}

notrace void *klp_shadow_get(void *obj, u64 id)
{
	for (struct klp_shadow *s = READ_ONCE(klp_shadow_hash[shadow_bucket((u64)obj)]); s; s = READ_ONCE(s->next))
		if (s->obj == (u64)obj && s->id == id)
			return shadow_data(s);
	return NULL;
}

typedef int (*klp_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*klp_shadow_dtor_t)(void *obj, void *shadow_data);

/*
 * Reserve a zeroed node (host), construct it (here, before anyone can see it), then publish it (host). If
 * another CPU published the same <obj, id> meanwhile, the host discards ours and hands back theirs.
 */
notrace static void *shadow_get_or_alloc(void *obj, u64 id, u64 size, klp_shadow_ctor_t ctor, void *ctor_data,
					 int warn_on_exist)
{
	struct klp_shadow_req req = { .obj = (u64)obj, .id = id, .data_size = size, .warn = (u64)warn_on_exist };
	struct klp_shadow *s;
	void *data = klp_shadow_get(obj, id);

	if (data && !warn_on_exist)
		return data;
	/* a duplicate klp_shadow_alloc goes to the host too, which logs Linux's warning */
	s = shadow_request(SHADOW_RESERVE, &req);
	if (!s)
		return NULL;
	if (req.existing)
		goto exists_node;
	if (ctor) {
		int err = ctor(obj, shadow_data(s), ctor_data);

		if (err) {
			req.err = (u64)(s64)err;
			shadow_request(SHADOW_DISCARD, &req);
			return NULL;
		}
	}
	s = shadow_request(SHADOW_LINK, &req);
	if (!req.existing)
		return shadow_data(s);
exists_node:
	if (warn_on_exist)
		return NULL; /* the host logged "Duplicate shadow variable" */
	return shadow_data(s);
}

notrace void *klp_shadow_alloc(void *obj, u64 id, u64 size, u64 gfp, klp_shadow_ctor_t ctor, void *ctor_data)
{
	(void)gfp;
	return shadow_get_or_alloc(obj, id, size, ctor, ctor_data, 1);
}

notrace void *klp_shadow_get_or_alloc(void *obj, u64 id, u64 size, u64 gfp, klp_shadow_ctor_t ctor,
				      void *ctor_data)
{
	(void)gfp;
	return shadow_get_or_alloc(obj, id, size, ctor, ctor_data, 0);
}

notrace void klp_shadow_free(void *obj, u64 id, klp_shadow_dtor_t dtor)
{
	struct klp_shadow_req req = { .obj = (u64)obj, .id = id };
	struct klp_shadow *s = shadow_request(SHADOW_UNLINK, &req);

	if (s && dtor)
		dtor(obj, shadow_data(s));
}

notrace void klp_shadow_free_all(u64 id, klp_shadow_dtor_t dtor)
{
	struct klp_shadow_req req = { .id = id };
	struct klp_shadow *s;

	while ((s = shadow_request(SHADOW_UNLINK_ID, &req)))
		if (dtor)
			dtor((void *)s->obj, shadow_data(s));
}
