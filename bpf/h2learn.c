//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Attach-time learning of where net/http's HTTP/2 server keeps a request's
 * decoded header fields (MetaHeadersFrame.Fields), a type the program's
 * reflect data cannot reach. Loaded only while the HTTP probe attaches:
 * one uprobe at the entry of newWriterAndRequest(sc, st, f) copies the
 * first words of *f and, for each word, the bytes it points to. User space
 * serves one in-memory request with known traceparent and tracestate
 * values and finds, in these copies, the slice whose elements hold exactly
 * those strings (see layout.go): the offset of Fields, verified on the
 * program's own data.
 */
#include "goprobe.h"

#define LEARN_WORDS 8   /* words of *f copied */
#define LEARN_SPAN 512  /* bytes copied from where each points */

struct h2_learn_rec {
	__u64 st; /* the stream */
	__u64 frame[LEARN_WORDS];
	__u8 at[LEARN_WORDS][LEARN_SPAN];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_learn_rec);
} learn_scratch SEC(".maps");

/* By frame address. LRU: other HTTP/2 requests the program serves
 * meanwhile push out older records, never the newest (the learning
 * request's, read at once). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, struct h2_learn_rec);
} learned SEC(".maps");

const struct h2_learn_rec *unused_h2_learn_rec __attribute__((unused));

SEC("uprobe")
int h2_learn(struct pt_regs *ctx)
{
	go_own_stack(ctx);
	__u32 zero = 0;
	struct h2_learn_rec *l = bpf_map_lookup_elem(&learn_scratch, &zero);
	__u64 f = ctx->cx;

	if (!l || !f)
		return 0;
	l->st = ctx->bx;
	if (bpf_probe_read_user(l->frame, sizeof(l->frame), (const void *)f))
		return 0;
#pragma unroll
	for (int k = 0; k < LEARN_WORDS; k++) {
		/* Zeroed by the helper when it is no readable pointer. */
		bpf_probe_read_user(l->at[k], LEARN_SPAN, (const void *)l->frame[k]);
	}
	bpf_map_update_elem(&learned, &f, l, BPF_ANY);
	return 0;
}
