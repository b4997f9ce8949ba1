//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * HTTP server and client spans of the calling Go program, from uprobes on
 * its own executable.
 *
 *   net/http.serverHandler.ServeHTTP   one call per request served over
 *                                      HTTP/1 (the connection goroutine)
 *   net/http.(*Transport).roundTrip     one call per request sent (and per
 *                                      redirect or retry)
 *
 * Each function has one probe after its stack check (see goexe) and one on
 * every RET: two hits per request. No uretprobes: they corrupt Go stacks.
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
#include "flowmill.h"
#include "ids.h"

#define METHOD_MAX 16
#define HOST_MAX 64
#define PEER_MAX 48
#define PATH_MAX_ 128
#define ROUTE_MAX 128
#define TP_LEN 55           /* 00-<32 hex>-<16 hex>-<2 hex> */
#define HDR_SCAN 4096       /* request header bytes searched for traceparent */
#define HDR_BUF (2 * HDR_SCAN)
#define CTX_DEPTH 8         /* context.Context parents followed */
#define OBJ_MAX 512         /* bytes of a Go struct copied at once */

enum http_kind {
	HTTP_SERVER = 1,
	HTTP_CLIENT = 2,
};

enum http_flags {
	HTTP_F_REMOTE_PARENT = 1 << 0, /* parent from a traceparent header */
	HTTP_F_SAMPLED = 1 << 1,       /* traceparent's sampled flag */
	HTTP_F_PARENT_CTX = 1 << 2,    /* client: parent found via the request context */
	HTTP_F_PARENT_G = 1 << 3,      /* client: parent found via the goroutine */
	HTTP_F_HIJACKED = 1 << 4,      /* server: the handler hijacked the connection */
	/* method[] / route[] hold the address (8 bytes) of the string in the
	 * executable's read-only data instead of its bytes; *_len its length. */
	HTTP_F_METHOD_RO = 1 << 5,
	HTTP_F_ROUTE_RO = 1 << 6,
};

/* Family counters (see FM_CTR_FAMILY). */
enum {
	HTTP_CTR_UNSUPPORTED = FM_CTR_FAMILY, /* served by another ResponseWriter (HTTP/2) */
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
};

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
	__u64 ctx_root;            /* data word of context.Background() and TODO() */
	__u64 ro_lo;               /* the executable's read-only mappings: */
	__u64 ro_hi;               /*   [ro_lo, ro_hi), 0 if unknown */
};

volatile const struct http_offsets off = {};

struct http_event {
	__u64 start_ns;
	__u64 end_ns;
	__u64 goid;
	__u64 span_id;
	__u64 parent_span_id;
	__u8 trace_id[16];
	__s64 req_length;  /* Request.ContentLength: -1 unknown */
	__s64 resp_length; /* server: body bytes written; client: Response.ContentLength */
	__u64 err_itab;    /* client: itab of the error returned, 0 if none */
	__u32 pid;
	__u32 tid;
	__u16 status;
	__u8 kind;
	__u8 flags;
	__u8 method_len;
	__u8 host_len;
	__u8 peer_len;
	__u8 pad;
	__u16 path_len;
	__u16 route_len;
	__u32 pad2;
	char method[METHOD_MAX];
	char host[HOST_MAX];
	char peer[PEER_MAX];
	char path[PATH_MAX_];
	char route[ROUTE_MAX];
};

struct server_state {
	struct http_event ev;
	__u64 req;
	__u64 resp;
	__u64 ctx; /* the request context's data pointer */
};

struct span_ctx {
	__u8 trace_id[16];
	__u64 span_id;
};

/* Requests being served, by goroutine. LRU: entries whose RET never comes
 * (a handler that panics) are pushed out; user space also expires them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct server_state);
} servers SEC(".maps");

/* The same requests by their context, for clients called with it (or a
 * context derived from it) on another goroutine. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct span_ctx);
} server_ctxs SEC(".maps");

/* Requests being sent, by goroutine. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct http_event);
} clients SEC(".maps");

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
	__u64 gen;     /* scratch_begin/scratch_end */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/*
 * Uprobe programs run with migration disabled but, on kernels that preempt
 * (preempt=full or lazy, the default of recent kernels), not with
 * preemption disabled: another thread on the same CPU can run an entry
 * program, and use the CPU's scratch space, while one is halfway through
 * it. So every user of the scratch space bumps its generation on entry and
 * again on exit; an entry that finds, once it stored its state, that the
 * generation moved since it began was overtaken, and removes its (possibly
 * mixed) request, counted, rather than report another request's fields.
 */
static __always_inline __u64 scratch_begin(struct scratch *sc)
{
	__u64 g = sc->gen + 1;

	sc->gen = g;
	asm volatile("" ::: "memory");
	return g;
}

static __always_inline bool scratch_end(struct scratch *sc, __u64 g)
{
	bool ok;

	asm volatile("" ::: "memory");
	ok = sc->gen == g;
	sc->gen++;
	if (!ok)
		fm_count(HTTP_CTR_PREEMPTED);
	return ok;
}

/* Keep the types in the object's BTF for bpf2go -type. */
const struct http_event *unused_http_event __attribute__((unused));
const struct http_offsets *unused_http_offsets __attribute__((unused));

struct gostr {
	const char *ptr;
	__s64 len;
};

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

/* Span and trace IDs. bpf_get_prandom_u32 costs tens of nanoseconds a call
 * and a trace ID takes four; instead each ID is a unique number (ids.h: a
 * per-CPU counter tagged with the CPU) run through splitmix64's finalizer
 * (a bijection) keyed by a random seed the loader sets: unique, and
 * unpredictable without the seed. */
volatile const __u64 id_seed = 0;

static __always_inline __u64 mix64(__u64 z)
{
	z += 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static __always_inline __u64 rand64(void)
{
	__u64 n = fm_unique_id(), v;

	if (!n)
		return ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32() | 1;
	v = mix64(id_seed ^ n);
	return v ? v : 1;
}

static __always_inline void new_trace(__u8 id[16])
{
	__u64 a = rand64(), b = rand64();

	__builtin_memcpy(id, &a, 8);
	__builtin_memcpy(id + 8, &b, 8);
}

/* ---- traceparent ---- */

static __always_inline char at(const char *buf, __u32 i)
{
	return buf[i & (HDR_BUF - 1)];
}

/* scan_at looks at byte i of the request header in sc->hdr (n bytes) and
 * updates sc->found. */
static __always_inline void scan_at(struct scratch *sc, __u32 i, __u32 n)
{
	const char *b = sc->hdr;
	const char name[] = "traceparent:";

	if (i >= n || at(b, i) != '\n')
		return;
	/* A blank line before the end closes an earlier request's header
	 * (pipelining): what was found belongs to that request. */
	if ((at(b, i + 1) == '\n' && i + 2 < n) ||
	    (at(b, i + 1) == '\r' && at(b, i + 2) == '\n' && i + 3 < n)) {
		sc->found = -1;
		return;
	}
	if (i + 1 + sizeof(name) - 1 + TP_LEN > n)
		return;
#pragma unroll
	for (int k = 0; k < sizeof(name) - 1; k++) {
		if ((at(b, i + 1 + k) | 0x20) != name[k])
			return;
	}
	sc->found = i + sizeof(name);
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

/* scan_request looks for a traceparent header in the bytes the server
 * read for this request: the connection's bufio.Reader buffer up to its
 * read position holds the request line and headers just parsed. It sets
 * e's parent from a valid one. */
static __always_inline void scan_request(struct scratch *sc, __u64 bufr, struct http_event *e)
{
	__u64 buf, n;
	__s32 found;

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
	e->status = 0;
	e->err_itab = 0;
	e->resp_length = 0;
	e->route_len = 0;
}

SEC("uprobe")
int server_enter(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct scratch *sc;
	struct server_state *s;
	struct conn_cache *cc = NULL;
	struct http_event *e;
	__u64 key, req, url, bufr = 0, gen;

	/* ServeHTTP(rw ResponseWriter, req *Request): RBX, RCX = rw; RDI = req. */
	if (ctx->bx != off.resp_itab) {
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
	s->ctx = obj_u64(sc->req, off.req_ctx + 8);

	begin_event(ctx, e, HTTP_SERVER);
	e->host_len = 0;
	e->path_len = 0;
	e->span_id = rand64();
	e->parent_span_id = 0;
	e->req_length = obj_u64(sc->req, off.req_content_length);
	if (method_target(sc, e) < 0) {
		e->method_len = obj_str(e->method, METHOD_MAX, sc->req, off.req_method);
		url = obj_u64(sc->req, off.req_url);
		e->path_len = 0;
		if (url && !obj_read(sc->url, off.url_size, url))
			e->path_len = obj_str(e->path, PATH_MAX_, sc->url, off.url_path);
	}

	/* The connection's bufio.Reader and peer: cached by goroutine. */
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
	if (!(e->flags & HTTP_F_REMOTE_PARENT)) {
		e->flags = 0;
		e->parent_span_id = 0;
		new_trace(e->trace_id);
	}
	e->host_len = obj_str(e->host, HOST_MAX, sc->req, off.req_host);
	{
		/* Copied out before the check: what passes it is this
		 * request's. The state itself is copied by the map update,
		 * so the check comes after it, and undoes it when overtaken. */
		struct span_ctx sp = { .span_id = e->span_id };
		__u64 c = s->ctx;

		__builtin_memcpy(sp.trace_id, e->trace_id, 16);
		map_add(&servers, &key, s, HTTP_CTR_SERVERS_ADD);
		if (!scratch_end(sc, gen)) {
			map_del(&servers, &key, HTTP_CTR_SERVERS_DEL);
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
	__u64 key = gkey(ctx);
	struct server_state *s = bpf_map_lookup_elem(&servers, &key);
	struct http_event *e;
	__u64 rctx, conn;
	struct gostr pat;
	char r[64];

	if (!s)
		return 0;
	rctx = s->ctx;
	e = fm_reserve(sizeof(*e));
	if (e) {
		*e = s->ev;
		e->end_ns = bpf_ktime_get_ns();
		/* status and written are near each other: one read. */
		if (!bpf_probe_read_user(r, sizeof(r), (const void *)(s->resp + off.resp_lo))) {
			__u64 so = (off.resp_status - off.resp_lo) & 63;
			__u64 wo = (off.resp_written - off.resp_lo) & 63;
			__u64 v;

			if (so <= 56) {
				__builtin_memcpy(&v, r + so, 8);
				e->status = v;
			}
			if (wo <= 56) {
				__builtin_memcpy(&v, r + wo, 8);
				e->resp_length = v;
			}
		}
		e->route_len = 0;
		/* Patterns are usually constants: passed by address. */
		if (!bpf_probe_read_user(&pat, sizeof(pat), (const void *)(s->req + off.req_pattern)) &&
		    pat.len > 0) {
			__u64 n = pat.len > ROUTE_MAX ? ROUTE_MAX : pat.len;

			if (in_ro((__u64)pat.ptr, n)) {
				put_ro(e->route, (__u64)pat.ptr);
				e->flags |= HTTP_F_ROUTE_RO;
				e->route_len = n;
			} else if (!bpf_probe_read_user(e->route, fm_clamp(n, ROUTE_MAX), pat.ptr)) {
				e->route_len = n;
			}
		}
		if (!e->status) {
			conn = read_u64(s->resp + off.resp_conn);
			if (conn && (read_u64(conn + off.conn_hijacked) & 0xff))
				e->flags |= HTTP_F_HIJACKED;
		}
		fm_submit(e, sizeof(*e));
	}
	map_del(&servers, &key, HTTP_CTR_SERVERS_DEL);
	if (rctx)
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
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct http_event *e;
	struct span_ctx *p = NULL;
	__u64 key, req, url, gen;

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
	if (url && !obj_read(sc->url, off.url_size, url))
		host_path(sc, e);
	e->span_id = rand64();
	e->parent_span_id = 0;

	/* The parent: a request being served whose context the client's
	 * context is, or derives from (any goroutine); else the request the
	 * calling goroutine is serving. */
	if (off.ctx_walk) {
		__u64 c = obj_u64(sc->req, off.req_ctx + 8);

		for (int i = 0; i < CTX_DEPTH && c && c != off.ctx_root; i++) {
			p = bpf_map_lookup_elem(&server_ctxs, &c);
			if (p) {
				e->flags |= HTTP_F_PARENT_CTX;
				__builtin_memcpy(e->trace_id, p->trace_id, 16);
				e->parent_span_id = p->span_id;
				break;
			}
			/* Every std Context embeds its parent as its first
			 * field: the interface's data word is at +8. */
			c = read_u64(c + 8);
		}
	}
	if (!p) {
		struct server_state *s = bpf_map_lookup_elem(&servers, &key);

		/* The same g, and the same goroutine (g is reused; without a
		 * goroutine ID, 0 == 0 and the g alone decides). */
		if (s && s->ev.goid == e->goid) {
			e->flags |= HTTP_F_PARENT_G;
			__builtin_memcpy(e->trace_id, s->ev.trace_id, 16);
			e->parent_span_id = s->ev.span_id;
		} else {
			new_trace(e->trace_id);
		}
	}
	/* As in server_enter: the map update copies the state, then the check. */
	map_add(&clients, &key, e, HTTP_CTR_CLIENTS_ADD);
	if (!scratch_end(sc, gen))
		map_del(&clients, &key, HTTP_CTR_CLIENTS_DEL);
	return 0;
}

SEC("uprobe")
int client_return(struct pt_regs *ctx)
{
	__u64 key = gkey(ctx);
	struct http_event *s = bpf_map_lookup_elem(&clients, &key);
	struct http_event *e;
	__u64 resp;
	char r[96];

	if (!s)
		return 0;
	e = fm_reserve(sizeof(*e));
	if (e) {
		*e = *s;
		e->end_ns = bpf_ktime_get_ns();
		/* Results: RAX = *Response; RBX, RCX = error. */
		resp = ctx->ax;
		/* StatusCode and ContentLength are near each other: one read. */
		if (resp && !bpf_probe_read_user(r, sizeof(r), (const void *)(resp + off.response_lo))) {
			__u64 so = (off.response_status - off.response_lo) & 127;
			__u64 lo = (off.response_length - off.response_lo) & 127;
			__u64 v;

			if (so <= sizeof(r) - 8) {
				__builtin_memcpy(&v, r + so, 8);
				e->status = v;
			}
			if (lo <= sizeof(r) - 8) {
				__builtin_memcpy(&v, r + lo, 8);
				e->resp_length = v;
			}
		}
		e->err_itab = ctx->bx;
		fm_submit(e, sizeof(*e));
	}
	map_del(&clients, &key, HTTP_CTR_CLIENTS_DEL);
	return 0;
}
