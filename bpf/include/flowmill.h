/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Helpers shared by every flowmill probe family: the session scope, the
 * event ring buffer with batched wake-ups, and per-CPU loss counters.
 *
 * Each family's object includes this header once, so each object has its own
 * "events" ring buffer and "counters" array; the Go side finds them by name.
 */
#ifndef __FLOWMILL_H__
#define __FLOWMILL_H__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define EEXIST 17 /* a map update with BPF_NOEXIST found the key */

/* Sockets (include/linux/socket.h, include/uapi/linux/in.h,
 * include/net/tcp_states.h). */
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_FIN_WAIT1 = 4,
	TCP_FIN_WAIT2 = 5,
	TCP_TIME_WAIT = 6,
	TCP_CLOSE = 7,
	TCP_CLOSE_WAIT = 8,
	TCP_LAST_ACK = 9,
	TCP_LISTEN = 10,
	TCP_CLOSING = 11,
};

/* Scope kinds; keep in sync with probes.ScopeKind. */
enum fm_scope_kind {
	FM_SCOPE_HOST = 0,
	FM_SCOPE_PROCESS = 1,
	FM_SCOPE_CGROUP = 2,
};

/* Set by the loader before the object is loaded. */
volatile const __u32 fm_scope_kind = FM_SCOPE_HOST;
volatile const __u32 fm_scope_tgid = 0;
/* Wake the reader when this many bytes are waiting; below that the reader
 * drains on its own timer. */
volatile const __u64 fm_wakeup_bytes = 65536;

/* Counter slots. Slot 0 is common to all families; families number theirs
 * from FM_CTR_FAMILY. */
enum {
	FM_CTR_LOST = 0, /* ring buffer full: record dropped */
	FM_CTR_FAMILY = 1,
	FM_NR_COUNTERS = 32,
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* the loader may resize it */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FM_NR_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Holds the scope cgroup (slot 0) when fm_scope_kind is FM_SCOPE_CGROUP. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} scope_cgroup SEC(".maps");

/* Who did something: copied into events. */
struct fm_task {
	__u64 cgroup_id;
	__u32 pid; /* thread group id, what user space calls the PID */
	__u32 tid;
	char comm[16];
};

/* fm_clamp returns min(n, max) in a form every verifier sees bounded: use
 * it on a length right where it is passed to a helper as a size. Without
 * it, clang reuses a comparison made earlier, possibly on another copy of
 * the value, and older verifiers (5.10 to 6.12) do not always carry the
 * bounds to the register passed, in particular through a spill to the
 * stack ("R2 min value is negative" or "unbounded memory access"). The
 * empty asm hides what clang knows of n, so the comparison is made here,
 * on the register that is passed. max must be a constant. */
static __always_inline __u64 fm_clamp(__u64 n, const __u64 max)
{
	asm volatile("" : "+r"(n));
	return n > max ? max : n;
}

/* fm_mask returns n & mask, computed on the register that is used: clang
 * drops a mask it knows to change nothing, where the verifier may not know
 * it (see fm_clamp). */
static __always_inline __u32 fm_mask(__u32 n, const __u32 mask)
{
	asm volatile("" : "+r"(n));
	return n & mask;
}

static __always_inline void fm_count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &slot);

	/* A per-CPU slot, but an atomic add all the same: uprobe programs
	 * (and, on 7.x, tracepoint programs) can be preempted by another task
	 * counting on the same CPU, and a plain increment would then lose
	 * counts. The add returns nothing (no atomic fetch: Linux 5.10). */
	if (v)
		__sync_fetch_and_add(v, 1);
}

/* fm_current_in_scope reports whether the current task is one the session
 * observes. Only meaningful in process context. */
static __always_inline bool fm_current_in_scope(void)
{
	switch (fm_scope_kind) {
	case FM_SCOPE_PROCESS:
		return (bpf_get_current_pid_tgid() >> 32) == fm_scope_tgid;
	case FM_SCOPE_CGROUP:
		return bpf_current_task_under_cgroup(&scope_cgroup, 0) == 1;
	default:
		return true;
	}
}

static __always_inline void fm_current_task(struct fm_task *t)
{
	__u64 id = bpf_get_current_pid_tgid();

	t->pid = id >> 32;
	t->tid = (__u32)id;
	t->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(t->comm, sizeof(t->comm));
}

/* fm_is_inet_tcp reports whether sk is an IPv4 or IPv6 TCP socket. */
static __always_inline bool fm_is_inet_tcp(const struct sock *sk)
{
	__u16 family;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return false;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	return family == AF_INET || family == AF_INET6;
}

/*
 * Per-CPU scratch space and preemption. Programs run with migration
 * disabled but, on kernels that preempt them (preempt=full or lazy, the
 * default of recent kernels; uprobe and sk_msg programs, and on 7.x
 * tracepoints), not with preemption disabled: another task on the same CPU
 * can run a program that uses the CPU's scratch space while one is halfway
 * through it. So every user of a scratch space bumps its generation on
 * entry (fm_gen_begin) and again on exit (fm_gen_end); one that finds at
 * the end that the generation moved since it began was overtaken, and
 * throws away what it built there.
 */
static __always_inline __u64 fm_gen_begin(__u64 *gen)
{
	__u64 g = *gen + 1;

	*gen = g;
	asm volatile("" ::: "memory");
	return g;
}

/* fm_gen_check reports whether nobody used the scratch space since
 * fm_gen_begin returned g; the user still holds it. */
static __always_inline bool fm_gen_check(__u64 *gen, __u64 g)
{
	asm volatile("" ::: "memory");
	return *gen == g;
}

/* fm_gen_end releases the scratch space and reports whether nobody used it
 * since fm_gen_begin returned g. */
static __always_inline bool fm_gen_end(__u64 *gen, __u64 g)
{
	bool ok = fm_gen_check(gen, g);

	*gen = *gen + 1;
	return ok;
}

/* fm_reserve reserves a record in the ring buffer, counting the loss when
 * the buffer is full. */
static __always_inline void *fm_reserve(__u64 size)
{
	void *e = bpf_ringbuf_reserve(&events, size, 0);

	if (!e)
		fm_count(FM_CTR_LOST);
	return e;
}

/* fm_submit commits a record. A wake-up costs far more than the record
 * itself, so the reader is woken only when this record makes the unread data
 * cross fm_wakeup_bytes; otherwise it finds the record on its next timed
 * drain. */
static __always_inline void fm_submit(void *e, __u64 size)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 rec = ((size + 7) & ~7ULL) + 8; /* record plus its header */
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (avail >= fm_wakeup_bytes && avail < fm_wakeup_bytes + rec)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}

/*
 * FM_TWICE defines two programs on the raw tracepoint tp, name and
 * name_again, both running handler(ctx), for hooks where a skipped hit
 * would lose or corrupt what the family reports. The kernel skips a
 * program on a CPU where the same program is already running (its
 * recursion guard, counted in bpfload.Missed), and kernels that preempt
 * tracepoint programs (7.x) let another task hit the tracepoint while one
 * is inside it. The second program has a guard of its own, so a hit the
 * first skipped is seen by the second, unless another task is inside each
 * of them on that CPU at once. The kernel runs a tracepoint's programs in
 * the order they were attached, both for every hit: handler must do
 * nothing the second time (find its work done: a claimed key, a deleted
 * entry). User space attaches name, then name_again.
 */
#define FM_TWICE(tp, name, handler)                                            \
	SEC("raw_tracepoint/" tp)                                              \
	int name(struct bpf_raw_tracepoint_args *ctx)                          \
	{                                                                      \
		return handler(ctx);                                           \
	}                                                                      \
	SEC("raw_tracepoint/" tp)                                              \
	int name##_again(struct bpf_raw_tracepoint_args *ctx)                  \
	{                                                                      \
		return handler(ctx);                                           \
	}

#endif /* __FLOWMILL_H__ */
