/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Process-tree scope, shared by the process and syscalls families.
 *
 * With FM_SCOPE_PROCESS these families observe the scope process and all its
 * descendants, not only the scope process itself: the "tracked" map holds
 * the thread group IDs in the tree. The loader seeds it with the scope
 * process and its living descendants; fork adds a child when its parent is
 * tracked, and the death of a thread group removes it.
 *
 * Include it after flowmill.h, and attach pt_fork/pt_exit (or call them)
 * from sched_process_fork and sched_process_exit.
 *
 * It also decides, at sched_process_exit, whether the exiting thread ends
 * its process (pt_group_dead), the same way on every kernel.
 */
#ifndef __FLOWMILL_PROCTREE_H__
#define __FLOWMILL_PROCTREE_H__

#include "flowmill.h"

/* Thread group IDs of the process tree in scope. The loader sizes it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} tracked SEC(".maps");

/* pt_in_scope reports whether thread group tgid, the current task's, is
 * observed. */
static __always_inline bool pt_in_scope(__u32 tgid)
{
	switch (fm_scope_kind) {
	case FM_SCOPE_PROCESS:
		return bpf_map_lookup_elem(&tracked, &tgid) != NULL;
	case FM_SCOPE_CGROUP:
		return bpf_current_task_under_cgroup(&scope_cgroup, 0) == 1;
	default:
		return true;
	}
}

/* pt_fork follows a new process into the tree. It returns false when the
 * child could not be tracked because the map is full (a loss the caller
 * counts). Threads (same thread group) are not new processes. */
static __always_inline bool pt_fork(__u32 parent_tgid, __u32 child_tgid)
{
	__u8 one = 1;

	if (fm_scope_kind != FM_SCOPE_PROCESS)
		return true;
	if (!bpf_map_lookup_elem(&tracked, &parent_tgid))
		return true;
	return bpf_map_update_elem(&tracked, &child_tgid, &one, BPF_ANY) == 0;
}

/* pt_exit forgets a thread group that died. */
static __always_inline void pt_exit(__u32 tgid)
{
	if (fm_scope_kind == FM_SCOPE_PROCESS)
		bpf_map_delete_elem(&tracked, &tgid);
}

/* ---- the death of a thread group ----
 *
 * sched_process_exit fires once per exiting thread. Only since Linux 6.16
 * does it pass group_dead; reading that argument makes the program fail to
 * attach (EINVAL) on older kernels. Instead: do_exit has already run
 * group_dead = atomic_dec_and_test(&tsk->signal->live) when the tracepoint
 * fires, so signal->live == 0 means every thread of the group has passed
 * that point. The count only falls once it reached 0 (no thread can be
 * created in a dying group).
 *
 * But with exit_group(2) the threads exit concurrently: a thread whose
 * decrement was not the last can still read 0, as can the last. So the
 * first of them to get here claims the death in group_exits, keyed by the
 * thread group ID and the start time of its leader (PIDs are reused; start
 * times are not); the others see the claim and stay silent: they are the
 * same death, not a loss. Claims are only needed for the moments the
 * group's threads take to pass the tracepoint, so an LRU map that forgets
 * old ones does. All threads of an exit_group carry the same exit code.
 */
struct pt_exit_key {
	__u32 tgid;
	__u32 pad;
	__u64 start_ns; /* the group leader's start_time */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct pt_exit_key);
	__type(value, __u8);
} group_exits SEC(".maps");

/* pt_group_left reports whether no thread of t's group is left alive (t is
 * the exiting current task, at sched_process_exit). Cheap: one read. */
static __always_inline bool pt_group_left(struct task_struct *t)
{
	return BPF_CORE_READ(t, signal, live.counter) == 0;
}

/* pt_claim_exit returns true for exactly one of the threads of t's group
 * that found pt_group_left true: the one that reports the death. */
static __always_inline bool pt_claim_exit(struct task_struct *t)
{
	struct pt_exit_key k = {};
	__u8 one = 1;

	k.tgid = BPF_CORE_READ(t, tgid);
	k.start_ns = BPF_CORE_READ(t, group_leader, start_time);
	/* Any other failure than a claim already made (the LRU map evicts
	 * rather than fill up): report, rather than lose the exit. */
	return bpf_map_update_elem(&group_exits, &k, &one, BPF_NOEXIST) != -EEXIST;
}

/*
 * PT_EXIT_PROGRAMS defines the family's programs on sched_process_exit,
 * on_exit and on_exit_again (FM_TWICE), both running handler(ctx), whose
 * claims (pt_claim_exit) let one report. One would not do: the threads of
 * an exit_group exit together and, on 7.x, preempt each other inside the
 * program; seen on 7.3 under load: 17 skipped hits in one run and a
 * process whose exit no thread reported, when the one thread that saw the
 * group gone was skipped.
 */
#define PT_EXIT_PROGRAMS(handler) FM_TWICE("sched_process_exit", on_exit, handler)

#endif /* __FLOWMILL_PROCTREE_H__ */
