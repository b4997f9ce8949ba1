//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * HTTP server and client spans of the calling Go program, from uprobes on
 * its own executable.
 *
 *   net/http.serverHandler.ServeHTTP   one call per request served (over
 *                                      HTTP/1: on the connection's
 *                                      goroutine; over HTTP/2: on the
 *                                      request's own)
 *   net/http.(*Transport).roundTrip     one call per request sent (and per
 *                                      redirect or retry)
 *
 * Each function has one probe after its stack check (see goexe) and one on
 * every RET: two hits per request. No uretprobes: they corrupt Go stacks.
 * With trace context propagation, a third probe, at the entry only:
 *
 *   net/http.(*persistConn).roundTrip  one call per request sent over an
 *                                      HTTP/1 connection, once chosen
 *
 * which tells the socket programs (propagate.c) what the request's first
 * write carries; served requests keep their incoming tracestate for the
 * requests they make to pass on.
 *
 * Go ABIInternal on amd64: arguments and results in RAX, RBX, RCX, RDI,
 * RSI, R8..R11; the current goroutine's g in R14. State between entry and
 * return is kept per goroutine (its ID, read from g), as a goroutine can
 * move between threads.
 *
 * Struct field offsets are not guessed: user space reads them from the
 * types compiled into the very program (reflect, unsafe.Offsetof) and sets
 * them in "off" before loading.
 *
 * Cost: reads of user memory (bpf_probe_read_user) dominate the programs'
 * run time, so they are kept few: a struct is copied once and its fields
 * taken from the copy; method and request target come from one read of the
 * request line (Method and RequestURI are substrings of it); what is constant
 * for a connection (its bufio.Reader, the peer address) is cached per
 * serving goroutine; strings in the executable's read-only data (ServeMux
 * patterns, method constants) are passed by address, not copied.
 */
#include "http_server.h"
#include "goprobe.h"

#define TP_LEN 55           /* 00-<32 hex>-<16 hex>-<2 hex> */
#define HDR_SCAN 4096       /* request header bytes searched for traceparent */
#define HDR_BUF (2 * HDR_SCAN)
#define OBJ_MAX 512         /* bytes of a Go struct copied at once */

/* Family counters (see FM_CTR_FAMILY). */
enum {
	/* Served by a ResponseWriter that is neither net/http's HTTP/1 one
	 * nor its HTTP/2 one (or HTTP/2, when its layout was not learnt). */
	HTTP_CTR_UNSUPPORTED = FM_CTR_FAMILY,
	/* Entries added to and removed from the in-flight maps by these
	 * programs: what is neither removed nor still there was evicted. */
	HTTP_CTR_SERVERS_ADD,
	HTTP_CTR_SERVERS_DEL,
	HTTP_CTR_CTXS_ADD,
	HTTP_CTR_CTXS_DEL,
	HTTP_CTR_CLIENTS_ADD,
	HTTP_CTR_CLIENTS_DEL,
	/* A request not traced: its entry could not read the Request. */
	HTTP_CTR_UNREADABLE,
	/* A request not traced: its entry was preempted by another using the
	 * CPU's scratch space (see scratch_begin). */
	HTTP_CTR_PREEMPTED,
	/* Client requests whose trace context was not propagated, by why
	 * (persistConn.roundTrip, client_return): over TLS, not over an
	 * HTTP/1 connection (HTTP/2), over another net.Conn, on a connection
	 * not tracked, on one the sockhash refused, its socket not found from
	 * its file descriptor, inject full, propagation unavailable. */
	HTTP_CTR_PROP_TLS,
	HTTP_CTR_PROP_HTTP2,
	HTTP_CTR_PROP_CONN,
	HTTP_CTR_PROP_UNTRACKED,
	HTTP_CTR_PROP_SOCK_FAILED,
	HTTP_CTR_PROP_NOSOCK,
	HTTP_CTR_PROP_FULL,
	HTTP_CTR_PROP_UNAVAILABLE,
	HTTP_CTR_PROP_MISSED, /* an HTTP/1 response, and persistConn.roundTrip not seen */
	/* Served requests whose tracestate was not kept: longer than TS_MAX,
	 * or tracestates could not take it. */
	HTTP_CTR_TS_DROPPED,
	/* HTTP/2 served requests whose valid traceparent was read but not
	 * kept for their handler (h2_ctxs full, or h2_headers overtaken on
	 * its CPU): they start a trace of their own. */
	HTTP_CTR_H2_CTX_LOST,
	/* Requests not counted in the request metrics: the series table
	 * (red) was full. */
	HTTP_CTR_RED_FULL,
};

/* Whether outgoing requests get trace context (set by the loader). */
enum {
	PROPAGATE_OFF = 0,         /* WithoutPropagation */
	PROPAGATE_ON = 1,
	PROPAGATE_UNAVAILABLE = 2, /* the socket programs could not be set up */
};

volatile const __u32 propagate = PROPAGATE_OFF;

/* Field offsets of the program's own net/http, net/url and bufio types. */
struct http_offsets {
	__u64 req_method;          /* http.Request.Method (string) */
	__u64 req_url;             /* http.Request.URL (*url.URL) */
	__u64 req_host;            /* http.Request.Host (string) */
	__u64 req_remote_addr;     /* http.Request.RemoteAddr (string) */
	__u64 req_content_length;  /* http.Request.ContentLength (int64) */
	__u64 req_pattern;         /* http.Request.Pattern (string) */
	__u64 req_ctx;             /* http.Request.ctx (context.Context) */
	__u64 url_host;            /* url.URL.Host (string) */
	__u64 url_path;            /* url.URL.Path (string) */
	__u64 resp_conn;           /* http.response.conn (*http.conn) */
	__u64 resp_status;         /* http.response.status (int) */
	__u64 resp_written;        /* http.response.written (int64) */
	__u64 conn_bufr;           /* http.conn.bufr (*bufio.Reader) */
	__u64 conn_hijacked;       /* http.conn.hijackedv (bool) */
	__u64 bufio_buf;           /* bufio.Reader.buf ([]byte) */
	__u64 bufio_r;             /* bufio.Reader.r (int) */
	__u64 response_status;     /* http.Response.StatusCode (int) */
	__u64 response_length;     /* http.Response.ContentLength (int64) */
	__u64 resp_itab;           /* itab of (*http.response, http.ResponseWriter) */
	__u64 goid;                /* runtime.g.goid; ~0: none known */
	__u64 req_size;            /* bytes of http.Request read at once (<= OBJ_MAX) */
	__u64 url_size;            /* bytes of url.URL read at once (<= OBJ_MAX) */
	__u64 resp_lo;             /* first byte of http.response read at return */
	__u64 ctx_walk;            /* 1: every std Context keeps its parent first */
	__u64 req_uri;             /* http.Request.RequestURI (string) */
	__u64 response_lo;         /* first byte of http.Response read at return */
	__u64 response_major;      /* http.Response.ProtoMajor (int) */
	__u64 ctx_root;            /* data word of context.Background() and TODO() */
	__u64 ro_lo;               /* the executable's read-only mappings: */
	__u64 ro_hi;               /*   [ro_lo, ro_hi), 0 if unknown */
	__u64 pc_conn;             /* http.persistConn.conn (net.Conn) */
	__u64 tcpconn_fd;          /* net.TCPConn's conn.fd (*net.netFD) */
	__u64 netfd_sysfd;         /* net.netFD's pfd.Sysfd (int) */
	__u64 tcpconn_itab;        /* itab of (*net.TCPConn, net.Conn) */
	__u64 tcpconn_type;        /* type of *net.TCPConn */
	__u64 tlsconn_itab;        /* itab of (*tls.Conn, net.Conn) */
	__u64 tlsconn_type;        /* type of *tls.Conn */
	__u64 req_tls;             /* http.Request.TLS (*tls.ConnectionState) */
	__u64 req_proto_major;     /* http.Request.ProtoMajor (int) */
	__u64 req_proto_minor;     /* http.Request.ProtoMinor (int) */
	__u64 url_scheme;          /* url.URL.Scheme (string) */
	__u64 response_minor;      /* http.Response.ProtoMinor (int) */
	/* net/http's HTTP/2 ResponseWriter, 0: not known (HTTP/2 requests
	 * are then counted as unsupported). */
	__u64 h2_itab;             /* its itab as an http.ResponseWriter */
	__u64 h2_rws;              /* offset of the pointer to its state; ~0: none (the fields are its own) */
	__u64 h2_lo;               /* first byte of that state read at return */
	__u64 h2_status;           /* status (int) */
	__u64 h2_written;          /* body bytes written (int64) */
	/* HTTP/2 incoming trace context (h2_headers); h2_hf_size 0: not
	 * read. */
	__u64 h2_stream;           /* the writer's state: its stream (*stream) */
	__u64 h2_stream_id;        /* stream.id (uint32) */
	__u64 h2_fields;           /* MetaHeadersFrame.Fields ([]hpack.HeaderField) */
	__u64 h2_hf_size;          /* hpack.HeaderField: its size, */
	__u64 h2_hf_name;          /*   Name (string), */
	__u64 h2_hf_value;         /*   Value (string) */
};

volatile const struct http_offsets off = {};

/* What stays the same for all requests of a connection, by the goroutine
 * serving it (net/http serves a connection on one goroutine, conn.serve,
 * for its whole life; goroutine IDs are never reused, so a matching goid
 * means the same connection). Losing an entry only costs reads. */
struct conn_cache {
	__u64 goid;
	__u64 bufr; /* http.conn.bufr */
	__u32 peer_len;
	__u32 pad;
	char peer[PEER_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct conn_cache);
} conns SEC(".maps");

/* Scratch space: these values are too large for the BPF stack. */
struct scratch {
	struct server_state s;
	struct conn_cache cc;
	char req[OBJ_MAX + 16];
	char url[OBJ_MAX + 16];
	char hdr[HDR_BUF];
	__u32 hdr_len; /* bytes of hdr read, for scan_word */
	__s32 found;   /* scan_word: offset in hdr of the value of the last
			* traceparent, or -1 */
	__s32 found_ts; /* the same for tracestate */
	__u32 pad;
	struct tracestate ts;
	__u64 gen;     /* scratch_begin/scratch_end */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* The entry programs' use of the scratch space (see fm_gen_begin): an
 * entry that finds, once it stored its state, that it was overtaken removes
 * its (possibly mixed) request, counted, rather than report another
 * request's fields. */
static __always_inline __u64 scratch_begin(struct scratch *sc)
{
	return fm_gen_begin(&sc->gen);
}

static __always_inline bool scratch_end(struct scratch *sc, __u64 g)
{
	bool ok = fm_gen_end(&sc->gen, g);

	if (!ok)
		fm_count(HTTP_CTR_PREEMPTED);
	return ok;
}

/* Keep the types in the object's BTF for bpf2go -type. */
const struct http_offsets *unused_http_offsets __attribute__((unused));

static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

/*
 * Every bpf_probe_read_user costs a few hundred nanoseconds on a VM, more
 * than anything else here: structs are copied once (obj_read) and their
 * fields taken from the copy (obj_u64, obj_str).
 */
static __always_inline int obj_read(char *dst, __u64 size, __u64 addr)
{
	return bpf_probe_read_user(dst, fm_clamp(size, OBJ_MAX), (const void *)addr);
}

static __always_inline __u64 obj_u64(const char *obj, __u64 o)
{
	__u64 v;

	__builtin_memcpy(&v, obj + (o & (OBJ_MAX - 1)), sizeof(v));
	return v;
}

/* obj_str copies at most cap bytes of the Go string at offset o of obj
 * (cap a constant). */
static __always_inline __u32 obj_str(char *dst, const __u32 cap, const char *obj, __u64 o)
{
	__u64 p = obj_u64(obj, o);
	__s64 len = obj_u64(obj, o + 8);
	__u64 n;

	if (!p || len <= 0)
		return 0;
	n = fm_clamp(len, cap);
	if (bpf_probe_read_user(dst, n, (const void *)p))
		return 0;
	return n;
}

/* in_ro reports whether the string [p, p+n) lies in the executable's
 * read-only mappings: immutable for the life of the process, so user space
 * (the same process) reads it from its address. */
static __always_inline bool in_ro(__u64 p, __u64 n)
{
	return off.ro_lo && p >= off.ro_lo && p + n <= off.ro_hi && p + n >= p;
}

/* put_ro stores the address of a read-only string in place of its bytes. */
static __always_inline void put_ro(char *dst, __u64 p)
{
	__builtin_memcpy(dst, &p, sizeof(p));
}

static __always_inline void map_add(void *map, void *key, void *val, __u32 ctr)
{
	if (!bpf_map_update_elem(map, key, val, BPF_ANY))
		fm_count(ctr);
}

static __always_inline void map_del(void *map, void *key, __u32 ctr)
{
	if (!bpf_map_delete_elem(map, key))
		fm_count(ctr);
}

/* has_byte reports whether the word x holds the byte c (exactly: the
 * classic "has zero byte" test on x ^ c*8 has no false positives in its
 * yes/no answer). */
static __always_inline bool has_byte(__u64 x, __u8 c)
{
	x ^= 0x0101010101010101ULL * c;
	return (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
}

/* State between entry and return is keyed by the goroutine's g (R14): no
 * read needed. A g is reused after its goroutine exits, but an entry can
 * only be consumed by a return on the goroutine that made it, as a return
 * always follows its own entry on the same goroutine, which overwrites any
 * entry left by a dead goroutine (one whose handler panicked). */
static __always_inline __u64 gkey(struct pt_regs *ctx)
{
	return ctx->r14;
}

/* goid reads the goroutine ID, which, unlike g, is never reused. */
static __always_inline __u64 goid(struct pt_regs *ctx)
{
	if (off.goid == ~0ULL)
		return 0;
	return read_u64(ctx->r14 + off.goid);
}

/* Span and trace IDs are random (bpf_get_prandom_u32), as W3C Trace
 * Context asks of trace IDs: no ID tells anything about another, whatever
 * the number of CPUs, and none is 0 (an invalid ID). A few tens of
 * nanoseconds a call, six calls at most per request: nothing next to the
 * uprobe trap. The helper keeps its state per CPU with preemption
 * disabled, so preemptible uprobe programs do not share a draw. */
static __always_inline __u64 rand64(void)
{
	__u64 v = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();

	return v ? v : 1;
}

static __always_inline void new_trace(__u8 id[16])
{
	__u64 a = rand64(), b = rand64();

	__builtin_memcpy(id, &a, 8);
	__builtin_memcpy(id + 8, &b, 8);
}

/* ---- traceparent ---- */

/* at reads byte i of a header buffer. The empty asm keeps clang from
 * dropping the mask where it knows it changes nothing: the verifier may
 * not know it of the register clang would use instead. */
static __always_inline char at(const char *buf, __u32 i)
{
	asm volatile("" : "+r"(i));
	return buf[i & (HDR_BUF - 1)];
}

/* scan_at looks at byte i of the request header in sc->hdr (n bytes) and
 * updates sc->found and sc->found_ts. */
static __always_inline void scan_at(struct scratch *sc, __u32 i, __u32 n)
{
	const char *b = sc->hdr;
	const char tp[] = "traceparent:";
	const char ts[] = "tracestate:";

	if (i >= n || at(b, i) != '\n')
		return;
	/* A blank line before the end closes an earlier request's header
	 * (pipelining): what was found belongs to that request. */
	if ((at(b, i + 1) == '\n' && i + 2 < n) ||
	    (at(b, i + 1) == '\r' && at(b, i + 2) == '\n' && i + 3 < n)) {
		sc->found = -1;
		sc->found_ts = -1;
		return;
	}
	if (i + 1 + sizeof(tp) - 1 + TP_LEN <= n &&
	    http_name_is(b, HDR_BUF - 1, i + 1, "traceparent:")) {
		sc->found = i + sizeof(tp);
		return;
	}
	if (i + sizeof(ts) < n && http_name_is(b, HDR_BUF - 1, i + 1, "tracestate:"))
		sc->found_ts = i + sizeof(ts);
}

/* scan_word looks at the 8 bytes of word w of the request header and only
 * looks closer at a word that holds a newline (the classic "has zero byte"
 * test on word ^ '\n'x8). Its state is in the scratch map, which the
 * verifier does not track, so that it has nothing to tell apart between
 * iterations.
 *
 * It is a global function: the verifier checks it once, on its own, rather
 * than once per call. A bounded loop is checked iteration by iteration, and
 * the branches of the closer look, in each of HDR_SCAN/8 iterations, would
 * exceed the branches a verifier keeps pending (8192). bpf_loop, which
 * solves the same problem, needs Linux 5.17. Arguments of a global
 * function can only be scalars on 5.10: it looks up the scratch map
 * itself. */
__attribute__((noinline)) int scan_word(__u32 w)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u32 i = w * 8, n;
	__u64 x;

	if (!sc)
		return 0;
	n = sc->hdr_len;
	__builtin_memcpy(&x, sc->hdr + (i & (HDR_BUF - 1)), 8);
	x ^= 0x0a0a0a0a0a0a0a0aULL;
	if (!((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL))
		return 0;
#pragma unroll
	for (int k = 0; k < 8; k++)
		scan_at(sc, i + k, n);
	return 0;
}

static __always_inline int hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	return -1;
}

/* parse_traceparent parses "00-<trace id>-<parent id>-<flags>" at v. */
static __always_inline int parse_traceparent(const char *b, __u32 v, __u32 n,
					     struct http_event *e)
{
	__u64 span = 0;
	int hi, lo;

	if (at(b, v) == 'f' && at(b, v + 1) == 'f')
		return -1;
	if (hexval(at(b, v)) < 0 || hexval(at(b, v + 1)) < 0 || at(b, v + 2) != '-' ||
	    at(b, v + 35) != '-' || at(b, v + 52) != '-')
		return -1;
	/* Version 00 is exactly 55 characters. */
	if (at(b, v) == '0' && at(b, v + 1) == '0' && v + TP_LEN < n) {
		char end = at(b, v + TP_LEN);

		if (end != '\r' && end != '\n' && end != ' ' && end != '\t')
			return -1;
	}
	__u64 any = 0;
#pragma unroll
	for (int k = 0; k < 16; k++) {
		hi = hexval(at(b, v + 3 + 2 * k));
		lo = hexval(at(b, v + 4 + 2 * k));
		if (hi < 0 || lo < 0)
			return -1;
		e->trace_id[k] = hi << 4 | lo;
		any |= e->trace_id[k];
	}
#pragma unroll
	for (int k = 0; k < 16; k++) {
		hi = hexval(at(b, v + 36 + k));
		if (hi < 0)
			return -1;
		span = span << 4 | hi;
	}
	hi = hexval(at(b, v + 53));
	lo = hexval(at(b, v + 54));
	if (!any || !span || hi < 0 || lo < 0)
		return -1;
	/* Span IDs travel big-endian in hex; keep them as the number. */
	e->parent_span_id = span;
	e->flags |= HTTP_F_REMOTE_PARENT;
	if (lo & 1)
		e->flags |= HTTP_F_SAMPLED;
	return 0;
}

/* line_end returns the offset in sc->hdr of the first CR or LF at or
 * after v and before sc->hdr_len, looking at most TS_MAX + 8 bytes ahead,
 * or -1. 8 bytes at a time, then the byte. A global function: each of its
 * loop's exits returns, so the verifier does not carry them further. */
__attribute__((noinline)) int line_end(__u32 v)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u32 n;

	if (!sc)
		return -1;
	n = sc->hdr_len;
	for (__u32 w = 0; w <= TS_MAX / 8; w++) {
		__u32 i = v + w * 8;
		__u64 x;

		if (i >= n || i >= HDR_SCAN)
			return -1;
		__builtin_memcpy(&x, sc->hdr + fm_mask(i, HDR_BUF - 1), 8);
		if (!has_byte(x, '\r') && !has_byte(x, '\n'))
			continue;
#pragma unroll
		for (int k = 0; k < 8; k++) {
			char ch = at(sc->hdr, i + k);

			if (i + k < n && (ch == '\r' || ch == '\n'))
				return i + k;
		}
		return -1;
	}
	return -1;
}

/* take_tracestate copies the value of the tracestate header found by
 * scan_word (at sc->found_ts in sc->hdr) into sc->ts, without the optional
 * white space around it. It returns its length, 0 if it is empty, -1 if it
 * is longer than TS_MAX or does not end within the bytes read. A global
 * function (see scan_word). */
__attribute__((noinline)) int take_tracestate(void)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	__u32 v, n, len;
	int e;

	if (!sc || sc->found_ts < 0)
		return 0;
	v = sc->found_ts;
	n = sc->hdr_len;
	for (int k = 0; k < 8; k++) {
		char ch = at(sc->hdr, v);

		if (ch != ' ' && ch != '\t')
			break;
		v++;
	}
	if (v >= n || v >= HDR_SCAN)
		return -1;
	e = line_end(v);
	if (e < 0 || (__u32)e < v || (__u32)e - v > TS_MAX + 8)
		return -1;
	len = (__u32)e - v;
#pragma unroll
	for (int k = 0; k < 8; k++) {
		char ch = at(sc->hdr, v + len - 1);

		if (len == 0 || (ch != ' ' && ch != '\t'))
			break;
		len--;
	}
	if (len > TS_MAX)
		return -1;
	if (len && bpf_probe_read_kernel(sc->ts.v, fm_clamp(len, TS_MAX), sc->hdr + (v & (HDR_SCAN - 1))))
		return -1;
	sc->ts.len = len;
	return len;
}

/* scan_request looks for a traceparent header in the bytes the server
 * read for this request: the connection's bufio.Reader buffer up to its
 * read position holds the request line and headers just parsed. It sets
 * e's parent from a valid one. */
static __always_inline void scan_request(struct scratch *sc, __u64 bufr, struct http_event *e)
{
	__u64 buf, n;
	__s32 found;

	sc->ts.len = 0;
	if (!bufr || obj_read(sc->url, 64, bufr))
		return;
	buf = obj_u64(sc->url, off.bufio_buf);
	n = obj_u64(sc->url, off.bufio_r);
	if (!buf || (__s64)n <= 0)
		return;
	n = fm_clamp(n, HDR_SCAN);
	if (bpf_probe_read_user(sc->hdr, n, (const void *)buf))
		return;
	sc->hdr_len = n;
	sc->found = -1;
	sc->found_ts = -1;
	/* Bounded: every kernel since 5.3 checks it. */
	for (__u32 w = 0; w < HDR_SCAN / 8; w++) {
		if (w * 8 >= n)
			break;
		scan_word(w);
	}
	found = sc->found;
	if (found >= 0) {
		__u32 v = found;

		for (int k = 0; k < 2; k++) {
			char ch = at(sc->hdr, v);

			if (ch == ' ' || ch == '\t')
				v++;
		}
		if (v + TP_LEN <= n)
			parse_traceparent(sc->hdr, v, n, e);
	}
	/* A tracestate is only meaningful with the traceparent it goes with
	 * (W3C Trace Context: a new trace drops it). */
	if ((e->flags & HTTP_F_REMOTE_PARENT) && sc->found_ts >= 0 && take_tracestate() < 0)
		fm_count(HTTP_CTR_TS_DROPPED);
}

/* path_len returns how many bytes of the request target at p (n of them,
 * copied; total in all) are URL.Path: those before the first '?'. It
 * returns -1 when the path may be escaped ('%'; URL.Path is the decoded
 * form) or is longer than what was copied. It looks at 8 bytes at once and
 * only looks closer at words that hold a '?' or a '%': a bounded loop of
 * PATH_MAX_/8 iterations. */
static __always_inline int path_len(const char *p, __u32 n, __u32 total)
{
	for (__u32 i = 0; i < PATH_MAX_; i += 8) {
		__u64 x;

		if (i >= n)
			break;
		__builtin_memcpy(&x, p + i, 8);
		if (!has_byte(x, '?') && !has_byte(x, '%'))
			continue;
		for (__u32 k = 0; k < 8; k++) {
			char ch = p[(i + k) & (PATH_MAX_ - 1)];

			if (i + k < n && (ch == '?' || ch == '%'))
				return ch == '?' ? (int)(i + k) : -1;
		}
	}
	return n == total ? (int)n : -1;
}

/* method_target takes the method and URL.Path of a served request from one
 * read of its request line: net/http cuts Method and RequestURI from the
 * same string, so they are adjacent. It returns -1 when the path must be
 * taken from the URL (escaped, not origin-form, or the strings are not
 * adjacent). */
static __always_inline int method_target(struct scratch *sc, struct http_event *e)
{
	__u64 mp = obj_u64(sc->req, off.req_method);
	__s64 ml = obj_u64(sc->req, off.req_method + 8);
	__u64 up = obj_u64(sc->req, off.req_uri);
	__s64 ul = obj_u64(sc->req, off.req_uri + 8);
	__u64 n;
	int pl;

	if (!mp || ml <= 0 || ml > METHOD_MAX || ul <= 0 || up != mp + ml + 1)
		return -1;
	n = fm_clamp(ul, PATH_MAX_);
	/* The line: method, a space, the target. */
	if (bpf_probe_read_user(sc->url, fm_clamp(ml + 1 + n, METHOD_MAX + 1 + PATH_MAX_),
				(const void *)mp))
		return -1;
	__builtin_memcpy(e->method, sc->url, METHOD_MAX);
	e->method_len = ml;
	if (sc->url[(ml + 1) & 31] != '/')
		return -1;
	if (bpf_probe_read_kernel(e->path, fm_clamp(n, PATH_MAX_), sc->url + ((ml + 1) & 31)))
		return -1;
	pl = path_len(e->path, n, ul);
	if (pl < 0)
		return -1;
	e->path_len = pl;
	return 0;
}

/*
 * An LRU map hands an element it evicts straight to the insert that evicted
 * it, even while a program on another CPU is reading it (seen under load on
 * emulated 7.3: a span with one request's path and another's status). So a
 * return program takes the element's span ID, random for each request,
 * before it copies the element, and checks it again once it has used it:
 * if it changed, the record is dropped. The request is counted as evicted
 * all the same (the entry's removal, by the program, then fails).
 */
static __always_inline bool same_entry(const volatile __u64 *span_id, __u64 was)
{
	asm volatile("" ::: "memory");
	return *span_id == was;
}

/* ---- HTTP/2 incoming trace context ---- */

/*
 * net/http's HTTP/2 server decodes (HPACK) a request's header block into a
 * list of fields, MetaHeadersFrame.Fields ([]hpack.HeaderField: Name and
 * Value strings), on the connection's serve goroutine, and copies them
 * into Request.Header (a Go map) in
 *
 *   net/http.(*http2serverConn).newWriterAndRequest(st *http2stream, f *http2MetaHeadersFrame)
 *   (Go 1.27: net/http/internal/http2.(*serverConn).newWriterAndRequest)
 *
 * A probe at its entry (h2_headers) looks for traceparent and tracestate
 * among the fields and keeps what it finds in h2_ctxs, by the stream's
 * address, for the handler's goroutine: server_enter reaches the same
 * stream from the ResponseWriter (its state's stream) and takes it. The
 * stream ID, kept with it and read again there, tells a stream from
 * another that reused a dead one's memory (client streams have odd IDs,
 * pushed ones even). Offsets are learnt from the program (see layout.go).
 */
#define H2_FIELDS_MAX 64   /* header fields looked at */
#define H2_HF_MAX 48       /* bytes of an hpack.HeaderField, at most */
#define H2_FBUF 4096       /* >= H2_FIELDS_MAX * H2_HF_MAX, a power of two */

struct h2_ctx {
	__u64 start_ns;       /* for the sweeper */
	__u64 parent_span_id;
	__u32 stream_id;
	__u8 flags;           /* HTTP_F_REMOTE_PARENT, HTTP_F_SAMPLED */
	__u8 pad[3];
	__u8 trace_id[16];
	struct tracestate ts; /* len 0: none */
};

/* By stream address, from h2_headers to the handler's server_enter. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct h2_ctx);
} h2_ctxs SEC(".maps");

struct h2_scratch {
	struct h2_ctx c;
	char fields[H2_FBUF + 16]; /* a copy of Fields' elements */
	char name[16];
	char tp[64];
	__u32 n;                   /* fields copied */
	__s32 tp_i;                /* index of the last traceparent field, or -1 */
	__s32 ts_i;                /* the same for tracestate */
	__u32 pad;
	__u64 gen;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_scratch);
} h2scratch SEC(".maps");

const struct h2_ctx *unused_h2_ctx __attribute__((unused));

/* h2_str reads the string (pointer, length) at offset o of the fields'
 * copy. */
static __always_inline void h2_str(struct h2_scratch *sc, __u32 o, __u64 *p, __s64 *n)
{
	__builtin_memcpy(p, sc->fields + fm_mask(o, H2_FBUF - 1), 8);
	__builtin_memcpy(n, sc->fields + fm_mask(o + 8, H2_FBUF - 1), 8);
}

/* h2_field looks at the name of field i of the copy in h2scratch and
 * notes a traceparent or tracestate in tp_i or ts_i. Names decoded from
 * HPACK's static table are the executable's read-only strings, never one
 * of these two: they are not read. A global function (see scan_word). */
__attribute__((noinline)) int h2_field(__u32 i)
{
	__u32 zero = 0;
	struct h2_scratch *sc = bpf_map_lookup_elem(&h2scratch, &zero);
	__u64 p;
	__s64 n;

	if (!sc || i >= H2_FIELDS_MAX || i >= sc->n)
		return 0;
	h2_str(sc, i * off.h2_hf_size + off.h2_hf_name, &p, &n);
	if ((n != 11 && n != 10) || !p || in_ro(p, n))
		return 0;
	if (bpf_probe_read_user(sc->name, n == 11 ? 11 : 10, (const void *)p))
		return 0;
	if (n == 11 && http_name_is(sc->name, 15, 0, "traceparent"))
		sc->tp_i = i;
	else if (n == 10 && http_name_is(sc->name, 15, 0, "tracestate"))
		sc->ts_i = i;
	return 0;
}

/* h2_traceparent parses the traceparent field's value into sc->c: 0 if
 * valid. */
static __always_inline int h2_traceparent(struct h2_scratch *sc)
{
	__u64 p, span = 0;
	__s64 n;
	int sampled;

	if (sc->tp_i < 0)
		return -1;
	h2_str(sc, (__u32)sc->tp_i * off.h2_hf_size + off.h2_hf_value, &p, &n);
	/* Version 00 is exactly GO_TP_LEN bytes; a later one may have more
	 * fields, after a '-'. */
	if (!p || n < GO_TP_LEN || bpf_probe_read_user(sc->tp, n > GO_TP_LEN ? GO_TP_LEN + 1 : GO_TP_LEN, (const void *)p))
		return -1;
	if (n > GO_TP_LEN && ((sc->tp[0] == '0' && sc->tp[1] == '0') || sc->tp[GO_TP_LEN] != '-'))
		return -1;
	sampled = go_parse_traceparent(sc->tp, sc->c.trace_id, &span);
	if (sampled < 0)
		return -1;
	sc->c.parent_span_id = span;
	sc->c.flags = HTTP_F_REMOTE_PARENT | (sampled ? HTTP_F_SAMPLED : 0);
	return 0;
}

/* h2_tracestate copies the tracestate field's value into sc->c.ts. */
static __always_inline void h2_tracestate(struct h2_scratch *sc)
{
	__u64 p;
	__s64 n;

	sc->c.ts.len = 0;
	if (sc->ts_i < 0)
		return;
	h2_str(sc, (__u32)sc->ts_i * off.h2_hf_size + off.h2_hf_value, &p, &n);
	if (!p || n <= 0)
		return;
	if (n > TS_MAX || bpf_probe_read_user(sc->c.ts.v, fm_clamp(n, TS_MAX), (const void *)p)) {
		fm_count(HTTP_CTR_TS_DROPPED);
		return;
	}
	sc->c.ts.len = n;
}

SEC("uprobe")
int h2_headers(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u32 zero = 0;
	struct h2_scratch *sc;
	__u64 st, f, gen, fl[2];

	/* newWriterAndRequest(sc *serverConn, st *stream, f *MetaHeadersFrame):
	 * RAX = sc, RBX = st, RCX = f. */
	st = ctx->bx;
	f = ctx->cx;
	if (!off.h2_hf_size || !st || !f)
		return 0;
	sc = bpf_map_lookup_elem(&h2scratch, &zero);
	if (!sc)
		return 0;
	gen = fm_gen_begin(&sc->gen);
	sc->n = 0;
	sc->tp_i = -1;
	sc->ts_i = -1;
	/* Fields: pointer, length. */
	if (!bpf_probe_read_user(fl, sizeof(fl), (const void *)(f + off.h2_fields)) && fl[0] && (__s64)fl[1] > 0) {
		__u64 n = fl[1] > H2_FIELDS_MAX ? H2_FIELDS_MAX : fl[1];

		if (!bpf_probe_read_user(sc->fields, fm_clamp(n * off.h2_hf_size, H2_FBUF), (const void *)fl[0]))
			sc->n = n;
	}
	for (__u32 i = 0; i < H2_FIELDS_MAX; i++) {
		if (i >= sc->n)
			break;
		h2_field(i);
	}
	if (h2_traceparent(sc) < 0) {
		/* Nothing for this stream: nor what a dead one at the same
		 * address left. */
		fm_gen_end(&sc->gen, gen);
		bpf_map_delete_elem(&h2_ctxs, &st);
		return 0;
	}
	h2_tracestate(sc);
	sc->c.stream_id = read_u64(st + off.h2_stream_id);
	sc->c.start_ns = bpf_ktime_get_ns();
	/* As in server_enter: the update copies, then the check. */
	if (bpf_map_update_elem(&h2_ctxs, &st, &sc->c, BPF_ANY)) {
		fm_gen_end(&sc->gen, gen);
		fm_count(HTTP_CTR_H2_CTX_LOST);
		return 0;
	}
	if (!fm_gen_end(&sc->gen, gen)) {
		bpf_map_delete_elem(&h2_ctxs, &st);
		fm_count(HTTP_CTR_H2_CTX_LOST);
	}
	return 0;
}

/* h2_context gives e the trace context h2_headers kept for the stream of
 * an HTTP/2 request whose writer's state is rws, and its tracestate to
 * sc->ts; it removes the entry. */
static __always_inline void h2_context(struct scratch *sc, __u64 rws, struct http_event *e)
{
	struct h2_ctx *c;
	__u64 st, start;
	__u32 id;

	if (!off.h2_hf_size || !rws)
		return;
	st = read_u64(rws + off.h2_stream);
	if (!st)
		return;
	c = bpf_map_lookup_elem(&h2_ctxs, &st);
	if (!c)
		return;
	id = read_u64(st + off.h2_stream_id);
	start = c->start_ns;
	asm volatile("" ::: "memory");
	if (c->stream_id == id && (c->flags & HTTP_F_REMOTE_PARENT)) {
		__builtin_memcpy(e->trace_id, c->trace_id, 16);
		e->parent_span_id = c->parent_span_id;
		e->flags |= c->flags & (HTTP_F_REMOTE_PARENT | HTTP_F_SAMPLED);
		if (c->ts.len && c->ts.len <= TS_MAX &&
		    !bpf_probe_read_kernel(sc->ts.v, sizeof(sc->ts.v), c->ts.v))
			sc->ts.len = c->ts.len;
		/* An LRU element can be handed to another insert while it is
		 * read (see same_entry): then it is not this request's. */
		if (!same_entry((volatile __u64 *)&c->start_ns, start) || c->stream_id != id) {
			e->flags &= ~(HTTP_F_REMOTE_PARENT | HTTP_F_SAMPLED);
			sc->ts.len = 0;
		}
	}
	bpf_map_delete_elem(&h2_ctxs, &st);
}

/* ---- sampling and request metrics ---- */

/* Trace sampling, set by user space after loading (and whenever it
 * changes). A trace flowmill starts is sampled when the upper 63 bits of
 * the last 8 bytes of its ID, big-endian, are below bound: the rule of the
 * OpenTelemetry SDKs' TraceIDRatioBased sampler, so that an SDK with the
 * same ratio takes the same decision on the same trace. A request with a
 * remote parent follows the parent's sampled flag. With drop set, a
 * request that is not sampled sends no record (its metrics are counted
 * all the same, below). */
struct sampling_cfg {
	__u64 bound; /* ratio * 2^63; 1 << 63: every trace */
	__u32 drop;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sampling_cfg);
} sampling SEC(".maps");

static __always_inline bool root_sampled(const __u8 id[16])
{
	__u32 zero = 0;
	struct sampling_cfg *c = bpf_map_lookup_elem(&sampling, &zero);
	__u64 x;

	if (!c)
		return true;
	__builtin_memcpy(&x, id + 8, 8);
	return (__builtin_bswap64(x) >> 1) < c->bound;
}

/* sends_record reports whether a request of these flags sends a record. */
static __always_inline bool sends_record(__u8 flags)
{
	__u32 zero = 0;
	struct sampling_cfg *c = bpf_map_lookup_elem(&sampling, &zero);

	return !c || !c->drop || (flags & HTTP_F_SAMPLED);
}

/* Request metrics (RED: rate, errors, duration), aggregated here from every
 * request, sampled or not: a series per set of metric attributes (red_key),
 * each a log-linear histogram of durations: bucket 0 below 2^10 ns, then
 * 2^RED_SUB_BITS buckets per power of two up to 2^41 ns, the last bucket
 * above. Each bucket keeps its count and the sum of its durations, so user
 * space has the exact count and sum of every bucket. Cumulative: user
 * space reads the table when metrics are collected and takes the growth. */
#define RED_SUB_BITS 3
#define RED_BUCKETS 256
#define RED_MIN_LOG 10
#define RED_MAX_LOG 40
#define RED_STR_MAX ROUTE_MAX

struct red_key {
	__u8 kind;        /* HTTP_SERVER, HTTP_CLIENT */
	__u8 flags;       /* HTTP_F_METHOD_RO, HTTP_F_ROUTE_RO, HTTP_F_HIJACKED */
	__u8 method_len;
	__u8 proto_major;
	__u8 proto_minor;
	__u8 scheme;
	__u16 status;
	__u16 str_len;    /* of str */
	__u16 pad[3];
	__u64 err_itab;   /* client: the error's itab, 0 if none */
	char method[METHOD_MAX];
	char str[RED_STR_MAX]; /* server: the route (pattern); client: URL.Host */
};

struct red_bucket {
	__u64 count;
	__u64 sum_ns;
};

struct red_hist {
	struct red_bucket b[RED_BUCKETS];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 512);
	__type(key, struct red_key);
	__type(value, struct red_hist);
} red SEC(".maps");

/* The zero histogram, a new series' first value. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct red_hist);
} red_zero SEC(".maps");

static __always_inline __u32 fm_log2(__u64 v)
{
	__u32 r = 0;

	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) r += 1;
	return r;
}

static __always_inline __u32 red_index(__u64 ns)
{
	__u32 l;

	if (ns < (1ULL << RED_MIN_LOG))
		return 0;
	l = fm_log2(ns);
	if (l > RED_MAX_LOG)
		return RED_BUCKETS - 1;
	return 1 + ((l - RED_MIN_LOG) << RED_SUB_BITS) + ((ns >> (l - RED_SUB_BITS)) & ((1 << RED_SUB_BITS) - 1));
}

#define MW(a, b, c, d, e, f, g)                                                 \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 |   \
	 (__u64)(e) << 32 | (__u64)(f) << 40 | (__u64)(g) << 48)

/* known_method reports whether w (a method's bytes, zero-padded) is one of
 * the methods the semantic conventions name; the others are "_OTHER". */
static __always_inline bool known_method(__u64 w)
{
	return w == MW('G', 'E', 'T', 0, 0, 0, 0) || w == MW('P', 'O', 'S', 'T', 0, 0, 0) ||
	       w == MW('P', 'U', 'T', 0, 0, 0, 0) || w == MW('H', 'E', 'A', 'D', 0, 0, 0) ||
	       w == MW('D', 'E', 'L', 'E', 'T', 'E', 0) || w == MW('P', 'A', 'T', 'C', 'H', 0, 0) ||
	       w == MW('O', 'P', 'T', 'I', 'O', 'N', 'S') || w == MW('C', 'O', 'N', 'N', 'E', 'C', 'T') ||
	       w == MW('T', 'R', 'A', 'C', 'E', 0, 0) || w == MW('Q', 'U', 'E', 'R', 'Y', 0, 0);
}

/* red_method sets the key's method from an event's: the address of a
 * read-only string (a constant of the program), or its bytes when they
 * are a known method. Any other method a client sends is left empty
 * ("_OTHER"), so that clients cannot fill the table with series of made-up
 * methods. */
static __always_inline void red_method(struct red_key *k, const struct http_event *e)
{
	__u32 n = e->method_len;
	__u64 w;

	if (e->flags & HTTP_F_METHOD_RO) {
		k->method_len = n;
		k->flags |= HTTP_F_METHOD_RO;
		__builtin_memcpy(k->method, e->method, 8);
		return;
	}
	if (n == 0 || n > 7)
		return;
	__builtin_memcpy(&w, e->method, 8);
	w &= (1ULL << (8 * n)) - 1;
	if (known_method(w)) {
		__builtin_memcpy(k->method, &w, 8);
		k->method_len = n;
	}
}

/* red_add counts a request of ns nanoseconds in the series k. The adds are
 * atomic: the table is shared by all CPUs, and uprobe programs can be
 * preempted. */
static __always_inline void red_add(const struct red_key *k, __u64 ns)
{
	struct red_hist *h = bpf_map_lookup_elem(&red, k);
	__u32 zero = 0, i;

	if (!h) {
		struct red_hist *z = bpf_map_lookup_elem(&red_zero, &zero);

		if (!z)
			return;
		bpf_map_update_elem(&red, k, z, BPF_NOEXIST); /* or another CPU did */
		h = bpf_map_lookup_elem(&red, k);
		if (!h) {
			fm_count(HTTP_CTR_RED_FULL);
			return;
		}
	}
	i = fm_mask(red_index(ns), RED_BUCKETS - 1);
	__sync_fetch_and_add(&h->b[i].count, 1);
	__sync_fetch_and_add(&h->b[i].sum_ns, ns);
}

/* ---- server ---- */

/* begin_event starts the event of a request at its entry: the fields every
 * kind sets the same way. The scratch event is reused: the rest is set by
 * the caller. */
static __always_inline void begin_event(struct pt_regs *ctx, struct http_event *e, __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();

	e->start_ns = bpf_ktime_get_ns();
	e->end_ns = 0;
	e->goid = goid(ctx);
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->kind = kind;
	e->flags = 0;
	e->prop = PROP_NONE;
	e->status = 0;
	e->err_itab = 0;
	e->resp_length = 0;
	e->route_len = 0;
}

SEC("uprobe")
int server_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u32 zero = 0;
	struct scratch *sc;
	struct server_state *s;
	struct conn_cache *cc = NULL;
	struct http_event *e;
	__u64 key, req, url, bufr = 0, gen;
	bool h2;

	/* ServeHTTP(rw ResponseWriter, req *Request): RBX, RCX = rw; RDI = req. */
	h2 = off.h2_itab && ctx->bx == off.h2_itab;
	if (ctx->bx != off.resp_itab && !h2) {
		fm_count(HTTP_CTR_UNSUPPORTED);
		return 0;
	}
	sc = bpf_map_lookup_elem(&scratch, &zero);
	if (!sc)
		return 0;
	gen = scratch_begin(sc);
	s = &sc->s;
	e = &s->ev;
	key = gkey(ctx);
	req = ctx->di;
	if (obj_read(sc->req, off.req_size, req)) {
		fm_count(HTTP_CTR_UNREADABLE);
		scratch_end(sc, gen);
		return 0;
	}
	s->req = req;
	s->resp = ctx->cx;
	s->h2 = h2;
	/* HTTP/2: the writer's state (set for the handler's whole call). */
	if (h2 && off.h2_rws != ~0ULL)
		s->resp = read_u64(ctx->cx + off.h2_rws);
	s->ctx = obj_u64(sc->req, off.req_ctx + 8);

	begin_event(ctx, e, HTTP_SERVER);
	e->host_len = 0;
	e->path_len = 0;
	e->span_id = rand64();
	e->parent_span_id = 0;
	e->req_length = obj_u64(sc->req, off.req_content_length);
	e->proto_major = obj_u64(sc->req, off.req_proto_major);
	e->proto_minor = obj_u64(sc->req, off.req_proto_minor);
	e->scheme = obj_u64(sc->req, off.req_tls) ? SCHEME_HTTPS : SCHEME_HTTP;
	if (method_target(sc, e) < 0) {
		e->method_len = obj_str(e->method, METHOD_MAX, sc->req, off.req_method);
		url = obj_u64(sc->req, off.req_url);
		e->path_len = 0;
		if (url && !obj_read(sc->url, off.url_size, url))
			e->path_len = obj_str(e->path, PATH_MAX_, sc->url, off.url_path);
	}

	/* The connection's bufio.Reader and peer: cached by goroutine. An
	 * HTTP/2 request runs on a goroutine of its own, its headers
	 * decoded (HPACK) into Request.Header: the peer is read from the
	 * Request, the trace context from what h2_headers kept. */
	if (h2) {
		e->peer_len = obj_str(e->peer, PEER_MAX, sc->req, off.req_remote_addr);
		sc->ts.len = 0;
		h2_context(sc, s->resp, e);
		goto parent;
	}
	if (e->goid) {
		cc = bpf_map_lookup_elem(&conns, &key);
		if (cc && cc->goid != e->goid)
			cc = NULL;
	}
	if (cc) {
		bufr = cc->bufr;
		e->peer_len = cc->peer_len;
		__builtin_memcpy(e->peer, cc->peer, PEER_MAX);
	} else {
		__u64 conn = read_u64(s->resp + off.resp_conn);

		if (conn)
			bufr = read_u64(conn + off.conn_bufr);
		e->peer_len = obj_str(e->peer, PEER_MAX, sc->req, off.req_remote_addr);
		if (e->goid && bufr) {
			sc->cc.goid = e->goid;
			sc->cc.bufr = bufr;
			sc->cc.peer_len = e->peer_len;
			__builtin_memcpy(sc->cc.peer, e->peer, PEER_MAX);
			bpf_map_update_elem(&conns, &key, &sc->cc, BPF_ANY);
		}
	}
	scan_request(sc, bufr, e);
parent:
	if (!(e->flags & HTTP_F_REMOTE_PARENT)) {
		e->flags = 0;
		e->parent_span_id = 0;
		new_trace(e->trace_id);
		if (root_sampled(e->trace_id))
			e->flags |= HTTP_F_SAMPLED;
	} else if (sc->ts.len) {
		/* Kept while the request is served, for the requests it
		 * makes to pass on. */
		__u64 id = e->span_id;

		if (!bpf_map_update_elem(&tracestates, &id, &sc->ts, BPF_ANY))
			e->flags |= HTTP_F_TRACESTATE;
		else
			fm_count(HTTP_CTR_TS_DROPPED);
	}
	e->host_len = obj_str(e->host, HOST_MAX, sc->req, off.req_host);
	{
		/* Copied out before the check: what passes it is this
		 * request's. The state itself is copied by the map update,
		 * so the check comes after it, and undoes it when overtaken. */
		struct span_ctx sp = { .span_id = e->span_id };
		__u64 c = s->ctx;

		__builtin_memcpy(sp.trace_id, e->trace_id, 16);
		sp.flags = e->flags & (HTTP_F_REMOTE_PARENT | HTTP_F_SAMPLED | HTTP_F_TRACESTATE);
		map_add(&servers, &key, s, HTTP_CTR_SERVERS_ADD);
		if (!scratch_end(sc, gen)) {
			map_del(&servers, &key, HTTP_CTR_SERVERS_DEL);
			if (sp.flags & HTTP_F_TRACESTATE)
				bpf_map_delete_elem(&tracestates, &sp.span_id);
			return 0;
		}
		if (c && off.ctx_walk)
			map_add(&server_ctxs, &c, &sp, HTTP_CTR_CTXS_ADD);
	}
	return 0;
}

SEC("uprobe")
int server_return(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u64 key = gkey(ctx);
	struct server_state *s = bpf_map_lookup_elem(&servers, &key);
	struct http_event *e;
	__u64 rctx, conn, resp, req, sid, lo, so, wo, start, end, written = 0;
	struct red_key k;
	struct gostr pat;
	bool ours, h2;
	char r[64];

	if (!s)
		return 0;
	end = bpf_ktime_get_ns();
	sid = s->ev.span_id;
	asm volatile("" ::: "memory");
	start = s->ev.start_ns;
	rctx = s->ctx;
	resp = s->resp;
	req = s->req;
	h2 = s->h2;
	if (s->ev.flags & HTTP_F_TRACESTATE) {
		__u64 id = s->ev.span_id;

		bpf_map_delete_elem(&tracestates, &id);
	}

	/* What the metrics and the record share, in the metrics' key. */
	__builtin_memset(&k, 0, sizeof(k));
	k.kind = HTTP_SERVER;
	k.proto_major = s->ev.proto_major;
	k.proto_minor = s->ev.proto_minor;
	k.scheme = s->ev.scheme;
	red_method(&k, &s->ev);
	/* status and written are near each other: one read. */
	if (h2) {
		lo = off.h2_lo;
		so = (off.h2_status - lo) & 63;
		wo = (off.h2_written - lo) & 63;
	} else {
		lo = off.resp_lo;
		so = (off.resp_status - lo) & 63;
		wo = (off.resp_written - lo) & 63;
	}
	if (resp && !bpf_probe_read_user(r, sizeof(r), (const void *)(resp + lo))) {
		__u64 v;

		if (so <= 56) {
			__builtin_memcpy(&v, r + so, 8);
			k.status = v;
		}
		if (wo <= 56)
			__builtin_memcpy(&written, r + wo, 8);
	}
	/* Patterns are usually constants: passed by address. */
	if (!bpf_probe_read_user(&pat, sizeof(pat), (const void *)(req + off.req_pattern)) &&
	    pat.len > 0) {
		__u64 n = pat.len > ROUTE_MAX ? ROUTE_MAX : pat.len;

		if (in_ro((__u64)pat.ptr, n)) {
			put_ro(k.str, (__u64)pat.ptr);
			k.flags |= HTTP_F_ROUTE_RO;
			k.str_len = n;
		} else if (!bpf_probe_read_user(k.str, fm_clamp(n, ROUTE_MAX), pat.ptr)) {
			k.str_len = n;
		}
	}
	if (!k.status && !h2) {
		conn = read_u64(resp + off.resp_conn);
		if (conn && (read_u64(conn + off.conn_hijacked) & 0xff))
			k.flags |= HTTP_F_HIJACKED;
	}
	/* Counted once, by the entry's owner: an entry handed on (see
	 * same_entry) is another request's. */
	ours = same_entry(&s->ev.span_id, sid);
	if (ours)
		red_add(&k, end - start);

	if (ours && sends_record(s->ev.flags)) {
		e = fm_reserve(sizeof(*e));
		if (e) {
			*e = s->ev;
			e->end_ns = end;
			e->status = k.status;
			e->resp_length = written;
			e->flags |= k.flags & HTTP_F_HIJACKED;
			e->route_len = k.str_len;
			if (k.flags & HTTP_F_ROUTE_RO)
				e->flags |= HTTP_F_ROUTE_RO;
			__builtin_memcpy(e->route, k.str, ROUTE_MAX);
			if (same_entry(&s->ev.span_id, sid) && e->span_id == sid)
				fm_submit(e, sizeof(*e));
			else
				bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		}
	}
	/* rctx is another request's if the element was handed on. */
	ours = same_entry(&s->ev.span_id, sid);
	map_del(&servers, &key, HTTP_CTR_SERVERS_DEL);
	if (rctx && ours)
		map_del(&server_ctxs, &rctx, HTTP_CTR_CTXS_DEL);
	return 0;
}

/* ---- client ---- */

/* host_path copies URL.Host and URL.Path. url.Parse leaves both as
 * substrings of the URL it parsed, usually adjacent: then one read. */
static __always_inline void host_path(struct scratch *sc, struct http_event *e)
{
	__u64 hp = obj_u64(sc->url, off.url_host);
	__s64 hl = obj_u64(sc->url, off.url_host + 8);
	__u64 pp = obj_u64(sc->url, off.url_path);
	__s64 pl = obj_u64(sc->url, off.url_path + 8);

	if (hl > 0 && hl <= HOST_MAX && pl > 0 && pp >= hp + hl && pp - hp <= 2 * HOST_MAX) {
		__u64 d = pp - hp;
		__u64 n = pl > PATH_MAX_ ? PATH_MAX_ : pl;

		/* sc->req is free once the request's fields are taken. */
		if (!bpf_probe_read_user(sc->req, fm_clamp(d + n, 2 * HOST_MAX + PATH_MAX_), (const void *)hp) &&
		    !bpf_probe_read_kernel(e->host, fm_clamp(hl, HOST_MAX), sc->req) &&
		    !bpf_probe_read_kernel(e->path, fm_clamp(n, PATH_MAX_), sc->req + (d & (2 * HOST_MAX - 1)))) {
			e->host_len = hl;
			e->path_len = n;
			return;
		}
	}
	e->host_len = obj_str(e->host, HOST_MAX, sc->url, off.url_host);
	e->path_len = obj_str(e->path, PATH_MAX_, sc->url, off.url_path);
}

SEC("uprobe")
int client_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct http_event *e;
	struct span_ctx *p = NULL;
	__u64 key, req, url, gen;
	__u8 pflags = 0;

	if (!sc)
		return 0;
	gen = scratch_begin(sc);
	e = &sc->s.ev;
	key = gkey(ctx);
	/* roundTrip(t *Transport, req *Request): RAX = t, RBX = req. */
	req = ctx->bx;
	if (obj_read(sc->req, off.req_size, req)) {
		fm_count(HTTP_CTR_UNREADABLE);
		scratch_end(sc, gen);
		return 0;
	}

	begin_event(ctx, e, HTTP_CLIENT);
	e->peer_len = 0;
	e->req_length = obj_u64(sc->req, off.req_content_length);
	{
		/* Methods are usually constants (http.MethodGet): passed by
		 * address. */
		__u64 mp = obj_u64(sc->req, off.req_method);
		__s64 ml = obj_u64(sc->req, off.req_method + 8);

		if (ml > 0 && ml <= METHOD_MAX && in_ro(mp, ml)) {
			put_ro(e->method, mp);
			e->flags |= HTTP_F_METHOD_RO;
			e->method_len = ml;
		} else {
			e->method_len = obj_str(e->method, METHOD_MAX, sc->req, off.req_method);
		}
	}
	url = obj_u64(sc->req, off.req_url);
	e->host_len = 0;
	e->path_len = 0;
	e->scheme = SCHEME_UNKNOWN;
	e->proto_major = 0;
	e->proto_minor = 0;
	if (url && !obj_read(sc->url, off.url_size, url)) {
		__u64 sp = obj_u64(sc->url, off.url_scheme);
		__s64 sl = obj_u64(sc->url, off.url_scheme + 8);
		char sch[8] = {};

		/* url.Parse lowers the scheme's case. */
		if ((sl == 4 || sl == 5) && !bpf_probe_read_user(sch, fm_clamp(sl, 5), (const void *)sp) &&
		    sch[0] == 'h' && sch[1] == 't' && sch[2] == 't' && sch[3] == 'p')
			e->scheme = sl == 4 ? SCHEME_HTTP : (sch[4] == 's' ? SCHEME_HTTPS : SCHEME_UNKNOWN);
		host_path(sc, e);
	}
	e->span_id = rand64();
	e->parent_span_id = 0;

	/* The parent: a request being served whose context the client's
	 * context is, or derives from (any goroutine); else the request the
	 * calling goroutine is serving. */
	if (off.ctx_walk) {
		p = http_ctx_parent(obj_u64(sc->req, off.req_ctx + 8), off.ctx_root);
		if (p) {
			e->flags |= HTTP_F_PARENT_CTX;
			__builtin_memcpy(e->trace_id, p->trace_id, 16);
			e->parent_span_id = p->span_id;
			pflags = p->flags;
		}
	}
	if (!p) {
		struct server_state *s = http_g_parent(key, e->goid);

		if (s) {
			e->flags |= HTTP_F_PARENT_G;
			__builtin_memcpy(e->trace_id, s->ev.trace_id, 16);
			e->parent_span_id = s->ev.span_id;
			pflags = s->ev.flags;
		} else {
			new_trace(e->trace_id);
		}
	}
	/* What it propagates: the sampled flag of its parent (the
	 * traceparent's it came in with, or flowmill's decision on the trace
	 * it started), its own decision when it has no parent (see
	 * root_sampled); the tracestate that came with its trace. */
	if (!(e->flags & (HTTP_F_PARENT_CTX | HTTP_F_PARENT_G)) ? root_sampled(e->trace_id) : (pflags & HTTP_F_SAMPLED))
		e->flags |= HTTP_F_SAMPLED;
	if (pflags & HTTP_F_TRACESTATE)
		e->flags |= HTTP_F_TRACESTATE;
	/* As in server_enter: the map update copies the state, then the check. */
	map_add(&clients, &key, e, HTTP_CTR_CLIENTS_ADD);
	if (!scratch_end(sc, gen))
		map_del(&clients, &key, HTTP_CTR_CLIENTS_DEL);
	return 0;
}

SEC("uprobe")
int client_return(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u64 key = gkey(ctx);
	struct http_event *s = bpf_map_lookup_elem(&clients, &key);
	struct http_event *e;
	__u64 resp, sid, start, end, major = 0, minor = 0, length = 0, status = 0;
	struct red_key k;
	__u8 prop;
	char r[96];

	if (!s)
		return 0;
	end = bpf_ktime_get_ns();
	sid = s->span_id; /* see same_entry */
	asm volatile("" ::: "memory");
	start = s->start_ns;
	prop = s->prop;
	/* Results: RAX = *Response; RBX, RCX = error. */
	resp = ctx->ax;
	/* StatusCode and ContentLength are near each other: one read. */
	if (resp && !bpf_probe_read_user(r, sizeof(r), (const void *)(resp + off.response_lo))) {
		__u64 so = (off.response_status - off.response_lo) & 127;
		__u64 lo = (off.response_length - off.response_lo) & 127;

		if (so <= sizeof(r) - 8)
			__builtin_memcpy(&status, r + so, 8);
		if (lo <= sizeof(r) - 8)
			__builtin_memcpy(&length, r + lo, 8);
		lo = (off.response_major - off.response_lo) & 127;
		if (lo <= sizeof(r) - 8)
			__builtin_memcpy(&major, r + lo, 8);
		lo = (off.response_minor - off.response_lo) & 127;
		if (lo <= sizeof(r) - 8)
			__builtin_memcpy(&minor, r + lo, 8);
		if (major >= 10 || minor >= 10)
			major = minor = 0;
	}

	__builtin_memset(&k, 0, sizeof(k));
	k.kind = HTTP_CLIENT;
	k.status = status;
	k.proto_major = major;
	k.proto_minor = minor;
	k.scheme = s->scheme;
	k.err_itab = ctx->bx;
	red_method(&k, s);
	k.str_len = fm_clamp(s->host_len, HOST_MAX);
	if (k.str_len)
		bpf_probe_read_kernel(k.str, fm_clamp(k.str_len, HOST_MAX), s->host);

	if (propagate == PROPAGATE_UNAVAILABLE) {
		prop = PROP_UNAVAILABLE;
		fm_count(HTTP_CTR_PROP_UNAVAILABLE);
	} else if (propagate == PROPAGATE_ON && prop == PROP_NONE && !k.err_itab) {
		/* A response, and never on an HTTP/1 connection
		 * (persistConn.roundTrip): HTTP/2. A response of another
		 * version means the uprobe's hit was missed (the kernel
		 * counts it: Stats.Missed), or a protocol registered with
		 * Transport.RegisterProtocol. */
		if (major == 2) {
			prop = PROP_HTTP2;
			fm_count(HTTP_CTR_PROP_HTTP2);
		} else {
			prop = PROP_FAILED;
			fm_count(HTTP_CTR_PROP_MISSED);
		}
	}
	if (same_entry(&s->span_id, sid)) {
		red_add(&k, end - start);
		if (sends_record(s->flags)) {
			e = fm_reserve(sizeof(*e));
			if (e) {
				*e = *s;
				e->end_ns = end;
				e->status = status;
				e->resp_length = length;
				e->proto_major = major;
				e->proto_minor = minor;
				e->err_itab = k.err_itab;
				e->prop = prop;
				if (same_entry(&s->span_id, sid) && e->span_id == sid)
					fm_submit(e, sizeof(*e));
				else
					bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
			}
		}
	}
	map_del(&clients, &key, HTTP_CTR_CLIENTS_DEL);
	return 0;
}

static __always_inline char hexdigit(__u8 v)
{
	return v < 10 ? '0' + v : 'a' - 10 + v;
}

/* format_traceparent writes the header line "traceparent: 00-<trace
 * id>-<span id>-<flags>\r\n" (TP_HDR_LEN bytes) of a client request into
 * tp. */
static __always_inline void format_traceparent(char *tp, const struct http_event *e)
{
	__u64 span = e->span_id;

	__builtin_memcpy(tp, "traceparent: 00-", 16);
#pragma unroll
	for (int k = 0; k < 16; k++) {
		tp[16 + 2 * k] = hexdigit(e->trace_id[k] >> 4);
		tp[17 + 2 * k] = hexdigit(e->trace_id[k] & 15);
	}
	tp[48] = '-';
#pragma unroll
	for (int k = 0; k < 16; k++)
		tp[49 + k] = hexdigit((span >> (60 - 4 * k)) & 15);
	tp[65] = '-';
	tp[66] = '0';
	tp[67] = (e->flags & HTTP_F_SAMPLED) ? '1' : '0';
	tp[68] = '\r';
	tp[69] = '\n';
}

/* fd_sock returns the struct sock of file descriptor fd of the current
 * process, 0 if it is not a socket. Kernel memory, read with CO-RE. */
static __always_inline __u64 fd_sock(__s64 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = NULL;
	struct socket *so;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (!fds || bpf_probe_read_kernel(&f, sizeof(f), fds + fd) || !f)
		return 0;
	so = BPF_CORE_READ(f, private_data);
	/* A socket's file points at it, and it back at the file. */
	if (!so || BPF_CORE_READ(so, file) != f)
		return 0;
	return (__u64)BPF_CORE_READ(so, sk);
}

static __always_inline int prop_done(struct http_event *e, __u8 prop, __u32 ctr)
{
	e->prop = prop;
	fm_count(ctr);
	return 0;
}

/*
 * net/http.(*persistConn).roundTrip: one call per request sent over an
 * HTTP/1 connection (HTTP/2 goes elsewhere), on the goroutine of
 * Transport.roundTrip, after the connection was chosen and before its
 * writeLoop goroutine writes the request. It tells the socket programs
 * (propagate.c) what the next request written on that connection carries:
 * an inject entry, by the connection's addresses, with the traceparent
 * line of the request's own span. Only plain TCP connections: over TLS
 * the kernel sees encrypted bytes.
 */
SEC("uprobe")
int pconn_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u64 key = gkey(ctx);
	struct http_event *e = bpf_map_lookup_elem(&clients, &key);
	struct inject_req in = {};
	struct sock_tuple t;
	struct sock_state *st;
	__u64 conn[2], sk, nfd;
	__s64 fd = -1;

	/* roundTrip(pc *persistConn, req *transportRequest): RAX = pc. */
	if (!e || e->kind != HTTP_CLIENT)
		return 0;
	if (bpf_probe_read_user(conn, sizeof(conn), (const void *)(ctx->ax + off.pc_conn)))
		return prop_done(e, PROP_FAILED, HTTP_CTR_PROP_NOSOCK);
	/* pc.conn is a net.Conn: which type? Its itab, or the type in it
	 * (itab._type, at +8), against those of this program. */
	if (conn[0] != off.tcpconn_itab) {
		__u64 typ = conn[0] ? read_u64(conn[0] + 8) : 0;

		if (!typ || typ != off.tcpconn_type) {
			if (conn[0] == off.tlsconn_itab || (typ && typ == off.tlsconn_type))
				return prop_done(e, PROP_TLS, HTTP_CTR_PROP_TLS);
			return prop_done(e, PROP_CONN, HTTP_CTR_PROP_CONN);
		}
	}
	nfd = read_u64(conn[1] + off.tcpconn_fd);
	if (nfd)
		fd = read_u64(nfd + off.netfd_sysfd);
	sk = fd_sock(fd);
	if (!sk)
		return prop_done(e, PROP_FAILED, HTTP_CTR_PROP_NOSOCK);
	st = bpf_map_lookup_elem(&socks, &sk);
	if (!st || st->state == SOCK_CONNECTING)
		return prop_done(e, PROP_UNTRACKED, HTTP_CTR_PROP_UNTRACKED);
	if (st->state != SOCK_TRACKED)
		return prop_done(e, PROP_FAILED, HTTP_CTR_PROP_SOCK_FAILED);
	t = st->t;
	in.g = key;
	in.span_id = e->span_id;
	if (e->flags & HTTP_F_TRACESTATE)
		in.ts_span = e->parent_span_id;
	in.start_ns = bpf_ktime_get_ns();
	format_traceparent(in.tp, e);
	/* An entry left by a request never written on this connection is
	 * replaced: a connection carries one request at a time. */
	if (bpf_map_update_elem(&inject, &t, &in, BPF_ANY))
		return prop_done(e, PROP_FAILED, HTTP_CTR_PROP_FULL);
	e->prop = PROP_PENDING;
	return 0;
}
