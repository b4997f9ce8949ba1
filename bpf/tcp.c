//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TCP connection lifecycle and per-flow statistics.
 *
 * Only stable raw tracepoints are used (no kprobes, no fentry):
 *   inet_sock_set_state  flow creation, establishment, close (final stats)
 *   tcp_send_reset       resets sent, including active resets after close
 *   tcp_receive_reset    resets received
 *   tcp_destroy_sock     end of the socket: the close event is emitted here,
 *                        after any reset the close path sends
 *
 * Events follow the connection rate: one when a flow is established, one
 * when it ends. Statistics are the kernel's own per-socket counters, read at
 * close with CO-RE, so nothing is counted per packet here.
 *
 * Attribution: a client flow belongs to the task that called connect() (the
 * SYN_SENT transition runs in its context). A server flow belongs to the
 * owner of the listening socket it was accepted from: its handshake
 * completes in softirq context, on whatever task happened to be running.
 * Listening sockets are keyed by the socket itself (its address), recorded
 * at the LISTEN transition (in the task that called listen()) and removed
 * at its close, so listeners sharing a port (other addresses, a SO_REUSEPORT
 * group) each keep their owner. A connection's socket is a clone of the
 * listener that accepted it, and its first transition (LISTEN -> SYN_RECV)
 * fires inside the cloning, before the kernel re-initialises what was
 * copied: its tsorted_sent_queue list head (empty on a listener, so
 * pointing at itself) still points into the listener, which gives the
 * listener's address. The address is checked (both list pointers agree, the
 * socket there is listening on the same port) before it is used, and a
 * connection whose listener cannot be found that way is counted.
 * Listening sockets that existed before the probe started are found by
 * user space, which knows them by socket cookie (sock_diag): the check
 * reads the listener's cookie too.
 *
 * A socket whose counters cannot be read (a failed probe read, which a live
 * socket should never cause) is still reported, with what is missing said
 * in the event's missing bits; user space counts those events.
 */
#include "flowmill.h"
#include "ids.h"

/* enum sock_flags: SOCK_DEAD, SOCK_DONE, ... (include/net/sock.h) */
#define SOCK_DONE 1

/* Family counters (see FM_CTR_FAMILY). */
enum {
	TCP_CTR_FLOW_NEW = FM_CTR_FAMILY, /* flows inserted in the flow map */
	TCP_CTR_FLOW_DONE,                /* flows removed by this program */
	TCP_CTR_LISTENER_LOST,            /* listeners not tracked: map full */
	TCP_CTR_LISTENER_UNRESOLVED,      /* accepted sockets whose listener
					   * the clone did not lead to */
	TCP_CTR_FLOW_FULL,                /* flows not inserted: the LRU had no
					   * free node for them (it can fail
					   * when other CPUs hold its free
					   * nodes in their local lists) */
};

/* What could not be read of a socket (tcp_event.missing, flow.missing). */
enum tcp_missing {
	TCP_MISSING_ADDRESSES = 1, /* tuple: zero */
	TCP_MISSING_COUNTERS = 2,  /* counts: zero (at open: the base; the
				    * flow's later counts are missing too) */
};

enum tcp_event_kind {
	TCP_EVENT_OPEN = 1,
	TCP_EVENT_CLOSE = 2,
};

enum tcp_role {
	TCP_ROLE_CLIENT = 1,
	TCP_ROLE_SERVER = 2,
};

struct tcp_counts {
	__u64 bytes_sent;     /* payload bytes acknowledged by the peer */
	__u64 bytes_received; /* payload bytes received in order */
	__u32 segs_in;
	__u32 segs_out;
	__u32 retrans;        /* tcp_sock.total_retrans */
	__u32 srtt_us;        /* as tcp_info: srtt_us >> 3 */
	__u32 rttvar_us;      /* as tcp_info: mdev_us >> 2 */
	__u32 min_rtt_us;     /* ~0U when there was no sample */
};

/* Addresses, read at establishment: the kernel clears the local port when it
 * unhashes a closing socket. */
struct tcp_tuple {
	__u8 laddr[16];
	__u8 raddr[16];
	__u32 netns;
	__u16 family;
	__u16 lport;
	__u16 rport;
	__u16 pad;
};

struct tcp_event {
	struct fm_task task;
	struct tcp_tuple tuple;
	__u64 flow_id;
	__u64 ts_ns;    /* CLOCK_MONOTONIC: established (open), closed (close) */
	__u64 start_ns; /* CLOCK_MONOTONIC: established */
	/* Open: the raw tcp_sock bytes_acked/bytes_received at establishment,
	 * the base that later readings of tcp_info are counted from.
	 * Close: the flow's final counts. */
	struct tcp_counts counts;
	__u32 rst_sent;
	__u32 rst_received;
	__u8 kind;
	__u8 role;
	__u8 missing; /* enum tcp_missing bits */
};

struct flow {
	struct fm_task task;
	struct tcp_tuple tuple;
	__u64 id;
	__u64 start_ns;
	__u64 close_ns;
	__u64 base_acked;
	__u64 base_received;
	struct tcp_counts final;
	__u32 rst_sent;
	__u32 rst_received;
	__u16 states; /* bit n set: the socket has been in TCP state n (of
		       * those on_set_state looks at) */
	__u8 role;
	__u8 closed;
	__u8 missing; /* enum tcp_missing bits */
};

/* In-flight flows, keyed by socket address. Bounded; the loader sizes it.
 * Evictions are inferred from TCP_CTR_FLOW_NEW - TCP_CTR_FLOW_DONE - live. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct flow);
} flows SEC(".maps");

/* Listening sockets of tasks in scope, by socket address: their accepted
 * flows are in scope. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct fm_task);
} listeners SEC(".maps");

/* Listening sockets in scope that existed before the probe started, by
 * socket cookie (what user space knows them by). An entry moves to
 * listeners when its first connection arrives. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct fm_task);
} seeded_listeners SEC(".maps");

/* Keep the event type in the object's BTF for bpf2go -type. */
const struct tcp_event *unused_tcp_event __attribute__((unused));

/* A socket snapshot copies the parts of a tcp_sock we use into a per-CPU
 * buffer with two bpf_probe_read_kernel() calls: sock_common, and the span of
 * tcp_sock from the first to the last counter we read. Each probe read costs
 * tens of nanoseconds, so reading some twenty fields one by one costs more;
 * copying the whole 2 KiB tcp_sock costs more too. Offsets are CO-RE
 * relocated, so they are constants once loaded and the verifier checks every
 * access against the buffer's size. tcp_sock starts with sock, which starts
 * with sock_common, so the buffer mirrors the socket's layout. */
#define SNAP_SIZE 4096

struct snap {
	__u8 b[SNAP_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct snap);
} snaps SEC(".maps");

#define OFF(type, field) ((__u32)bpf_core_field_offset(type, field))
#define END(type, field) (OFF(type, field) + (__u32)bpf_core_field_size(type, field))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define SNAP(buf, type, field) \
	(*(typeof(((type *)0)->field) *)((buf) + bpf_core_field_offset(type, field)))

/* snapshot returns the buffer and sets *got to the parts read: SNAP_COMMON
 * (sock_common: addresses, flags) and SNAP_TCP (the counters). */
enum {
	SNAP_COMMON = 1,
	SNAP_TCP = 2,
	SNAP_ALL = SNAP_COMMON | SNAP_TCP,
};

static __always_inline const __u8 *snapshot(const struct sock *sk, __u32 *got)
{
	__u32 zero = 0;
	__u8 *buf = bpf_map_lookup_elem(&snaps, &zero);
	__u32 common = bpf_core_type_size(struct sock_common);
	__u32 lo = MIN(MIN(MIN(OFF(struct tcp_sock, rtt_min), OFF(struct tcp_sock, segs_out)),
			   MIN(OFF(struct tcp_sock, write_seq), OFF(struct tcp_sock, mdev_us))),
		       MIN(MIN(OFF(struct tcp_sock, snd_una), OFF(struct tcp_sock, srtt_us)),
			   MIN(MIN(OFF(struct tcp_sock, bytes_received), OFF(struct tcp_sock, segs_in)),
			       MIN(OFF(struct tcp_sock, bytes_acked), OFF(struct tcp_sock, total_retrans)))));
	__u32 hi = MAX(MAX(MAX(END(struct tcp_sock, rtt_min), END(struct tcp_sock, segs_out)),
			   MAX(END(struct tcp_sock, write_seq), END(struct tcp_sock, mdev_us))),
		       MAX(MAX(END(struct tcp_sock, snd_una), END(struct tcp_sock, srtt_us)),
			   MAX(MAX(END(struct tcp_sock, bytes_received), END(struct tcp_sock, segs_in)),
			       MAX(END(struct tcp_sock, bytes_acked), END(struct tcp_sock, total_retrans)))));

	*got = 0;
	if (!buf || common > SNAP_SIZE)
		return 0;
	if (bpf_probe_read_kernel(buf, common, sk) == 0)
		*got |= SNAP_COMMON;
	if (lo < hi && hi <= SNAP_SIZE &&
	    bpf_probe_read_kernel(buf + lo, hi - lo, (const __u8 *)sk + lo) == 0)
		*got |= SNAP_TCP;
	return buf;
}

static __always_inline __u32 sk_netns(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline void read_counts(const __u8 *b, struct flow *f,
					struct tcp_counts *c)
{
	__u64 acked = SNAP(b, struct tcp_sock, bytes_acked) - f->base_acked;
	__u64 received = SNAP(b, struct tcp_sock, bytes_received) - f->base_received;

	/* bytes_acked counts the client's SYN (in the base) and our FIN once
	 * it is acknowledged; bytes_received counts the peer's FIN. Neither
	 * is payload. Our FIN was queued iff we went through FIN_WAIT1 or
	 * LAST_ACK, and it is acknowledged iff nothing is left unacked. The
	 * peer's FIN was received iff tcp_fin() set SOCK_DONE. */
	if ((f->states & ((1 << TCP_FIN_WAIT1) | (1 << TCP_LAST_ACK))) &&
	    SNAP(b, struct tcp_sock, snd_una) == SNAP(b, struct tcp_sock, write_seq) &&
	    acked > 0)
		acked--;
	if ((SNAP(b, struct sock_common, skc_flags) & (1UL << SOCK_DONE)) && received > 0)
		received--;

	c->bytes_sent = acked;
	c->bytes_received = received;
	c->segs_in = SNAP(b, struct tcp_sock, segs_in);
	c->segs_out = SNAP(b, struct tcp_sock, segs_out);
	c->retrans = SNAP(b, struct tcp_sock, total_retrans);
	c->srtt_us = SNAP(b, struct tcp_sock, srtt_us) >> 3;
	c->rttvar_us = SNAP(b, struct tcp_sock, mdev_us) >> 2;
	c->min_rtt_us = *(__u32 *)(b + bpf_core_field_offset(struct tcp_sock, rtt_min) +
				   __builtin_offsetof(struct minmax_sample, v));
}

static __always_inline void read_tuple(const __u8 *b, struct tcp_tuple *e)
{
	e->family = SNAP(b, struct sock_common, skc_family);
	e->lport = SNAP(b, struct sock_common, skc_num);
	e->rport = __builtin_bswap16(SNAP(b, struct sock_common, skc_dport));
	if (e->family == AF_INET) {
		__be32 l = SNAP(b, struct sock_common, skc_rcv_saddr);
		__be32 r = SNAP(b, struct sock_common, skc_daddr);

		__builtin_memcpy(e->laddr, &l, 4);
		__builtin_memcpy(e->raddr, &r, 4);
	} else {
		__builtin_memcpy(e->laddr, b + bpf_core_field_offset(struct sock_common, skc_v6_rcv_saddr), 16);
		__builtin_memcpy(e->raddr, b + bpf_core_field_offset(struct sock_common, skc_v6_daddr), 16);
	}
}

static __always_inline void emit(struct flow *f, __u8 kind, __u64 ts)
{
	struct tcp_event *e = fm_reserve(sizeof(*e));

	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->task = f->task;
	e->tuple = f->tuple;
	e->flow_id = f->id;
	e->ts_ns = ts;
	e->start_ns = f->start_ns;
	e->kind = kind;
	e->role = f->role;
	e->missing = f->missing;
	e->rst_sent = f->rst_sent;
	e->rst_received = f->rst_received;
	if (kind == TCP_EVENT_OPEN) {
		e->counts.bytes_sent = f->base_acked;
		e->counts.bytes_received = f->base_received;
	} else {
		e->counts = f->final;
	}
	fm_submit(e, sizeof(*e));
}

static __always_inline void flow_done(__u64 key)
{
	if (bpf_map_delete_elem(&flows, &key) == 0)
		fm_count(TCP_CTR_FLOW_DONE);
}

static __always_inline void flow_insert(__u64 key, struct flow *f)
{
	/* Unique without an atomic fetch (5.12+): see ids.h. */
	f->id = fm_unique_id();
	if (bpf_map_update_elem(&flows, &key, f, BPF_ANY) == 0)
		fm_count(TCP_CTR_FLOW_NEW);
	else
		fm_count(TCP_CTR_FLOW_FULL);
}

/* established starts reporting a flow. What of the socket cannot be read
 * is left zero and marked missing, and the flow reported all the same. */
static __always_inline void established(const struct sock *sk, struct flow *f,
					__u32 netns, __u64 now)
{
	__u32 got;
	const __u8 *b = snapshot(sk, &got);

	f->start_ns = now;
	f->states |= 1 << TCP_ESTABLISHED;
	if (b && (got & SNAP_TCP)) {
		f->base_acked = SNAP(b, struct tcp_sock, bytes_acked);
		f->base_received = SNAP(b, struct tcp_sock, bytes_received);
	} else {
		f->missing |= TCP_MISSING_COUNTERS;
	}
	if (b && (got & SNAP_COMMON))
		read_tuple(b, &f->tuple);
	else
		f->missing |= TCP_MISSING_ADDRESSES;
	f->tuple.netns = netns;
	emit(f, TCP_EVENT_OPEN, now);
}

/* closed snapshots the final counters. tcp_disconnect() zeroes them right
 * after the TCP_CLOSE transition, so this runs at the transition; the event
 * waits for tcp_destroy_sock, so that a reset sent by the close path is
 * counted. Counters counted from an unknown base are not read: they stay
 * zero, marked missing. */
static __always_inline void closed(const struct sock *sk, struct flow *f)
{
	__u32 got;
	const __u8 *b = snapshot(sk, &got);

	if (b && got == SNAP_ALL && !(f->missing & TCP_MISSING_COUNTERS))
		read_counts(b, f, &f->final);
	else
		f->missing |= TCP_MISSING_COUNTERS;
	f->close_ns = bpf_ktime_get_ns();
	f->closed = 1;
}

/* listener_of returns the owner of the listening socket that child (in its
 * LISTEN -> SYN_RECV transition, inside the kernel's cloning of the
 * listener) is a clone of, if that listener is in scope; see the top of
 * this file. */
static __always_inline struct fm_task *listener_of(const struct sock *child)
{
	const struct tcp_sock *tp = (const void *)child;
	struct list_head copied;
	struct fm_task *owner;
	__u64 l, cookie;

	if (bpf_probe_read_kernel(&copied, sizeof(copied), &tp->tsorted_sent_queue) ||
	    copied.next != copied.prev) {
		fm_count(TCP_CTR_LISTENER_UNRESOLVED);
		return 0;
	}
	l = (__u64)copied.next - bpf_core_field_offset(struct tcp_sock, tsorted_sent_queue);
	owner = bpf_map_lookup_elem(&listeners, &l);
	if (owner)
		return owner;
	/* Not one we saw start listening: check it is a listener on the
	 * child's port, then look for it among those user space found. */
	const struct sock *lsk = (const void *)l;

	if (BPF_CORE_READ(lsk, __sk_common.skc_state) != TCP_LISTEN ||
	    BPF_CORE_READ(lsk, __sk_common.skc_num) != BPF_CORE_READ(child, __sk_common.skc_num)) {
		fm_count(TCP_CTR_LISTENER_UNRESOLVED);
		return 0;
	}
	cookie = BPF_CORE_READ(lsk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return 0;
	owner = bpf_map_lookup_elem(&seeded_listeners, &cookie);
	if (!owner)
		return 0;
	/* From now on by address, as if it had started listening now. */
	if (bpf_map_update_elem(&listeners, &l, owner, BPF_ANY) == 0) {
		bpf_map_delete_elem(&seeded_listeners, &cookie);
		return bpf_map_lookup_elem(&listeners, &l);
	}
	return owner;
}

/* stale_close ends the entry of a socket that is gone: closed with what
 * is known (its counters missing unless its close was seen). */
static __always_inline void stale_close(__u64 key, struct flow *f)
{
	if (f->start_ns) {
		if (!f->closed) {
			__builtin_memset(&f->final, 0, sizeof(f->final));
			f->missing |= TCP_MISSING_COUNTERS;
			f->close_ns = bpf_ktime_get_ns();
		}
		emit(f, TCP_EVENT_CLOSE, f->close_ns);
	}
	flow_done(key);
}

/* inet_sock_set_state, twice (FM_TWICE): a skipped hit would lose a
 * flow's start or end. The second run of a hit finds its work done: a
 * flow inserted by this very transition (only its first state seen, not
 * started), an established flow, a closed one, an entry gone. */
static __always_inline int set_state(struct bpf_raw_tracepoint_args *ctx)
{
	const struct sock *sk = (const void *)ctx->args[0];
	int oldstate = ctx->args[1];
	int newstate = ctx->args[2];
	__u64 key = (__u64)sk;
	struct flow *f;

	/* Most transitions need nothing: only these create, report or end a
	 * flow, or (FIN_WAIT1, LAST_ACK: our FIN was queued) change how its
	 * bytes are counted. The rest return before any lookup. */
	if (!((1 << (newstate & 15)) & ((1 << TCP_SYN_SENT) | (1 << TCP_SYN_RECV) |
					 (1 << TCP_ESTABLISHED) | (1 << TCP_FIN_WAIT1) |
					 (1 << TCP_LAST_ACK) | (1 << TCP_CLOSE) |
					 (1 << TCP_LISTEN))))
		return 0;

	/* A flow we track moves on. Only the flow map is keyed by a TCP
	 * socket, so no further checks. */
	f = bpf_map_lookup_elem(&flows, &key);
	if (f && (newstate == TCP_SYN_SENT || newstate == TCP_SYN_RECV)) {
		if (f->states == (1 << newstate) && !f->start_ns)
			return 0; /* inserted by this hit's first run */
		/* A socket begins with these, and a failed connect ends its
		 * entry: this one is a freed socket's, whose destroy hit the
		 * kernel skipped (Stats.Missed). Its close goes out now,
		 * counters missing, rather than the new socket taking it
		 * over. */
		stale_close(key, f);
		f = NULL;
	}
	if (f) {
		f->states |= 1 << (newstate & 15);
		if (newstate == TCP_ESTABLISHED &&
		    (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)) {
			if (!f->start_ns)
				established(sk, f, sk_netns(sk), bpf_ktime_get_ns());
		} else if (newstate == TCP_CLOSE) {
			if (!f->start_ns)
				flow_done(key); /* refused or timed out: no event */
			else if (!f->closed)
				closed(sk, f);
		}
		return 0;
	}

	switch (newstate) {
	case TCP_SYN_SENT: {
		/* connect(): process context, the caller owns the flow. */
		if (!fm_current_in_scope() || !fm_is_inet_tcp(sk))
			return 0;
		struct flow nf = { .role = TCP_ROLE_CLIENT, .states = 1 << TCP_SYN_SENT };

		fm_current_task(&nf.task);
		flow_insert(key, &nf);
		return 0;
	}
	case TCP_LISTEN: {
		/* listen(): task context. */
		if (!fm_current_in_scope() || !fm_is_inet_tcp(sk))
			return 0;
		struct fm_task owner = {};

		fm_current_task(&owner);
		if (bpf_map_update_elem(&listeners, &key, &owner, BPF_ANY))
			fm_count(TCP_CTR_LISTENER_LOST);
		return 0;
	}
	case TCP_SYN_RECV: {
		/* A connection's socket, being cloned from its listener:
		 * softirq context, the owner is the listener's. */
		if (oldstate != TCP_LISTEN || !fm_is_inet_tcp(sk))
			return 0;
		struct fm_task *owner = listener_of(sk);

		if (!owner)
			return 0;
		struct flow nf = { .task = *owner, .role = TCP_ROLE_SERVER,
				   .states = 1 << TCP_SYN_RECV };

		flow_insert(key, &nf);
		return 0;
	}
	case TCP_CLOSE:
		if (oldstate == TCP_LISTEN) {
			__u64 cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);

			bpf_map_delete_elem(&listeners, &key);
			if (cookie)
				bpf_map_delete_elem(&seeded_listeners, &cookie);
		}
		return 0;
	}
	return 0;
}

FM_TWICE("inet_sock_set_state", on_set_state, set_state)

/* tcp_destroy_sock: the flow's last record, and its entry freed. Twice
 * (FM_TWICE): a skipped hit would lose the close and leave the entry of a
 * freed socket, which a new socket at the same address would then find.
 * The second run finds no entry. */
static __always_inline int destroy_sock(struct bpf_raw_tracepoint_args *ctx)
{
	const struct sock *sk = (const void *)ctx->args[0];
	__u64 key = (__u64)sk;
	struct flow *f = bpf_map_lookup_elem(&flows, &key);

	if (!f)
		return 0;
	if (f->start_ns) {
		if (!f->closed)
			closed(sk, f);
		emit(f, TCP_EVENT_CLOSE, f->close_ns);
	}
	flow_done(key);
	return 0;
}

FM_TWICE("tcp_destroy_sock", on_destroy_sock, destroy_sock)

SEC("raw_tracepoint/tcp_send_reset")
int on_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 key = ctx->args[0];
	struct flow *f;

	if (!key)
		return 0;
	f = bpf_map_lookup_elem(&flows, &key);
	if (f)
		__sync_fetch_and_add(&f->rst_sent, 1);
	return 0;
}

SEC("raw_tracepoint/tcp_receive_reset")
int on_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 key = ctx->args[0];
	struct flow *f = bpf_map_lookup_elem(&flows, &key);

	if (f)
		__sync_fetch_and_add(&f->rst_received, 1);
	return 0;
}
