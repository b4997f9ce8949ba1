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

#endif /* __FLOWMILL_PROCTREE_H__ */
