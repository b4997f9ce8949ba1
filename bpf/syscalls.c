//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Per-process system call counts, aggregated in the kernel.
 *
 * Raw tracepoints only (no kprobes, no fentry):
 *   sys_enter           every system call: one per-CPU counter increment
 *                       for {process, syscall number}
 *   sched_process_exit  the death of a process is noted in "exited", so
 *                       user space publishes its final counts and frees
 *                       its entries
 *   sched_process_fork  process scope only: follow the tree (proctree.h)
 *
 * Nothing is sent per system call; user space reads the counters
 * periodically. The counters are per CPU, so the hot path takes no atomic
 * operation and no shared cache line.
 */
#include "flowmill.h"
#include "proctree.h"

/* x86 thread_info.status: a 32-bit (ia32) system call is running; its
 * number is from another table. */
#define TS_COMPAT 0x0002
/* Numbers at or above this are not counted (x32 calls, with bit 30 set, and
 * invalid numbers). x86-64 numbers stay well below. */
#define SC_NR_MAX 1024

/* Family counters (see FM_CTR_FAMILY). */
enum {
	SC_CTR_FULL = FM_CTR_FAMILY, /* a {process, syscall} not counted: map full */
	SC_CTR_EXITED_FULL,          /* an exit not noted: exited map full */
	SC_CTR_TRACK_FULL,           /* a child not followed: tracked map full */
};

struct sc_key {
	__u32 tgid;
	__u32 nr;
};

/* Calls per {process, syscall}, per CPU. The loader sizes it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sc_key);
	__type(value, __u64);
} counts SEC(".maps");

/* Processes in scope that died since user space last looked: their counts
 * are final. Value: CLOCK_MONOTONIC time of death. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u64);
} exited SEC(".maps");

/* Keep the key type in the object's BTF for bpf2go -type. */
const struct sc_key *unused_sc_key __attribute__((unused));

SEC("raw_tracepoint/sys_enter")
int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	long nr = ctx->args[1];
	struct sc_key key;
	__u64 one = 1, *v;
	long err;

	if (nr < 0 || nr >= SC_NR_MAX)
		return 0;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.nr = nr;
	if (!pt_in_scope(key.tgid))
		return 0;
	v = bpf_map_lookup_elem(&counts, &key);
	if (v) {
		(*v)++; /* this CPU's slot: no other writer */
		return 0;
	}
	struct task_struct *t = (void *)bpf_get_current_task();

	/* ia32 calls are numbered from another table: not counted. Checked
	 * on this slower path only: an ia32 process never has entries, so all
	 * its calls come here; only a 64-bit process that also makes ia32
	 * calls (int 0x80) with a number it already used would be miscounted.
	 * thread_info.status is x86's: elsewhere the check resolves to false
	 * when the object is loaded, and the verifier skips the read. */
	if (bpf_core_field_exists(struct thread_info, status) &&
	    (BPF_CORE_READ(t, thread_info.status) & TS_COMPAT))
		return 0;
	err = bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST);
	if (err == -EEXIST) {
		/* Another CPU inserted it meanwhile. */
		v = bpf_map_lookup_elem(&counts, &key);
		if (v)
			(*v)++;
	} else if (err) {
		fm_count(SC_CTR_FULL);
	}
	return 0;
}

/* sched_process_exit(struct task_struct *p): one argument before Linux 6.16
 * (group_dead came then); only args[0] is read, on every kernel. */
static __always_inline int note_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *t = (void *)ctx->args[0];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 now;

	/* A thread ending is not a process exit (see pt_group_left). */
	if (!pt_group_left(t) || !pt_in_scope(tgid) || !pt_claim_exit(t))
		return 0;
	pt_exit(tgid);
	now = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&exited, &tgid, &now, BPF_ANY))
		fm_count(SC_CTR_EXITED_FULL);
	return 0;
}

PT_EXIT_PROGRAMS(note_exit)

SEC("raw_tracepoint/sched_process_fork")
int on_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (void *)ctx->args[1];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 child_tgid = BPF_CORE_READ(child, tgid);

	if (child_tgid == tgid)
		return 0; /* a thread */
	if (!pt_fork(tgid, child_tgid))
		fm_count(SC_CTR_TRACK_FULL);
	return 0;
}
