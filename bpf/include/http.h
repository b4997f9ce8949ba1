/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What the HTTP family's two objects share: http.c (the uprobes on the Go
 * program: spans, and what each outgoing request should carry) and
 * propagate.c (the socket programs that put it into the request's bytes).
 * Both objects declare the maps below; user space loads propagate.c first
 * and hands its maps to http.c (cilium/ebpf MapReplacements), so both work
 * on the same ones.
 */
#ifndef __FLOWMILL_HTTP_H__
#define __FLOWMILL_HTTP_H__

#include "flowmill.h"

#define METHOD_MAX 16
#define HOST_MAX 64
#define PEER_MAX 48
#define PATH_MAX_ 128
#define ROUTE_MAX 128
#define TS_MAX 512 /* tracestate value passed on, at most (W3C asks for 512) */

enum http_kind {
	HTTP_SERVER = 1,
	HTTP_CLIENT = 2,
};

enum http_flags {
	HTTP_F_REMOTE_PARENT = 1 << 0, /* parent from a traceparent header */
	/* Server: the incoming traceparent's sampled flag, or, for a trace
	 * flowmill started, whether it sampled it (http.c, root_sampled).
	 * Client: the sampled flag it propagates (its parent's, or its own
	 * decision when it has none). */
	HTTP_F_SAMPLED = 1 << 1,
	HTTP_F_PARENT_CTX = 1 << 2,    /* client: parent found via the request context */
	HTTP_F_PARENT_G = 1 << 3,      /* client: parent found via the goroutine */
	HTTP_F_HIJACKED = 1 << 4,      /* server: the handler hijacked the connection */
	/* method[] / route[] hold the address (8 bytes) of the string in the
	 * executable's read-only data instead of its bytes; *_len its length. */
	HTTP_F_METHOD_RO = 1 << 5,
	HTTP_F_ROUTE_RO = 1 << 6,
	/* Server: it came with a tracestate, kept in tracestates under its
	 * span ID. Client: its parent did (the key is its parent span ID). */
	HTTP_F_TRACESTATE = 1 << 7,
};

/* url.scheme: http_event.scheme. */
enum http_scheme {
	SCHEME_UNKNOWN = 0,
	SCHEME_HTTP = 1,
	SCHEME_HTTPS = 2,
};

/* What became of a client request's trace context: http_event.prop. */
enum http_prop {
	PROP_NONE = 0,        /* not attempted (propagation off, never on a connection) */
	PROP_PENDING = 1,     /* waiting for the request's first write */
	PROP_INJECTED = 2,    /* traceparent (and tracestate) added */
	PROP_PRESENT = 3,     /* the request had a traceparent: left as it was */
	PROP_TLS = 4,         /* over TLS: the kernel sees encrypted bytes */
	PROP_HTTP2 = 5,       /* not sent over an HTTP/1 connection (HTTP/2) */
	PROP_CONN = 6,        /* over a net.Conn that is neither *net.TCPConn nor *tls.Conn */
	PROP_UNTRACKED = 7,   /* its connection is not one the probe tracks */
	PROP_TOO_LARGE = 8,   /* its header did not end within its first write's 4 KiB */
	PROP_NOT_HTTP1 = 9,   /* its first write was not an HTTP/1 request line */
	PROP_FAILED = 10,     /* a kernel table was full or an operation failed */
	PROP_UNAVAILABLE = 11,/* propagation could not be set up (see Status) */
};

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
	__u8 prop;         /* client: enum http_prop */
	__u16 path_len;
	__u16 route_len;
	__u8 proto_major;  /* HTTP version: Request.ProtoMajor (server), */
	__u8 proto_minor;  /*   Response.ProtoMajor/Minor (client); 0 unknown */
	__u8 scheme;       /* enum http_scheme */
	__u8 pad2;
	char method[METHOD_MAX];
	char host[HOST_MAX];
	char peer[PEER_MAX];
	char path[PATH_MAX_];
	char route[ROUTE_MAX];
};

/* Requests being sent, by goroutine (its g). propagate.c writes the
 * outcome of the request's first write into its prop. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct http_event);
} clients SEC(".maps");

/* A TCP connection's addresses as the socket programs see them: the key
 * of the sockhash and of inject. IPv4 addresses in the first 4 bytes. */
struct sock_tuple {
	__u32 family;
	__u16 lport; /* host byte order */
	__u16 rport; /* host byte order */
	__u8 laddr[16];
	__u8 raddr[16];
};

enum sock_track {
	SOCK_CONNECTING = 1, /* connect() called by this process */
	SOCK_TRACKED = 2,    /* established and in the sockhash */
	SOCK_FAILED = 3,     /* established, but the sockhash refused it */
};

struct sock_state {
	struct sock_tuple t; /* set once established */
	__u32 state;         /* enum sock_track */
	__u32 pad;
};

/* This process's outgoing TCP sockets, by struct sock address: from
 * connect() to close. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct sock_state);
} socks SEC(".maps");

/* "traceparent: 00-<32 hex>-<16 hex>-<2 hex>\r\n" */
#define TP_HDR_LEN 70

/* What the next request written on a connection carries: set by the
 * uprobe on persistConn.roundTrip (the caller's goroutine, after the
 * connection is chosen, before its writeLoop writes the request), taken by
 * the sk_msg program at that write. */
struct inject_req {
	__u64 g;         /* the client request's key in clients */
	__u64 span_id;   /* the client request's span: the traceparent's parent ID */
	__u64 ts_span;   /* key in tracestates of the tracestate to pass on, 0: none */
	__u64 start_ns;  /* when it was made (stale entries are swept) */
	char tp[TP_HDR_LEN + 2];
};

/* By connection (a plain hash: an update fails when full, rather than push
 * another request's entry out unseen). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sock_tuple);
	__type(value, struct inject_req);
} inject SEC(".maps");

struct tracestate {
	__u32 len;
	__u32 pad;
	char v[TS_MAX];
};

/* Incoming tracestate values, by the span ID of the served request that
 * carried one, while it is served. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2048);
	__type(key, __u64);
	__type(value, struct tracestate);
} tracestates SEC(".maps");

/* http_name_is reports whether the bytes of b (a buffer of mask + 1
 * bytes, a power of two) from i are the header name (and colon) name, a
 * string literal given in lower case: header names are case-insensitive. A
 * byte matches its letter in either case (| 0x20); the only other bytes
 * that can match a letter or ':' are control characters, which a header
 * name cannot hold. A macro, so that the loop's bound is a constant. */
#define http_name_is(b, mask, i, name)                                        \
	({                                                                    \
		bool _ok = true;                                              \
		_Pragma("unroll") for (int _k = 0; _k < (int)sizeof(name) - 1; _k++) { \
			if (((b)[((i) + _k) & (mask)] | 0x20) != (name)[_k]) { \
				_ok = false;                                  \
				break;                                        \
			}                                                     \
		}                                                             \
		_ok;                                                          \
	})

/* Keep the types in the objects' BTF for bpf2go -type. */
const struct http_event *unused_http_event __attribute__((unused));
const struct inject_req *unused_inject_req __attribute__((unused));
const struct sock_state *unused_sock_state __attribute__((unused));

#endif /* __FLOWMILL_HTTP_H__ */
