/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Helpers for uprobes on Go functions of the calling program (Go
 * ABIInternal on amd64: arguments in RAX, RBX, RCX, RDI, RSI, R8..R11; the
 * current goroutine's g in R14), shared by the families that probe Go code.
 */
#ifndef __FLOWMILL_GOPROBE_H__
#define __FLOWMILL_GOPROBE_H__

#include "flowmill.h"

#include "ownstack.h"

struct gostr {
	const char *ptr;
	__s64 len;
};

static __always_inline __u64 go_read_u64(__u64 addr)
{
	__u64 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

/* go_gkey is the current goroutine's g (R14): the key of state kept
 * between a function's entry and its returns. A g is reused after its
 * goroutine exits, but a return always follows its own entry on the same
 * goroutine, which overwrites any entry a dead goroutine left. */
static __always_inline __u64 go_gkey(struct pt_regs *ctx)
{
	return ctx->r14;
}

/* go_goid reads the goroutine ID at offset off of g (~0: unknown), which,
 * unlike g, is never reused. */
static __always_inline __u64 go_goid(struct pt_regs *ctx, __u64 off)
{
	if (off == ~0ULL)
		return 0;
	return go_read_u64(ctx->r14 + off);
}

/* go_rand64 is a random non-zero 64-bit ID (span IDs; W3C Trace Context
 * asks for random trace IDs). */
static __always_inline __u64 go_rand64(void)
{
	__u64 v = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();

	return v ? v : 1;
}

static __always_inline void go_new_trace(__u8 id[16])
{
	__u64 a = go_rand64(), b = go_rand64();

	__builtin_memcpy(id, &a, 8);
	__builtin_memcpy(id + 8, &b, 8);
}

static __always_inline int go_hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	return -1;
}

#define GO_TP_LEN 55 /* 00-<32 hex>-<16 hex>-<2 hex> */

/* go_parse_traceparent parses a W3C traceparent value of exactly
 * GO_TP_LEN bytes at v (a value of version 00, or of a later version cut
 * to its first fields). It returns -1 when it is not valid, else its
 * sampled flag (0 or 1), with the trace and parent span IDs (the latter as
 * the number its hex spells). */
static __always_inline int go_parse_traceparent(const char v[GO_TP_LEN], __u8 trace_id[16], __u64 *span)
{
	__u64 s = 0, any = 0;
	int hi, lo;

	if (v[0] == 'f' && v[1] == 'f')
		return -1;
	if (go_hexval(v[0]) < 0 || go_hexval(v[1]) < 0 || v[2] != '-' || v[35] != '-' || v[52] != '-')
		return -1;
#pragma unroll
	for (int k = 0; k < 16; k++) {
		hi = go_hexval(v[3 + 2 * k]);
		lo = go_hexval(v[4 + 2 * k]);
		if (hi < 0 || lo < 0)
			return -1;
		trace_id[k] = hi << 4 | lo;
		any |= trace_id[k];
	}
#pragma unroll
	for (int k = 0; k < 16; k++) {
		hi = go_hexval(v[36 + k]);
		if (hi < 0)
			return -1;
		s = s << 4 | hi;
	}
	hi = go_hexval(v[53]);
	lo = go_hexval(v[54]);
	if (!any || !s || hi < 0 || lo < 0)
		return -1;
	*span = s;
	return lo & 1;
}

/* A span a context.Context leads to: a served request's or RPC's, kept by
 * the data word of its context. */
struct go_span_ref {
	__u8 trace_id[16];
	__u64 span_id;
	__u64 flags; /* the family's own */
};

#define GO_CTX_DEPTH 12 /* context.Context parents followed */

/* go_ctx_find walks the chain of contexts from the one whose data word is
 * c, up to GO_CTX_DEPTH parents or root (the data word of
 * context.Background), and returns the first one found in map (keyed by
 * data word, values struct go_span_ref), or NULL. It relies on what user
 * space checks before it enables the walk: every context type of the
 * standard library keeps its parent Context as its first field, so the
 * parent's data word is at +8. */
static __always_inline struct go_span_ref *go_ctx_find(void *map, __u64 c, __u64 root)
{
	for (int i = 0; i < GO_CTX_DEPTH && c && c != root; i++) {
		struct go_span_ref *p = bpf_map_lookup_elem(map, &c);

		if (p)
			return p;
		c = go_read_u64(c + 8);
	}
	return NULL;
}

#endif /* __FLOWMILL_GOPROBE_H__ */
