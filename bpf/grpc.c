//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * gRPC server spans of the calling Go program (google.golang.org/grpc),
 * from uprobes on its own executable.
 *
 *   grpc.(*Server).handleStream                one call per RPC served, on
 *                                              the goroutine that runs its
 *                                              handler, until the status is
 *                                              sent: entry and every RET
 *   transport.(*http2Server).writeStatus       the status sent (entry)
 *   transport.(*http2Server).operateHeaders    an RPC's request headers, on
 *                                              the connection's reader
 *                                              goroutine (entry): its
 *                                              traceparent metadata
 *
 * Four hits per RPC. No uretprobes: they corrupt Go stacks. State between
 * handleStream's entry and return is kept per goroutine (its g); the
 * incoming trace context is kept from operateHeaders to handleStream by
 * transport and HTTP/2 stream ID.
 *
 * A client RPC's parent is the RPC served whose context it was given, or
 * that its goroutine serves; else the request served over net/http (the
 * HTTP family's maps, http_server.h, handed over by user space) whose
 * context it was given, or that its goroutine serves. grpc.c's own maps
 * and types are prefixed grpc_ so as not to clash with the HTTP family's.
 *
 * Struct field offsets and itabs are not guessed: user space takes them
 * from the types compiled into the very program (reflect, unsafe.Offsetof,
 * the program's own type descriptors) and sets them in "off" before
 * loading.
 */
#include "goprobe.h"
#include "http_server.h"

#define GRPC_METHOD_MAX 128
#define FIELDS_MAX 16    /* request header fields looked at for traceparent */
#define FIELD_SIZE_MAX 64
#define OBJ 256          /* bytes of transport.Stream copied at once */

enum grpc_kind {
	GRPC_SERVER = 1,
	GRPC_CLIENT = 2,
};

enum grpc_flags {
	GRPC_F_REMOTE_PARENT = 1 << 0, /* parent from a traceparent in the metadata */
	/* Server: its sampled flag. Client: its trace's (its parent's
	 * incoming one, set when it has none). */
	GRPC_F_SAMPLED = 1 << 1,
	GRPC_F_STATUS = 1 << 2,        /* code is the status sent */
	GRPC_F_PEER4 = 1 << 3,         /* peer_ip is an IPv4 address (first 4 bytes) */
	GRPC_F_PEER6 = 1 << 4,         /* peer_ip is an IPv6 address */
	GRPC_F_LOCAL = 1 << 5,         /* local_port is known */
	GRPC_F_PARENT_CTX = 1 << 6,    /* client: parent found via its context */
	GRPC_F_PARENT_G = 1 << 7,      /* client: parent found via its goroutine */
};

#define TARGET_MAX 64

/* What a client RPC's parent is: grpc_event.parent_kind. */
enum grpc_parent {
	GRPC_PARENT_NONE = 0, /* none: it starts a trace */
	GRPC_PARENT_RPC = 1,  /* an RPC served */
	GRPC_PARENT_HTTP = 2, /* a request served over net/http (http_server.h) */
};

struct grpc_event {
	__u64 start_ns;
	__u64 end_ns;
	__u64 goid;
	__u64 span_id;
	__u64 parent_span_id;
	__u8 trace_id[16];
	__u32 pid;
	__u32 tid;
	__u32 stream_id;
	__s32 code;
	__u16 method_len;
	__u16 peer_port;
	__u16 local_port;
	__u8 kind;
	__u8 flags;
	__u8 peer_ip[16];
	__u16 target_len;
	__u8 parent_kind; /* client: enum grpc_parent */
	__u8 pad0;
	__u16 pad[2];
	char method[GRPC_METHOD_MAX];
	char target[TARGET_MAX]; /* client: the ClientConn's dial target */
};

/* Family counters (see FM_CTR_FAMILY). */
enum {
	/* Served by another ServerTransport than grpc-go's HTTP/2 one
	 * (Server.ServeHTTP). */
	GRPC_CTR_UNSUPPORTED = FM_CTR_FAMILY,
	/* Entries added to and removed from grpc_servers by these programs: what
	 * is neither removed nor still there was evicted. */
	GRPC_CTR_SERVERS_ADD,
	GRPC_CTR_SERVERS_DEL,
	/* An RPC not traced: its stream could not be read. */
	GRPC_CTR_UNREADABLE,
	/* An RPC not traced: its entry was overtaken on its CPU. */
	GRPC_CTR_PREEMPTED,
	/* Incoming trace contexts kept, and taken by their RPC. */
	GRPC_CTR_TPS_ADD,
	GRPC_CTR_TPS_DEL,
	/* A traceparent that could not be read or parsed. */
	GRPC_CTR_TP_BAD,
	GRPC_CTR_CTXS_ADD,
	GRPC_CTR_CTXS_DEL,
	GRPC_CTR_CLIENTS_ADD,
	GRPC_CTR_CLIENTS_DEL,
	GRPC_CTR_STREAMS_ADD,
	GRPC_CTR_STREAMS_DEL,
	/* A stream whose ClientStream is not grpc-go's own (a stream
	 * interceptor's wrapper): not traced. */
	GRPC_CTR_STREAM_WRAPPED,
};

/* Field offsets and type words of the program's own grpc-go, x/net and net. */
struct grpc_offsets {
	__u64 stream_inner;    /* transport.ServerStream's embedded Stream */
	__u64 stream_indirect; /* 1: ... is a pointer */
	__u64 stream_method;   /* transport.Stream.method (string) */
	__u64 stream_id;       /* transport.Stream.id (uint32) */
	__u64 stream_st;       /* transport.ServerStream.st (interface) */
	__u64 st_itab;         /* itab of (*http2Server, internalServerTransport) */
	__u64 peer_addr;       /* http2Server.peer.Addr (net.Addr) */
	__u64 local_addr;      /* http2Server.peer.LocalAddr (net.Addr); ~0: none */
	__u64 tcpaddr_itab;    /* itab of (*net.TCPAddr, net.Addr) */
	__u64 tcpaddr_ip;      /* net.TCPAddr.IP ([]byte) */
	__u64 tcpaddr_port;    /* net.TCPAddr.Port (int) */
	__u64 status_s;        /* status.Status.s (*spb.Status) */
	__u64 spb_code;        /* spb.Status.Code (int32) */
	__u64 meta_headers;    /* http2.MetaHeadersFrame.HeadersFrame (pointer) */
	__u64 meta_fields;     /* http2.MetaHeadersFrame.Fields (slice) */
	__u64 frame_stream_id; /* http2.HeadersFrame's StreamID (uint32) */
	__u64 field_size;      /* size of hpack.HeaderField (<= FIELD_SIZE_MAX) */
	__u64 field_name;      /* hpack.HeaderField.Name (string) */
	__u64 field_value;     /* hpack.HeaderField.Value (string) */
	__u64 goid;            /* runtime.g.goid; ~0: none known */
	__u64 stream_ctx;      /* transport.Stream.ctx (context.Context) */
	__u64 ctx_walk;        /* 1: every std Context keeps its parent first */
	__u64 ctx_root;        /* data word of context.Background() */
	__u64 cc_target;       /* grpc.ClientConn.target (string) */
	__u64 cs_itab;         /* itab of (*grpc.clientStream, grpc.ClientStream) */
	__u64 cs_wrap_itab;    /* itab of (*grpc.clientStreamWrapper, grpc.ClientStream); 0: none */
	__u64 cs_wrap_inner;   /* clientStreamWrapper's embedded ClientStream (interface) */
	__u64 err_itab;        /* itab of (*status.Error, error) */
	__u64 err_s;           /* status.Error.s (*status.Status) */
	__u64 eof_data;        /* data word of io.EOF */
	__u64 client;          /* 1: the client programs are attached */
	__u64 http_parent;     /* 1: servers, server_ctxs are the HTTP family's */
	__u64 http_ctx_walk;   /* 1: ... and contexts may be walked to one */
	__u64 http_ctx_root;   /* data word of context.Background() (http_server.h) */
};

volatile const struct grpc_offsets off = {};

/* Keep the types in the object's BTF for bpf2go -type. */
const struct grpc_offsets *unused_grpc_offsets __attribute__((unused));
const struct grpc_event *unused_grpc_event __attribute__((unused));

struct grpc_server_state {
	struct grpc_event ev;
	__u64 stream; /* the *transport.ServerStream */
	__u64 ctx;    /* its context's data word, key in grpc_server_ctxs */
};

/* RPCs being served, by goroutine. LRU: an entry whose RET never comes (a
 * handler that panics) is pushed out; user space also expires them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct grpc_server_state);
} grpc_servers SEC(".maps");

/* The same RPCs by their stream's context, for clients called with it (or
 * a context derived from it) on any goroutine. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct go_span_ref);
} grpc_server_ctxs SEC(".maps");

/* RPCs being made, by goroutine: from Invoke or NewStream's entry to its
 * return. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct grpc_event);
} grpc_clients SEC(".maps");

/* Streams being made, by their *clientStream: from NewStream's return to
 * the stream's finish. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct grpc_event);
} streams SEC(".maps");

struct tp_key {
	__u64 transport; /* the *http2Server */
	__u32 stream_id;
	__u32 pad;
};

struct tp_val {
	__u8 trace_id[16];
	__u64 span_id;
	__u64 flags; /* GRPC_F_REMOTE_PARENT, GRPC_F_SAMPLED */
};

/* Incoming trace contexts, from the request headers to the handler. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tp_key);
	__type(value, struct tp_val);
} tps SEC(".maps");

/* Scratch space: too large for the BPF stack. */
struct scratch {
	struct grpc_server_state s;
	char obj[OBJ];
	char fields[FIELDS_MAX * FIELD_SIZE_MAX];
	char tp[GO_TP_LEN + 1];
	__u64 gen; /* fm_gen_begin/fm_gen_end */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* The programs' bodies; each program first keeps its stack its own (see
 * go_own_stack). */
static __always_inline int server_enter_(struct pt_regs *ctx);
static __always_inline int status_enter_(struct pt_regs *ctx);
static __always_inline int server_return_(struct pt_regs *ctx);
static __always_inline int headers_enter_(struct pt_regs *ctx);
static __always_inline int invoke_enter_(struct pt_regs *ctx);
static __always_inline int invoke_return_(struct pt_regs *ctx);
static __always_inline int stream_enter_(struct pt_regs *ctx);
static __always_inline int stream_return_(struct pt_regs *ctx);
static __always_inline int finish_enter_(struct pt_regs *ctx);

static __always_inline __u64 obj_u64(const char *obj, __u64 o)
{
	__u64 v;

	__builtin_memcpy(&v, obj + (o & (OBJ - 8)), sizeof(v));
	return v;
}

static __always_inline __u32 obj_u32(const char *obj, __u64 o)
{
	__u32 v;

	__builtin_memcpy(&v, obj + (o & (OBJ - 4)), sizeof(v));
	return v;
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

/* tcp_addr reads the address a net.Addr interface at addr holds when it is
 * a *net.TCPAddr: its port, and its IP into ip (flags GRPC_F_PEER4 or
 * _PEER6) when want_ip. It returns the flags, 0 when it is something else. */
static __always_inline __u32 tcp_addr(__u64 addr, __u8 ip[16], __u16 *port, bool want_ip)
{
	__u64 w[2], a[4];
	__u64 p, n;

	if (bpf_probe_read_user(w, sizeof(w), (const void *)addr) || w[0] != off.tcpaddr_itab || !w[1])
		return 0;
	/* IP (pointer, len, cap), then Port: near each other. */
	if (off.tcpaddr_ip != 0 || off.tcpaddr_port != 24)
		return 0;
	if (bpf_probe_read_user(a, sizeof(a), (const void *)w[1]))
		return 0;
	*port = a[3];
	if (!want_ip)
		return GRPC_F_LOCAL;
	p = a[0];
	n = a[1];
	if (n == 16) {
		if (bpf_probe_read_user(ip, 16, (const void *)p))
			return 0;
		/* An IPv4-mapped address: IPv4. */
		if (!ip[0] && !ip[1] && !ip[2] && !ip[3] && !ip[4] && !ip[5] && !ip[6] && !ip[7] &&
		    !ip[8] && !ip[9] && ip[10] == 0xff && ip[11] == 0xff) {
			__builtin_memcpy(ip, ip + 12, 4);
			return GRPC_F_PEER4;
		}
		return GRPC_F_PEER6;
	}
	if (n == 4 && !bpf_probe_read_user(ip, 4, (const void *)p))
		return GRPC_F_PEER4;
	return 0;
}

/* ---- server ---- */

SEC("uprobe")
int server_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return server_enter_(ctx);
}

static __always_inline int server_enter_(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct grpc_event *e;
	struct tp_val *tp;
	struct tp_key tk = {};
	__u64 key, stream, inner, t, st[2], gen, id, mp;
	__s64 ml;

	if (!sc)
		return 0;
	/* handleStream(s *Server, t ServerTransport, stream *ServerStream):
	 * RAX = s; RBX, RCX = t; RDI = stream. */
	stream = ctx->di;
	if (bpf_probe_read_user(st, sizeof(st), (const void *)(stream + off.stream_st))) {
		fm_count(GRPC_CTR_UNREADABLE);
		return 0;
	}
	if (st[0] != off.st_itab) {
		fm_count(GRPC_CTR_UNSUPPORTED);
		return 0;
	}
	t = st[1];
	gen = fm_gen_begin(&sc->gen);
	e = &sc->s.ev;
	key = go_gkey(ctx);
	inner = stream + off.stream_inner;
	if (off.stream_indirect)
		inner = go_read_u64(inner);
	if (!inner || bpf_probe_read_user(sc->obj, sizeof(sc->obj), (const void *)inner)) {
		fm_count(GRPC_CTR_UNREADABLE);
		fm_gen_end(&sc->gen, gen);
		return 0;
	}
	id = bpf_get_current_pid_tgid();
	e->start_ns = bpf_ktime_get_ns();
	e->end_ns = 0;
	e->goid = go_goid(ctx, off.goid);
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->kind = GRPC_SERVER;
	e->flags = 0;
	e->parent_kind = GRPC_PARENT_NONE;
	e->pad0 = 0;
	e->code = 0;
	e->peer_port = 0;
	e->local_port = 0;
	e->stream_id = obj_u32(sc->obj, off.stream_id);
	e->span_id = go_rand64();
	e->parent_span_id = 0;
	sc->s.stream = stream;
	sc->s.ctx = off.ctx_walk ? obj_u64(sc->obj, off.stream_ctx + 8) : 0;
	mp = obj_u64(sc->obj, off.stream_method);
	ml = obj_u64(sc->obj, off.stream_method + 8);
	e->method_len = 0;
	if (mp && ml > 0 && !bpf_probe_read_user(e->method, fm_clamp(ml, GRPC_METHOD_MAX), (const void *)mp))
		e->method_len = fm_clamp(ml, GRPC_METHOD_MAX);
	e->flags |= tcp_addr(t + off.peer_addr, e->peer_ip, &e->peer_port, true);
	if (off.local_addr != ~0ULL)
		e->flags |= tcp_addr(t + off.local_addr, e->peer_ip, &e->local_port, false);

	tk.transport = t;
	tk.stream_id = e->stream_id;
	tp = bpf_map_lookup_elem(&tps, &tk);
	if (tp) {
		__builtin_memcpy(e->trace_id, tp->trace_id, 16);
		e->parent_span_id = tp->span_id;
		e->flags |= tp->flags & (GRPC_F_REMOTE_PARENT | GRPC_F_SAMPLED);
		map_del(&tps, &tk, GRPC_CTR_TPS_DEL);
	} else {
		go_new_trace(e->trace_id);
	}
	/* The map update copies the state, then the check: an entry that was
	 * overtaken on its CPU removes its (possibly mixed) state. */
	{
		struct go_span_ref sp = { .span_id = e->span_id, .flags = e->flags & (GRPC_F_REMOTE_PARENT | GRPC_F_SAMPLED) };
		__u64 c = sc->s.ctx;

		__builtin_memcpy(sp.trace_id, e->trace_id, 16);
		map_add(&grpc_servers, &key, &sc->s, GRPC_CTR_SERVERS_ADD);
		if (!fm_gen_end(&sc->gen, gen)) {
			fm_count(GRPC_CTR_PREEMPTED);
			map_del(&grpc_servers, &key, GRPC_CTR_SERVERS_DEL);
			return 0;
		}
		if (c && off.client)
			map_add(&grpc_server_ctxs, &c, &sp, GRPC_CTR_CTXS_ADD);
	}
	return 0;
}

SEC("uprobe")
int status_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return status_enter_(ctx);
}

static __always_inline int status_enter_(struct pt_regs *ctx)
{
	__u64 key = go_gkey(ctx);
	struct grpc_server_state *s = bpf_map_lookup_elem(&grpc_servers, &key);
	__u64 spb;
	__s32 code = 0;

	/* writeStatus(t *http2Server, s *ServerStream, st *status.Status):
	 * RAX = t, RBX = s, RCX = st. The first status of the RPC's own
	 * stream. */
	if (!s || s->stream != ctx->bx || (s->ev.flags & GRPC_F_STATUS))
		return 0;
	spb = ctx->cx ? go_read_u64(ctx->cx + off.status_s) : 0;
	/* A nil *spb.Status is OK (status.Code). */
	if (spb && bpf_probe_read_user(&code, sizeof(code), (const void *)(spb + off.spb_code)))
		return 0;
	s->ev.code = code;
	s->ev.flags |= GRPC_F_STATUS;
	return 0;
}

/* See bpf/http.c's same_entry: an LRU map hands an element it evicts
 * straight to the insert that evicted it, even while another CPU reads it.
 * The return takes the element's span ID, random for each RPC, before it
 * copies the element, and checks it again once it used it. */
static __always_inline bool same_entry(const volatile __u64 *span_id, __u64 was)
{
	asm volatile("" ::: "memory");
	return *span_id == was;
}

SEC("uprobe")
int server_return(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return server_return_(ctx);
}

static __always_inline int server_return_(struct pt_regs *ctx)
{
	__u64 key = go_gkey(ctx);
	struct grpc_server_state *s = bpf_map_lookup_elem(&grpc_servers, &key);
	struct grpc_event *e;
	__u64 sid, rctx;

	if (!s)
		return 0;
	sid = s->ev.span_id;
	asm volatile("" ::: "memory");
	rctx = s->ctx;
	e = fm_reserve(sizeof(*e));
	if (e) {
		*e = s->ev;
		e->end_ns = bpf_ktime_get_ns();
		if (same_entry(&s->ev.span_id, sid) && e->span_id == sid)
			fm_submit(e, sizeof(*e));
		else
			bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
	}
	/* rctx is another RPC's if the element was handed on. */
	if (rctx && off.client && same_entry(&s->ev.span_id, sid))
		map_del(&grpc_server_ctxs, &rctx, GRPC_CTR_CTXS_DEL);
	map_del(&grpc_servers, &key, GRPC_CTR_SERVERS_DEL);
	return 0;
}

/* ---- client ---- */

/* err_code is the gRPC status code of the error interface (tab, data), as
 * status.Code gives it: OK for nil (and io.EOF, which ends a stream that
 * succeeded), the code of a *status.Error, Unknown for anything else. */
static __always_inline __s32 err_code(__u64 tab, __u64 data)
{
	__u64 st, spb;
	__s32 code = 0;

	if (!tab || data == off.eof_data)
		return 0;
	if (tab != off.err_itab || !data)
		return 2; /* codes.Unknown */
	st = go_read_u64(data + off.err_s);
	spb = st ? go_read_u64(st + off.status_s) : 0;
	if (!spb)
		return st ? 0 : 2;
	if (bpf_probe_read_user(&code, sizeof(code), (const void *)(spb + off.spb_code)))
		return 2;
	return code;
}

/* http_flags maps a served HTTP request's HTTP_F_REMOTE_PARENT and
 * HTTP_F_SAMPLED to GRPC_F_REMOTE_PARENT and GRPC_F_SAMPLED. */
static __always_inline __u64 http_flags(__u64 f)
{
	return ((f & HTTP_F_REMOTE_PARENT) ? GRPC_F_REMOTE_PARENT : 0) |
	       ((f & HTTP_F_SAMPLED) ? GRPC_F_SAMPLED : 0);
}

/* client_enter starts the event of an RPC made on ClientConn cc, for
 * method (p, n), with the context whose data word is c. */
static __always_inline int client_enter(struct pt_regs *ctx, __u64 cc, __u64 c, __u64 p, __s64 n)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct go_span_ref *ref = NULL;
	struct grpc_event *e;
	__u64 pflags = 0; /* the parent's GRPC_F_REMOTE_PARENT, _SAMPLED */
	struct gostr t;
	__u64 key = go_gkey(ctx), id, gen;

	if (!sc)
		return 0;
	gen = fm_gen_begin(&sc->gen);
	e = &sc->s.ev;
	id = bpf_get_current_pid_tgid();
	e->start_ns = bpf_ktime_get_ns();
	e->end_ns = 0;
	e->goid = go_goid(ctx, off.goid);
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->kind = GRPC_CLIENT;
	e->flags = 0;
	e->code = 0;
	e->peer_port = 0;
	e->local_port = 0;
	e->stream_id = 0;
	e->span_id = go_rand64();
	e->parent_span_id = 0;
	e->method_len = 0;
	if (p && n > 0 && !bpf_probe_read_user(e->method, fm_clamp(n, GRPC_METHOD_MAX), (const void *)p))
		e->method_len = fm_clamp(n, GRPC_METHOD_MAX);
	e->target_len = 0;
	if (cc && !bpf_probe_read_user(&t, sizeof(t), (const void *)(cc + off.cc_target)) && t.ptr && t.len > 0 &&
	    !bpf_probe_read_user(e->target, fm_clamp(t.len, TARGET_MAX), t.ptr))
		e->target_len = fm_clamp(t.len, TARGET_MAX);

	/* The parent: an RPC being served whose context the client's context
	 * is, or derives from (any goroutine); else the RPC the calling
	 * goroutine serves; else, the same of the requests served over
	 * net/http. */
	e->parent_kind = GRPC_PARENT_NONE;
	e->pad0 = 0;
	if (off.ctx_walk)
		ref = go_ctx_find(&grpc_server_ctxs, c, off.ctx_root);
	if (ref) {
		e->flags |= GRPC_F_PARENT_CTX;
		e->parent_kind = GRPC_PARENT_RPC;
		__builtin_memcpy(e->trace_id, ref->trace_id, 16);
		e->parent_span_id = ref->span_id;
		pflags = ref->flags;
	} else {
		struct grpc_server_state *s = bpf_map_lookup_elem(&grpc_servers, &key);

		if (s && s->ev.goid == e->goid) {
			e->flags |= GRPC_F_PARENT_G;
			e->parent_kind = GRPC_PARENT_RPC;
			__builtin_memcpy(e->trace_id, s->ev.trace_id, 16);
			e->parent_span_id = s->ev.span_id;
			pflags = s->ev.flags;
		}
	}
	if (e->parent_kind == GRPC_PARENT_NONE && off.http_parent) {
		struct span_ctx *hp = off.http_ctx_walk ? http_ctx_parent(c, off.http_ctx_root) : NULL;

		if (hp) {
			e->flags |= GRPC_F_PARENT_CTX;
			e->parent_kind = GRPC_PARENT_HTTP;
			__builtin_memcpy(e->trace_id, hp->trace_id, 16);
			e->parent_span_id = hp->span_id;
			pflags = http_flags(hp->flags);
		} else {
			struct server_state *hs = http_g_parent(key, e->goid);

			if (hs) {
				e->flags |= GRPC_F_PARENT_G;
				e->parent_kind = GRPC_PARENT_HTTP;
				__builtin_memcpy(e->trace_id, hs->ev.trace_id, 16);
				e->parent_span_id = hs->ev.span_id;
				pflags = http_flags(hs->ev.flags);
			}
		}
	}
	if (e->parent_kind == GRPC_PARENT_NONE)
		go_new_trace(e->trace_id);
	/* Sampled as a served HTTP request it belongs to is (see http.c,
	 * root_sampled); else unless its trace came unsampled from a remote
	 * caller. */
	if (e->parent_kind == GRPC_PARENT_HTTP ? (pflags & GRPC_F_SAMPLED) :
	    (!(pflags & GRPC_F_REMOTE_PARENT) || (pflags & GRPC_F_SAMPLED)))
		e->flags |= GRPC_F_SAMPLED;
	map_add(&grpc_clients, &key, e, GRPC_CTR_CLIENTS_ADD);
	if (!fm_gen_end(&sc->gen, gen)) {
		fm_count(GRPC_CTR_PREEMPTED);
		map_del(&grpc_clients, &key, GRPC_CTR_CLIENTS_DEL);
	}
	return 0;
}

/* client_submit sends the event of a finished RPC: s is the map's element,
 * its span ID taken as sid before (see same_entry). */
static __always_inline void client_submit(struct grpc_event *s, __u64 sid, __s32 code)
{
	struct grpc_event *e = fm_reserve(sizeof(*e));

	if (!e)
		return;
	*e = *s;
	e->end_ns = bpf_ktime_get_ns();
	e->code = code;
	e->flags |= GRPC_F_STATUS;
	if (same_entry(&s->span_id, sid) && e->span_id == sid)
		fm_submit(e, sizeof(*e));
	else
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
}

SEC("uprobe")
int invoke_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return invoke_enter_(ctx);
}

static __always_inline int invoke_enter_(struct pt_regs *ctx)
{
	/* Invoke(cc *ClientConn, ctx context.Context, method string, ...):
	 * RAX = cc; RBX, RCX = ctx; RDI, RSI = method. */
	return client_enter(ctx, ctx->ax, ctx->cx, ctx->di, ctx->si);
}

SEC("uprobe")
int invoke_return(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return invoke_return_(ctx);
}

static __always_inline int invoke_return_(struct pt_regs *ctx)
{
	__u64 key = go_gkey(ctx), sid;
	struct grpc_event *s = bpf_map_lookup_elem(&grpc_clients, &key);

	if (!s)
		return 0;
	sid = s->span_id;
	asm volatile("" ::: "memory");
	/* Results: RAX, RBX = error. */
	client_submit(s, sid, err_code(ctx->ax, ctx->bx));
	map_del(&grpc_clients, &key, GRPC_CTR_CLIENTS_DEL);
	return 0;
}

SEC("uprobe")
int stream_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return stream_enter_(ctx);
}

static __always_inline int stream_enter_(struct pt_regs *ctx)
{
	/* NewStream(cc *ClientConn, ctx context.Context, desc *StreamDesc,
	 * method string, ...): RAX = cc; RBX, RCX = ctx; RDI = desc; RSI, R8
	 * = method. */
	return client_enter(ctx, ctx->ax, ctx->cx, ctx->si, ctx->r8);
}

SEC("uprobe")
int stream_return(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return stream_return_(ctx);
}

static __always_inline int stream_return_(struct pt_regs *ctx)
{
	__u64 key = go_gkey(ctx), sid, cs, tab, w[2];
	struct grpc_event *s = bpf_map_lookup_elem(&grpc_clients, &key);

	if (!s)
		return 0;
	sid = s->span_id;
	asm volatile("" ::: "memory");
	/* Results: RAX, RBX = ClientStream; RCX, RDI = error. */
	tab = ctx->ax;
	cs = ctx->bx;
	/* Newer grpc-go (v1.85.0, not v1.83.2) returns its own stream inside
	 * a clientStreamWrapper: finish is called on the one inside. */
	if (off.cs_wrap_itab && tab == off.cs_wrap_itab && cs) {
		if (bpf_probe_read_user(w, sizeof(w), (const void *)(cs + off.cs_wrap_inner)))
			w[0] = w[1] = 0;
		tab = w[0];
		cs = w[1];
	}
	if (ctx->cx) {
		/* Failed to start: the span ends here. */
		client_submit(s, sid, err_code(ctx->cx, ctx->di));
	} else if (tab == off.cs_itab && cs) {
		/* It ends at the stream's finish, on whatever goroutine. */
		if (!bpf_map_update_elem(&streams, &cs, s, BPF_ANY)) {
			fm_count(GRPC_CTR_STREAMS_ADD);
			if (!same_entry(&s->span_id, sid))
				map_del(&streams, &cs, GRPC_CTR_STREAMS_DEL);
		}
	} else {
		fm_count(GRPC_CTR_STREAM_WRAPPED);
	}
	map_del(&grpc_clients, &key, GRPC_CTR_CLIENTS_DEL);
	return 0;
}

SEC("uprobe")
int finish_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return finish_enter_(ctx);
}

static __always_inline int finish_enter_(struct pt_regs *ctx)
{
	/* finish(cs *clientStream, err error): RAX = cs; RBX, RCX = err. The
	 * first call is the one that counts (later ones return at once);
	 * unary RPCs' streams are not in the map. */
	__u64 cs = ctx->ax, sid;
	struct grpc_event *s = bpf_map_lookup_elem(&streams, &cs);

	if (!s)
		return 0;
	sid = s->span_id;
	asm volatile("" ::: "memory");
	client_submit(s, sid, err_code(ctx->bx, ctx->cx));
	map_del(&streams, &cs, GRPC_CTR_STREAMS_DEL);
	return 0;
}

/* ---- incoming trace context ---- */

SEC("uprobe")
int headers_enter(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	return headers_enter_(ctx);
}

static __always_inline int headers_enter_(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct tp_key tk = {};
	struct tp_val tv = {};
	__u64 w[4], fp, n, gen, fs = off.field_size;
	int sampled;

	if (!sc || fs == 0 || fs > FIELD_SIZE_MAX)
		return 0;
	/* operateHeaders(t *http2Server, ctx context.Context, frame
	 * *http2.MetaHeadersFrame, ...): RAX = t; RBX, RCX = ctx; RDI = frame. */
	if (off.meta_headers != 0 || off.meta_fields != 8)
		return 0;
	if (bpf_probe_read_user(w, sizeof(w), (const void *)ctx->di))
		return 0;
	fp = w[1];
	n = w[2];
	if (!w[0] || !fp || (__s64)n <= 0)
		return 0;
	if (n > FIELDS_MAX)
		n = FIELDS_MAX;
	gen = fm_gen_begin(&sc->gen);
	if (bpf_probe_read_user(sc->fields, fm_clamp(n * fs, FIELDS_MAX * FIELD_SIZE_MAX), (const void *)fp)) {
		fm_gen_end(&sc->gen, gen);
		return 0;
	}
	for (__u32 k = 0; k < FIELDS_MAX; k++) {
		__u64 o = k * fs, np, nl, vp, vl;
		__u64 name[2] = {};

		if (k >= n)
			break;
		__builtin_memcpy(&nl, sc->fields + ((o + off.field_name + 8) & (FIELDS_MAX * FIELD_SIZE_MAX - 8)), 8);
		if (nl != 11)
			continue;
		__builtin_memcpy(&np, sc->fields + ((o + off.field_name) & (FIELDS_MAX * FIELD_SIZE_MAX - 8)), 8);
		if (bpf_probe_read_user(name, 11, (const void *)np))
			continue;
		/* "traceparent", little-endian: "tracepar" and "ent". */
		if (name[0] != 0x7261706563617274ULL || name[1] != 0x746e65ULL)
			continue;
		__builtin_memcpy(&vp, sc->fields + ((o + off.field_value) & (FIELDS_MAX * FIELD_SIZE_MAX - 8)), 8);
		__builtin_memcpy(&vl, sc->fields + ((o + off.field_value + 8) & (FIELDS_MAX * FIELD_SIZE_MAX - 8)), 8);
		/* Version 00 is exactly 55 bytes; a later version may add. */
		if (vl < GO_TP_LEN ||
		    bpf_probe_read_user(sc->tp, GO_TP_LEN, (const void *)vp)) {
			fm_count(GRPC_CTR_TP_BAD);
			break;
		}
		if (vl > GO_TP_LEN && sc->tp[0] == '0' && sc->tp[1] == '0') {
			fm_count(GRPC_CTR_TP_BAD);
			break;
		}
		sampled = go_parse_traceparent(sc->tp, tv.trace_id, &tv.span_id);
		if (sampled < 0) {
			fm_count(GRPC_CTR_TP_BAD);
			break;
		}
		tv.flags = GRPC_F_REMOTE_PARENT | (sampled ? GRPC_F_SAMPLED : 0);
		if (!fm_gen_end(&sc->gen, gen))
			return 0;
		tk.transport = ctx->ax;
		tk.stream_id = go_read_u64(w[0] + off.frame_stream_id) & 0xffffffff;
		map_add(&tps, &tk, &tv, GRPC_CTR_TPS_ADD);
		return 0;
	}
	fm_gen_end(&sc->gen, gen);
	return 0;
}
