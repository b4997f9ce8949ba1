/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Unique 64-bit IDs from a per-CPU counter, for the families that number
 * things (tcp flows; http's span and trace IDs are random, see http.c).
 * Include it after flowmill.h; each object that does gets its own fm_ids.
 *
 * No atomic instruction returns a value before Linux 5.12 (atomic fetch,
 * xchg and cmpxchg came then; 5.10's verifier rejects them with "BPF_STX
 * uses reserved fields"), so a shared counter cannot hand out numbers.
 * Instead each CPU counts on its own, and the ID carries the CPU:
 *
 *   bits 63..51  CPU number (13 bits: NR_CPUS is at most 8192)
 *   bits 50..49  nesting level (below)
 *   bits 48..0   the level's count on that CPU, from 1: never 0
 *
 * A program is not migrated while it runs, but it can be interrupted on its
 * CPU by another one taking an ID: a softirq (a TCP handshake) in the middle
 * of a system call (connect). A plain counter would then hand both the same
 * number. So each CPU keeps one counter per nesting level: a caller marks
 * its level taken (depth + 1) before it touches its counter and frees it
 * afterwards; whatever interrupts it in between finds the deeper level and
 * counts there, and what interrupts it before or after uses and restores
 * the level before it is taken. Contexts nest at most four deep (task,
 * softirq, hardirq, NMI).
 *
 * That holds where a program runs with preemption disabled, as on
 * tracepoints (tcp). Uprobe programs on preemptible kernels (preempt=full
 * or lazy) run with only migration disabled, so two threads' programs can
 * interleave on a CPU without nesting: one preempted inside here is still
 * kept apart from the next caller by its level, but a caller preempted
 * between reading and writing its count while two others took IDs at its
 * level would write back a stale count, and a later ID at that level
 * would repeat one. Its only callers are tracepoints (tcp; http takes
 * random IDs): a uprobe caller would have to accept that repeat, which
 * needs three threads interleaved within two instructions on one CPU.
 */
#ifndef __FLOWMILL_IDS_H__
#define __FLOWMILL_IDS_H__

#include "flowmill.h"

#define FM_ID_LEVELS 4
#define FM_ID_COUNT_BITS 49
#define FM_ID_LEVEL_SHIFT FM_ID_COUNT_BITS
#define FM_ID_CPU_SHIFT (FM_ID_COUNT_BITS + 2)

struct fm_id_state {
	__u64 depth; /* levels taken on this CPU */
	__u64 count[FM_ID_LEVELS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fm_id_state);
} fm_ids SEC(".maps");

/* fm_unique_id returns an ID no other call returns (until a level's count
 * wraps after 2^49 IDs on one CPU), or 0 if the map cannot be read. */
static __always_inline __u64 fm_unique_id(void)
{
	__u32 zero = 0;
	struct fm_id_state *s = bpf_map_lookup_elem(&fm_ids, &zero);
	__u64 d, n;

	if (!s)
		return 0;
	d = s->depth & (FM_ID_LEVELS - 1);
	s->depth = d + 1;
	/* The compiler must not move the count's update out from between the
	 * two stores of depth. */
	asm volatile("" ::: "memory");
	n = ++s->count[d];
	asm volatile("" ::: "memory");
	s->depth = d;
	return (__u64)bpf_get_smp_processor_id() << FM_ID_CPU_SHIFT |
	       d << FM_ID_LEVEL_SHIFT | (n & ((1ULL << FM_ID_COUNT_BITS) - 1));
}

#endif /* __FLOWMILL_IDS_H__ */
