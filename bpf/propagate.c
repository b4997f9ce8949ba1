//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * W3C trace context into the HTTP/1 requests the calling Go program sends,
 * without writing its memory (bpf_probe_write_user, which kernel lockdown
 * refuses): the header is added to the request's bytes on their way into
 * the socket.
 *
 *   raw tracepoint inet_sock_set_state
 *       CLOSE -> SYN_SENT runs in connect(), in the caller's context: a
 *       socket of this process (tgid) is remembered (socks). SYN_SENT ->
 *       ESTABLISHED: its ports are known now; its addresses go into
 *       "wanted". -> CLOSE: forgotten, with what waited for it.
 *   sock_ops (cgroup of the process) ACTIVE_ESTABLISHED_CB
 *       runs right after that transition (tcp_finish_connect calls
 *       tcp_set_state, then tcp_init_transfer), with no way to tell the
 *       process on 5.10: a wanted socket is put in the sockhash, so that
 *       the sk_msg program sees what is written on it. Only this process's
 *       outgoing connections are added.
 *   sk_msg (on the sockhash)
 *       every write on those connections: one whose connection has an
 *       inject entry (set by the uprobe on persistConn.roundTrip in http.c,
 *       before net/http writes the request) is the start of an HTTP/1
 *       request; its header block is checked for a traceparent the request
 *       already has (any case), and if there is none, "traceparent: ...\r\n"
 *       (and the incoming "tracestate: ...\r\n") is inserted at its end with
 *       bpf_msg_push_data, and the message joined into one piece again
 *       (the header block goes out in one segment). Other writes pass at
 *       once, after one map lookup.
 *
 * write() still returns the caller's byte count (the kernel counts what it
 * copied from the caller, not what it sent); each write is one message, and
 * net/http writes a request's header (and the start of its body) in one
 * write of its bufio.Writer (4 KiB), the rest in later writes, and never
 * starts writing a request on a connection before the previous one is
 * fully written. A header block that does not end in the first write's
 * first SCAN_MAX bytes is left alone (counted).
 */
#include "http.h"

#define SCAN_MAX 4096               /* bytes of a request's first write looked at */
#define SCAN_BUF (2 * SCAN_MAX)     /* power of two, room for reads past the end */
#define OUT_MAX (TP_HDR_LEN + 12 + TS_MAX + 2)
#define OUT_BUF 1024                /* power of two >= OUT_MAX */

/* Counters (see FM_CTR_FAMILY): this object's own "counters" map. */
enum {
	PROP_CTR_INJECTED = FM_CTR_FAMILY, /* requests given a traceparent */
	PROP_CTR_PRESENT,      /* requests that had one: left untouched */
	PROP_CTR_TOO_LARGE,    /* header block not ended within SCAN_MAX of the first write */
	PROP_CTR_NOT_HTTP1,    /* first write not an HTTP/1 request line */
	PROP_CTR_FAILED,       /* pull, push or fill failed: left untouched */
	PROP_CTR_PREEMPTED,    /* scratch space overtaken: left untouched */
	PROP_CTR_TS_MISSING,   /* injected without the tracestate it should carry */
	PROP_CTR_SOCKHASH_FAILED, /* connections the sockhash refused (full) */
	PROP_CTR_FOREIGN,      /* written by another process: left untouched */
	PROP_CTR_TRACKED,      /* connections added to the sockhash */
};

/* This process: only its connections are tracked (set by the loader). */
volatile const __u32 self_tgid = 0;

/* Established connections of this process waiting for sock_ops, by
 * addresses: the struct sock address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sock_tuple);
	__type(value, __u64);
} wanted SEC(".maps");

/* The connections whose writes sk_msg sees. Closing the map (Close)
 * releases them. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_tuple);
	__type(value, __u32);
} sockhash SEC(".maps");

struct scratch {
	char buf[SCAN_BUF]; /* the first bytes of the write */
	char out[OUT_BUF];  /* the header lines to insert */
	__u32 n;            /* bytes in buf */
	__s32 line_end;     /* offset of the request line's end (after its LF), -1 */
	__s32 hdr_end;      /* offset of the blank line ending the header block, -1 */
	__s32 has_tp;       /* the block has a traceparent */
	__s32 has_ts;       /* the block has a tracestate */
	__u32 pad;
	__u64 gen;          /* fm_gen_begin/fm_gen_end */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* ---- tracking this process's outgoing connections ---- */

/* sock_tuple_of reads a socket's addresses (set once it is established). */
static __always_inline void sock_tuple_of(const struct sock *sk, struct sock_tuple *t)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	t->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	t->rport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == AF_INET) {
		__be32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__be32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		__builtin_memcpy(t->laddr, &l, 4);
		__builtin_memcpy(t->raddr, &r, 4);
	} else {
		BPF_CORE_READ_INTO(&t->laddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&t->raddr, sk, __sk_common.skc_v6_daddr);
	}
}

SEC("raw_tracepoint/inet_sock_set_state")
int track_state(struct bpf_raw_tracepoint_args *ctx)
{
	/* inet_sock_set_state(const struct sock *sk, int oldstate, int newstate) */
	const struct sock *sk = (const struct sock *)ctx->args[0];
	int oldstate = ctx->args[1], newstate = ctx->args[2];
	__u64 key = (__u64)sk;
	struct sock_state *st;

	switch (newstate) {
	case TCP_SYN_SENT: {
		struct sock_state fresh = { .state = SOCK_CONNECTING };

		/* In connect(): the caller's context. */
		if (oldstate != TCP_CLOSE || (bpf_get_current_pid_tgid() >> 32) != self_tgid ||
		    !fm_is_inet_tcp(sk))
			return 0;
		bpf_map_update_elem(&socks, &key, &fresh, BPF_ANY);
		return 0;
	}
	case TCP_ESTABLISHED:
		if (oldstate != TCP_SYN_SENT)
			return 0;
		st = bpf_map_lookup_elem(&socks, &key);
		if (!st)
			return 0;
		sock_tuple_of(sk, &st->t);
		bpf_map_update_elem(&wanted, &st->t, &key, BPF_ANY);
		return 0;
	case TCP_CLOSE:
		st = bpf_map_lookup_elem(&socks, &key);
		if (!st)
			return 0;
		/* The addresses were kept: the kernel clears the local port
		 * as it unhashes a closing socket. */
		if (st->state != SOCK_CONNECTING) {
			bpf_map_delete_elem(&inject, &st->t);
			bpf_map_delete_elem(&wanted, &st->t);
		}
		bpf_map_delete_elem(&socks, &key);
		return 0;
	}
	return 0;
}

SEC("sockops")
int track_sock(struct bpf_sock_ops *skops)
{
	struct sock_tuple t = {};
	struct sock_state *st;
	__u64 *skp, sk;
	long err;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	t.family = skops->family;
	t.lport = skops->local_port;
	t.rport = __builtin_bswap32(skops->remote_port);
	if (t.family == AF_INET) {
		__u32 l = skops->local_ip4, r = skops->remote_ip4;

		__builtin_memcpy(t.laddr, &l, 4);
		__builtin_memcpy(t.raddr, &r, 4);
	} else if (t.family == AF_INET6) {
#pragma unroll
		for (int k = 0; k < 4; k++) {
			__u32 l = skops->local_ip6[k], r = skops->remote_ip6[k];

			__builtin_memcpy(t.laddr + 4 * k, &l, 4);
			__builtin_memcpy(t.raddr + 4 * k, &r, 4);
		}
	} else {
		return 1;
	}
	skp = bpf_map_lookup_elem(&wanted, &t);
	if (!skp)
		return 1;
	sk = *skp;
	bpf_map_delete_elem(&wanted, &t);
	st = bpf_map_lookup_elem(&socks, &sk);
	err = bpf_sock_hash_update(skops, &sockhash, &t, BPF_ANY);
	if (st)
		st->state = err ? SOCK_FAILED : SOCK_TRACKED;
	fm_count(err ? PROP_CTR_SOCKHASH_FAILED : PROP_CTR_TRACKED);
	return 1;
}

/* ---- the requests' first writes ---- */

static __always_inline char sat(const char *b, __u32 i)
{
	return b[i & (SCAN_BUF - 1)];
}

/* scan_at looks at byte i of sc->buf: at a newline, what the next line is. */
static __always_inline void scan_at(struct scratch *sc, __u32 i)
{
	const char *b = sc->buf;
	const char tp[] = "traceparent:";
	const char ts[] = "tracestate:";
	__u32 n = sc->n;

	if (i >= n || sat(b, i) != '\n' || sc->hdr_end >= 0)
		return;
	if (sc->line_end < 0)
		sc->line_end = i + 1;
	/* The blank line: the end of the header block. */
	if (sat(b, i + 1) == '\r' && sat(b, i + 2) == '\n' && i + 2 < n) {
		sc->hdr_end = i + 1;
		return;
	}
	if (i + sizeof(tp) < n && http_name_is(b, SCAN_BUF - 1, i + 1, "traceparent:"))
		sc->has_tp = 1;
	else if (i + sizeof(ts) < n && http_name_is(b, SCAN_BUF - 1, i + 1, "tracestate:"))
		sc->has_ts = 1;
}

/* scan_word looks at word w of sc->buf, closer only at a word holding a
 * newline. A global function, so that the verifier checks it once rather
 * than in each of SCAN_MAX/8 iterations (see http.c's scan_word). */
__attribute__((noinline)) int msg_scan_word(__u32 w)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u32 i = w * 8;
	__u64 x;

	if (!sc || sc->hdr_end >= 0)
		return 0;
	__builtin_memcpy(&x, sc->buf + (i & (SCAN_BUF - 1)), 8);
	x ^= 0x0a0a0a0a0a0a0a0aULL;
	if (!((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL))
		return 0;
#pragma unroll
	for (int k = 0; k < 8; k++)
		scan_at(sc, i + k);
	return 0;
}

/* request_line reports whether sc->buf starts with an HTTP/1 request
 * line: a method (upper-case letters), a space, ..., " HTTP/1.x\r\n". */
static __always_inline bool request_line(struct scratch *sc)
{
	const char v[] = " HTTP/1.";
	__s32 e = sc->line_end;
	int k;

	if (e < 16 || e > SCAN_MAX)
		return false;
	for (k = 0; k < 16; k++) {
		char ch = sat(sc->buf, k);

		if (ch == ' ')
			break;
		if (ch < 'A' || ch > 'Z')
			return false;
	}
	if (k == 0 || k == 16)
		return false;
	if (sat(sc->buf, e - 2) != '\r' || sat(sc->buf, e - 3) < '0' || sat(sc->buf, e - 3) > '1')
		return false;
#pragma unroll
	for (k = 0; k < sizeof(v) - 1; k++) {
		if (sat(sc->buf, e - 11 + k) != v[k])
			return false;
	}
	return true;
}

/*
 * The steps below with loops are global functions: the verifier checks
 * each once, on its own, and the caller continues from its return as from
 * one instruction, rather than from every iteration a loop can leave at.
 * Their arguments are the context or scalars (5.10); they look up the
 * scratch space themselves.
 */

/* msg_copy_in copies the first sc->n bytes of the message (pulled:
 * data..data_end is linear) into sc->buf, 8 bytes at a time. */
__attribute__((noinline)) int msg_copy_in(struct sk_msg_md *msg)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u8 *data, *end;
	__u32 i, n;

	if (!msg || !sc)
		return -1;
	data = (__u8 *)(long)msg->data;
	end = (__u8 *)(long)msg->data_end;
	n = sc->n;
	for (i = 0; i < SCAN_MAX; i += 8) {
		__u8 *p = data + i;

		if (i + 8 > n)
			break;
		if (p + 8 > end)
			return -1;
		__builtin_memcpy(sc->buf + i, p, 8);
	}
	/* The tail. What lies past n in buf is stale: the scan never looks
	 * at it (every test is bounded by n). */
	for (int k = 0; k < 8; k++) {
		__u8 *p = data + i + k;

		if (i + k >= n)
			return 0;
		if (p + 1 > end)
			return -1;
		sc->buf[fm_mask(i + k, SCAN_BUF - 1)] = *p;
	}
	return -1;
}

/* msg_scan scans sc->buf (see scan_at). */
__attribute__((noinline)) int msg_scan(void)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u32 n;

	if (!sc)
		return -1;
	n = sc->n;
	for (__u32 w = 0; w < SCAN_MAX / 8; w++) {
		if (w * 8 >= n)
			break;
		msg_scan_word(w);
	}
	return 0;
}

/* msg_fill writes sc->out (len bytes) into the message at data..data_end,
 * which the caller pulled to be exactly those bytes. */
__attribute__((noinline)) int msg_fill(struct sk_msg_md *msg, __u32 len)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u8 *data, *end;
	__u32 i;

	if (!msg || !sc || len > OUT_MAX)
		return -1;
	data = (__u8 *)(long)msg->data;
	end = (__u8 *)(long)msg->data_end;
	if (data + len != end)
		return -1;
	for (i = 0; i < OUT_MAX; i += 8) {
		__u8 *p = data + i;

		if (i + 8 > len)
			break;
		if (p + 8 > end)
			return -1;
		__builtin_memcpy(p, sc->out + i, 8);
	}
	for (int k = 0; k < 8; k++) {
		__u8 *p = data + i + k;

		if (i + k >= len)
			return 0;
		if (p + 1 > end)
			return -1;
		*p = sc->out[fm_mask(i + k, OUT_BUF - 1)];
	}
	return -1;
}

/* build writes the header lines into sc->out and returns their length. */
static __always_inline __u32 build(struct scratch *sc, const struct inject_req *in, bool *ts_missing)
{
	__u32 len = TP_HDR_LEN;
	struct tracestate *ts;
	__u64 key = in->ts_span;
	__u32 tl;

	__builtin_memcpy(sc->out, in->tp, TP_HDR_LEN);
	if (!key || sc->has_ts)
		return len;
	ts = bpf_map_lookup_elem(&tracestates, &key);
	if (!ts) {
		*ts_missing = true;
		return len;
	}
	tl = ts->len;
	asm volatile("" : "+r"(tl));
	if (!tl || tl > TS_MAX)
		return len;
	__builtin_memcpy(sc->out + len, "tracestate: ", 12);
	len += 12;
	/* Whole words: what is copied past the value is overwritten by the
	 * line's end, or not sent. */
	for (__u32 i = 0; i < TS_MAX; i += 8) {
		if (i >= tl)
			break;
		__builtin_memcpy(sc->out + TP_HDR_LEN + 12 + i, ts->v + i, 8);
	}
	len += tl;
	sc->out[len & (OUT_BUF - 1)] = '\r';
	sc->out[(len + 1) & (OUT_BUF - 1)] = '\n';
	return len + 2;
}

/* result records what became of the request in its client state. */
static __always_inline void result(const struct inject_req *in, __u8 prop, __u32 ctr)
{
	__u64 g = in->g;
	struct http_event *e = bpf_map_lookup_elem(&clients, &g);

	if (e && e->span_id == in->span_id)
		e->prop = prop;
	fm_count(ctr);
}

SEC("sk_msg")
int inject_msg(struct sk_msg_md *msg)
{
	struct sock_tuple t = {};
	struct inject_req in, *v;
	struct scratch *sc;
	bool ts_missing = false;
	__u32 zero = 0, n, len;
	__u64 gen;
	__s32 at;

	t.family = msg->family;
	t.lport = msg->local_port;
	t.rport = __builtin_bswap32(msg->remote_port);
	if (t.family == AF_INET) {
		__u32 l = msg->local_ip4, r = msg->remote_ip4;

		__builtin_memcpy(t.laddr, &l, 4);
		__builtin_memcpy(t.raddr, &r, 4);
	} else {
#pragma unroll
		for (int k = 0; k < 4; k++) {
			__u32 l = msg->local_ip6[k], r = msg->remote_ip6[k];

			__builtin_memcpy(t.laddr + 4 * k, &l, 4);
			__builtin_memcpy(t.raddr + 4 * k, &r, 4);
		}
	}
	v = bpf_map_lookup_elem(&inject, &t);
	if (!v)
		return SK_PASS;
	/* Taken: this is the request's first write. */
	in = *v;
	bpf_map_delete_elem(&inject, &t);
	if ((bpf_get_current_pid_tgid() >> 32) != self_tgid) {
		result(&in, PROP_FAILED, PROP_CTR_FOREIGN);
		return SK_PASS;
	}

	n = fm_clamp(msg->size, SCAN_MAX);
	if (n < 18 || bpf_msg_pull_data(msg, 0, n, 0)) {
		result(&in, n < 18 ? PROP_NOT_HTTP1 : PROP_FAILED, n < 18 ? PROP_CTR_NOT_HTTP1 : PROP_CTR_FAILED);
		return SK_PASS;
	}
	sc = bpf_map_lookup_elem(&scratch, &zero);
	if (!sc) {
		result(&in, PROP_FAILED, PROP_CTR_FAILED);
		return SK_PASS;
	}
	gen = fm_gen_begin(&sc->gen);
	sc->n = n;
	sc->line_end = -1;
	sc->hdr_end = -1;
	sc->has_tp = 0;
	sc->has_ts = 0;
	if (msg_copy_in(msg)) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_FAILED, PROP_CTR_FAILED);
		return SK_PASS;
	}
	msg_scan();
	if (!request_line(sc)) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_NOT_HTTP1, PROP_CTR_NOT_HTTP1);
		return SK_PASS;
	}
	if (sc->hdr_end < 0) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_TOO_LARGE, PROP_CTR_TOO_LARGE);
		return SK_PASS;
	}
	if (sc->has_tp) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_PRESENT, PROP_CTR_PRESENT);
		return SK_PASS;
	}
	at = sc->hdr_end;
	len = build(sc, &in, &ts_missing);
	if (!fm_gen_check(&sc->gen, gen)) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_FAILED, PROP_CTR_PREEMPTED);
		return SK_PASS;
	}
	/* Insert before the blank line: the last header lines. The new bytes
	 * are not initialised: they are filled, or removed again. */
	if (at <= 0 || at >= n || len < TP_HDR_LEN || len > OUT_MAX ||
	    bpf_msg_push_data(msg, at, len, 0)) {
		fm_gen_end(&sc->gen, gen);
		result(&in, PROP_FAILED, PROP_CTR_FAILED);
		return SK_PASS;
	}
	if (bpf_msg_pull_data(msg, at, at + len, 0) || msg_fill(msg, len) ||
	    !fm_gen_end(&sc->gen, gen)) {
		result(&in, PROP_FAILED, PROP_CTR_FAILED);
		/* Never send bytes that are not the request's: if they
		 * cannot be removed either (not seen), the write fails. */
		if (bpf_msg_pop_data(msg, at, len, 0))
			return SK_DROP;
		return SK_PASS;
	}
	/* The message is now three pieces (before, the header, after),
	 * which the kernel sends as three segments: a server reading them
	 * apart may drop the start of the header block from its buffer
	 * (Go's bufio.Reader slides what it consumed out), and with it what
	 * flowmill's own server side looks for. One piece again, for the
	 * header block to go out whole. If this fails, the message is still
	 * right. */
	bpf_msg_pull_data(msg, 0, n + len, 0);
	if (ts_missing)
		fm_count(PROP_CTR_TS_MISSING);
	result(&in, PROP_INJECTED, PROP_CTR_INJECTED);
	return SK_PASS;
}
