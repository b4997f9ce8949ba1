//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * database/sql client spans of the calling Go program, from uprobes on its
 * own executable. Every statement the program runs goes through one of:
 *
 *   database/sql.(*DB).queryDC       Query, QueryRow (DB, Conn, Tx), with
 *                                    or without a context
 *   database/sql.(*DB).execDC        Exec (DB, Conn, Tx)
 *   database/sql.(*Stmt).QueryContext prepared statements (and Query,
 *                                    QueryRow, QueryRowContext on them)
 *   database/sql.(*Stmt).ExecContext  (and Exec on them)
 *
 * Each has one probe after its stack check (see goexe) and one on every
 * RET: two hits per statement. No uretprobes: they corrupt Go stacks. None
 * calls another of them, so state between entry and return is kept per
 * goroutine (its g, R14), as in http.c.
 *
 * Go ABIInternal on amd64: arguments and results in RAX, RBX, RCX, RDI,
 * RSI, R8..R11.
 *
 *   queryDC(db, ctx, txctx, dc, releaseConn, query, args) (*Rows, error)
 *     RAX db, RBX:RCX ctx, RDI:RSI txctx, R8 dc, R9 releaseConn,
 *     R10:R11 query; results RAX, RBX:RCX error
 *   execDC(db, ctx, dc, release, query, args) (Result, error)
 *     RAX db, RBX:RCX ctx, RDI dc, RSI release, R8:R9 query;
 *     results RAX:RBX Result, RCX:RDI error
 *   (*Stmt).QueryContext(s, ctx, args) (*Rows, error): RAX s, RBX:RCX ctx;
 *     results RAX, RBX:RCX error
 *   (*Stmt).ExecContext(s, ctx, args) (Result, error): RAX s, RBX:RCX ctx;
 *     results RAX:RBX, RCX:RDI error
 *
 * The statement's text is copied (at most QUERY_MAX bytes) as it is: user
 * space replaces its literals before anything leaves the process. The
 * driver is named by the itab of the connection's driver.Conn
 * (driverConn.ci), which user space resolves to its Go type. A statement
 * run with a served request's context, or on the goroutine serving one, is
 * its child (http_server.h).
 *
 * Struct field offsets come from the types compiled into the very program
 * (reflect, unsafe.Offsetof), set in "off" before loading.
 */
#include "http_server.h"
#include "ownstack.h"

#define QUERY_MAX 1024
#define STMT_READ 256 /* bytes of a database/sql.Stmt read at once (a power of two) */

/* Family counters (see FM_CTR_FAMILY). */
enum {
	SQL_CTR_STMTS_ADD = FM_CTR_FAMILY,
	SQL_CTR_STMTS_DEL,
	SQL_CTR_PREEMPTED, /* a statement not traced: its entry was overtaken */
	SQL_CTR_FULL,      /* a statement not traced: stmts refused its entry */
	/* A return without its entry: the statement's entry was overtaken,
	 * refused, evicted or swept, or its hit skipped by the kernel. */
	SQL_CTR_ORPHAN,
	/* A statement not traced: its record was dropped at its return (its
	 * entry was handed on by the LRU while read). */
	SQL_CTR_DISCARDED,
};

enum sql_kind {
	SQL_QUERY = 1, /* queryDC */
	SQL_EXEC = 2,  /* execDC */
	SQL_STMT_QUERY = 3,
	SQL_STMT_EXEC = 4,
};

enum sql_flags {
	SQL_F_PARENT_CTX = 1 << 0, /* parent found via the statement's context */
	SQL_F_PARENT_G = 1 << 1,   /* parent found via the goroutine */
	SQL_F_SAMPLED = 1 << 2,    /* the parent's trace is sampled (or new) */
	SQL_F_REMOTE_PARENT = 1 << 3, /* the parent's trace came from a traceparent */
	/* query[] holds the address (8 bytes) of the statement's text in the
	 * executable's read-only data instead of its bytes. */
	SQL_F_QUERY_RO = 1 << 4,
	SQL_F_QUERY_UNREAD = 1 << 5, /* the text could not be read */
};

struct sql_event {
	__u64 start_ns;
	__u64 end_ns;
	__u64 goid;
	__u64 span_id;
	__u64 parent_span_id;
	__u8 trace_id[16];
	__u64 err_itab;  /* itab of the error returned, 0 if none */
	__u64 conn_itab; /* itab of the connection's driver.Conn, 0 unknown */
	__u32 pid;
	__u32 tid;
	__u32 query_len; /* the statement's length (more than copied: truncated) */
	__u8 kind;
	__u8 flags;
	__u16 pad;
	char query[QUERY_MAX];
};

/* Field offsets of the program's own database/sql and runtime types. */
struct sql_offsets {
	__u64 goid;        /* runtime.g.goid; ~0: none known */
	__u64 dc_ci;       /* sql.driverConn.ci (driver.Conn) */
	__u64 stmt_query;  /* sql.Stmt.query (string) */
	__u64 stmt_css;    /* sql.Stmt.css ([]connStmt) */
	__u64 stmt_cgds;   /* sql.Stmt.cgds (*driverStmt) */
	__u64 cs_dc;       /* sql.connStmt.dc (*driverConn) */
	__u64 ds_locker;   /* sql.driverStmt.Locker (sync.Locker: the *driverConn) */
	__u64 ctx_root;    /* data word of context.Background() (http_server.h) */
	__u64 ctx_walk;    /* 1: contexts may be walked to a served request */
	__u64 ro_lo;       /* the executable's read-only mappings: */
	__u64 ro_hi;       /*   [ro_lo, ro_hi), 0 if unknown */
};

volatile const struct sql_offsets off = {};

/* Statements being run, by goroutine (its g). LRU: entries whose RET
 * never comes (a panic) are pushed out; user space also expires them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct sql_event);
} stmts SEC(".maps");

struct scratch {
	struct sql_event ev;
	char stmt[STMT_READ + 8];
	__u64 gen; /* fm_gen_begin/fm_gen_end */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* Keep the types in the object's BTF for bpf2go -type. */
const struct sql_event *unused_sql_event __attribute__((unused));
const struct sql_offsets *unused_sql_offsets __attribute__((unused));

static __always_inline __u64 read_u64(__u64 addr)
{
	__u64 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

static __always_inline __u64 rand64(void)
{
	__u64 v = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();

	return v ? v : 1;
}

static __always_inline __u64 stmt_u64(const char *b, __u64 o)
{
	__u64 v;

	__builtin_memcpy(&v, b + (o & (STMT_READ - 1)), sizeof(v));
	return v;
}

/* enter records the start of a statement on this goroutine: kind, the
 * request context's data word, the driverConn (0: unknown, for a Stmt:
 * found from the Stmt) and the statement's text (0, 0: from the Stmt). */
static __always_inline int enter(struct pt_regs *ctx, __u8 kind, __u64 rctx, __u64 dc,
				 __u64 qp, __s64 ql, __u64 stmt)
{
	go_own_stack(ctx);
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct sql_event *e;
	struct span_ctx *p = NULL;
	__u64 key = ctx->r14, gen;
	__u8 pflags = 0;

	if (!sc)
		return 0;
	gen = fm_gen_begin(&sc->gen);
	e = &sc->ev;
	e->kind = kind;
	e->flags = 0;
	e->pad = 0;
	e->err_itab = 0;
	e->end_ns = 0;
	{
		__u64 id = bpf_get_current_pid_tgid();

		e->pid = id >> 32;
		e->tid = (__u32)id;
	}
	e->goid = off.goid == ~0ULL ? 0 : read_u64(key + off.goid);
	if (stmt && !bpf_probe_read_user(sc->stmt, STMT_READ, (const void *)stmt)) {
		__u64 css = stmt_u64(sc->stmt, off.stmt_css);
		__s64 ncss = stmt_u64(sc->stmt, off.stmt_css + 8);
		__u64 cgds = stmt_u64(sc->stmt, off.stmt_cgds);

		qp = stmt_u64(sc->stmt, off.stmt_query);
		ql = stmt_u64(sc->stmt, off.stmt_query + 8);
		/* The connection it was prepared on: a transaction's, or
		 * the first of those it is prepared on (one driver per DB). */
		if (cgds)
			dc = read_u64(cgds + off.ds_locker + 8);
		else if (css && ncss > 0)
			dc = read_u64(css + off.cs_dc);
	}
	e->conn_itab = dc ? read_u64(dc + off.dc_ci) : 0;
	e->query_len = ql > 0 ? (ql > 0xffffffff ? 0xffffffff : ql) : 0;
	/* Statements are usually constants, in the executable's read-only
	 * data: passed by address (a page of it not yet faulted in cannot be
	 * read here at all). */
	if (qp && ql > 0 && off.ro_lo && qp >= off.ro_lo && qp + ql <= off.ro_hi && qp + ql > qp) {
		__builtin_memcpy(e->query, &qp, sizeof(qp));
		e->flags |= SQL_F_QUERY_RO;
	} else if (qp && ql > 0 &&
		   bpf_probe_read_user(e->query, fm_clamp(ql, QUERY_MAX), (const void *)qp)) {
		e->query_len = 0;
		e->flags |= SQL_F_QUERY_UNREAD;
	}
	e->span_id = rand64();
	e->parent_span_id = 0;
	if (off.ctx_walk && rctx) {
		p = http_ctx_parent(rctx, off.ctx_root);
		if (p) {
			e->flags |= SQL_F_PARENT_CTX;
			__builtin_memcpy(e->trace_id, p->trace_id, 16);
			e->parent_span_id = p->span_id;
			pflags = p->flags;
		}
	}
	if (!p) {
		struct server_state *s = http_g_parent(key, e->goid);

		if (s) {
			e->flags |= SQL_F_PARENT_G;
			__builtin_memcpy(e->trace_id, s->ev.trace_id, 16);
			e->parent_span_id = s->ev.span_id;
			pflags = s->ev.flags;
		} else {
			__u64 a = rand64(), b = rand64();

			__builtin_memcpy(e->trace_id, &a, 8);
			__builtin_memcpy(e->trace_id + 8, &b, 8);
		}
	}
	/* Sampled as its parent, the served request, is (see http.c,
	 * root_sampled); without one, the SDK's sampler decides. */
	if (!e->parent_span_id || (pflags & HTTP_F_SAMPLED))
		e->flags |= SQL_F_SAMPLED;
	if (pflags & HTTP_F_REMOTE_PARENT)
		e->flags |= SQL_F_REMOTE_PARENT;
	e->start_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&stmts, &key, e, BPF_ANY)) {
		fm_count(SQL_CTR_FULL);
		fm_gen_end(&sc->gen, gen);
		return 0;
	}
	fm_count(SQL_CTR_STMTS_ADD);
	/* The map update copied the state: if another task used the scratch
	 * space meanwhile, what was copied may be mixed. */
	if (!fm_gen_end(&sc->gen, gen)) {
		fm_count(SQL_CTR_PREEMPTED);
		if (!bpf_map_delete_elem(&stmts, &key))
			fm_count(SQL_CTR_STMTS_DEL);
	}
	return 0;
}

SEC("uprobe")
int query_enter(struct pt_regs *ctx)
{
	return enter(ctx, SQL_QUERY, ctx->cx, ctx->r8, ctx->r10, ctx->r11, 0);
}

SEC("uprobe")
int exec_enter(struct pt_regs *ctx)
{
	return enter(ctx, SQL_EXEC, ctx->cx, ctx->di, ctx->r8, ctx->r9, 0);
}

SEC("uprobe")
int stmt_query_enter(struct pt_regs *ctx)
{
	return enter(ctx, SQL_STMT_QUERY, ctx->cx, 0, 0, 0, ctx->ax);
}

SEC("uprobe")
int stmt_exec_enter(struct pt_regs *ctx)
{
	return enter(ctx, SQL_STMT_EXEC, ctx->cx, 0, 0, 0, ctx->ax);
}

/* ret reports the statement of this goroutine; err is the itab of the
 * error returned. */
static __always_inline int ret(struct pt_regs *ctx, __u64 err)
{
	go_own_stack(ctx);
	__u64 key = ctx->r14, sid;
	struct sql_event *s = bpf_map_lookup_elem(&stmts, &key);
	struct sql_event *e;

	if (!s) {
		fm_count(SQL_CTR_ORPHAN);
		return 0;
	}
	/* An LRU map may hand the element to another insert while it is read
	 * (see http.c, same_entry): the span ID, random, tells. */
	sid = s->span_id;
	asm volatile("" ::: "memory");
	e = fm_reserve(sizeof(*e));
	if (e) {
		if (bpf_probe_read_kernel(e, sizeof(*e), s)) {
			bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
			fm_count(SQL_CTR_DISCARDED);
		} else {
			e->end_ns = bpf_ktime_get_ns();
			e->err_itab = err;
			asm volatile("" ::: "memory");
			if (*(volatile __u64 *)&s->span_id == sid && e->span_id == sid) {
				fm_submit(e, sizeof(*e));
			} else {
				bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
				fm_count(SQL_CTR_DISCARDED);
			}
		}
	}
	if (!bpf_map_delete_elem(&stmts, &key))
		fm_count(SQL_CTR_STMTS_DEL);
	return 0;
}

/* queryDC and Stmt.QueryContext: (*Rows, error): the error's itab in RBX. */
SEC("uprobe")
int ret_bx(struct pt_regs *ctx)
{
	return ret(ctx, ctx->bx);
}

/* execDC and Stmt.ExecContext: (Result, error): the error's itab in RCX. */
SEC("uprobe")
int ret_cx(struct pt_regs *ctx)
{
	return ret(ctx, ctx->cx);
}
