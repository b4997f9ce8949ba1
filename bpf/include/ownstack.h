/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* go_own_stack, for every uprobe program (see below). */
#ifndef __FLOWMILL_OWNSTACK_H__
#define __FLOWMILL_OWNSTACK_H__

#include "flowmill.h"

/*
 * Private stacks. From Linux 6.13, a kprobe-type program (uprobes are) whose
 * stack is 64 bytes or more runs on a per-CPU "private stack" instead of
 * the task's kernel stack, on the assumption that it cannot run twice at
 * once on a CPU. Uprobe programs can: they run preemptible (preempt=lazy or
 * full, Debian's 7.x kernels), and another task's run of the same program
 * on that CPU overwrites the first one's stack, registers spilled there
 * included (seen on 7.3: a NULL map-value pointer read back from the
 * stack, a kernel oops). The verifier gives no private stack to a program
 * that makes a tail call, so every program makes one, first thing, into an
 * empty program array: the slot is empty, the call falls through at once.
 */
struct {
	__uint(type, 3); /* BPF_MAP_TYPE_PROG_ARRAY (not in the trimmed vmlinux.h) */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} go_no_priv_stack SEC(".maps");

static __always_inline void go_own_stack(struct pt_regs *ctx)
{
	bpf_tail_call(ctx, &go_no_priv_stack, 0);
}

#endif
