/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The requests the HTTP family's server probe is serving, as other
 * families' objects see them: the maps http.c fills (servers, by
 * goroutine; server_ctxs, by request context) and how a call made on a
 * goroutine, or with a context, finds the served request it belongs to.
 *
 * An object of another family that includes this header declares the same
 * maps; user space hands it the HTTP family's (cilium/ebpf
 * MapReplacements, through the session's probe.HTTPServers service), so
 * that it reads what http.c writes. Without the HTTP family its copies
 * stay empty and nothing has a parent.
 */
#ifndef __FLOWMILL_HTTP_SERVER_H__
#define __FLOWMILL_HTTP_SERVER_H__

#include "http.h"

#define HTTP_CTX_DEPTH 8 /* context.Context parents followed */

struct server_state {
	struct http_event ev;
	__u64 req;
	__u64 resp;
	__u64 ctx; /* the request context's data pointer */
	__u64 h2;  /* served over HTTP/2: resp is the writer's state */
};

struct span_ctx {
	__u8 trace_id[16];
	__u64 span_id;
	__u8 flags; /* the served request's HTTP_F_REMOTE_PARENT, _SAMPLED, _TRACESTATE */
	__u8 pad[7];
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

/* http_ctx_parent returns the served request whose context c (the data
 * word of a context.Context) is, or derives from, or NULL. root is the
 * data word of context.Background() (the walk stops there). Every std
 * Context embeds its parent as its first field: the interface's data word
 * is at +8. */
static __always_inline struct span_ctx *http_ctx_parent(__u64 c, __u64 root)
{
	for (int i = 0; i < HTTP_CTX_DEPTH && c && c != root; i++) {
		struct span_ctx *p = bpf_map_lookup_elem(&server_ctxs, &c);

		if (p)
			return p;
		if (bpf_probe_read_user(&c, sizeof(c), (const void *)(c + 8)))
			return NULL;
	}
	return NULL;
}

/* http_g_parent returns the request the goroutine g (its ID goid) is
 * serving, or NULL. g is reused; without a goroutine ID, 0 == 0 and the g
 * alone decides. */
static __always_inline struct server_state *http_g_parent(__u64 g, __u64 goid)
{
	struct server_state *s = bpf_map_lookup_elem(&servers, &g);

	return s && s->ev.goid == goid ? s : NULL;
}

#endif /* __FLOWMILL_HTTP_SERVER_H__ */
