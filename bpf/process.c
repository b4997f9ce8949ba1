//go:build ignore

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Process lifecycle: fork, exec and exit of the processes in scope.
 *
 * Only stable raw tracepoints are used (no kprobes, no fentry):
 *   sched_process_fork  a new process (new threads are ignored); in process
 *                       scope, the child joins the tracked tree
 *   sched_process_exec  a successful execve: filename and argv
 *   sched_process_exit  the last thread of a process exits (see
 *                       pt_group_left in proctree.h): its wait status and
 *                       lifetime
 *
 * Events follow the process rate, one record per hook hit in scope. Exec
 * records are variable-sized: the filename and the argv bytes actually read
 * follow the fixed header, so a short command line costs a short record.
 */
#include "flowmill.h"
#include "proctree.h"

/* Family counters (see FM_CTR_FAMILY). */
enum {
	PROC_CTR_TRACK_FULL = FM_CTR_FAMILY, /* a child not followed: tracked map full */
};

enum proc_event_kind {
	PROC_EVENT_EXEC = 1,
	PROC_EVENT_EXIT = 2,
	PROC_EVENT_FORK = 3,
};

#define EXEC_FILENAME_MAX 512
#define EXEC_ARGS_MAX 4096

struct proc_event {
	__u64 ts_ns;     /* CLOCK_MONOTONIC */
	__u64 start_ns;  /* CLOCK_MONOTONIC start of the process (fork: of the child) */
	__u64 cgroup_id;
	__u32 pid;       /* thread group ID (fork: the parent's) */
	__u32 tid;       /* exec: the thread that called execve; otherwise the current thread */
	__u32 ppid;      /* thread group ID of the real parent */
	__u32 uid;
	__u32 gid;
	__u32 exit_code; /* exit: the wait status (exit status << 8 | signal) */
	__u32 child_pid; /* fork: the child's thread group ID */
	__u8 kind;
	__u8 pad[3];
	char comm[16];
};

struct exec_event {
	struct proc_event hdr;
	__u32 argc;         /* the real argument count */
	__u16 filename_len; /* bytes of data holding the filename, with its NUL */
	__u16 args_len;     /* bytes of data after the filename holding argv */
	__u8 args_truncated;
	__u8 pad[7];
	/* filename, then the NUL-separated argv; only the bytes used are sent */
	char data[EXEC_FILENAME_MAX + EXEC_ARGS_MAX];
};

/* Exec records are too large for the BPF stack: built here, then copied. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exec_event);
} exec_scratch SEC(".maps");

/* Keep the event types in the object's BTF for bpf2go -type. */
const struct proc_event *unused_proc_event __attribute__((unused));
const struct exec_event *unused_exec_event __attribute__((unused));

/* output copies a record into the ring buffer, waking the reader only when
 * this record makes the unread data cross fm_wakeup_bytes (as fm_submit
 * does for reserved records). */
static __always_inline void output(void *data, __u64 size)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 rec = ((size + 7) & ~7ULL) + 8; /* record plus its header */
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (avail < fm_wakeup_bytes && avail + rec >= fm_wakeup_bytes)
		flags = BPF_RB_FORCE_WAKEUP;
	if (bpf_ringbuf_output(&events, data, size, flags))
		fm_count(FM_CTR_LOST);
}

/* fill_current fills what every event says about the current task. */
static __always_inline void fill_current(struct proc_event *e, struct task_struct *t, __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 ug = bpf_get_current_uid_gid();

	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)ug;
	e->gid = ug >> 32;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ppid = BPF_CORE_READ(t, real_parent, tgid);
	e->start_ns = BPF_CORE_READ(t, group_leader, start_time);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

SEC("raw_tracepoint/sched_process_exec")
int on_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *t = (void *)ctx->args[0];
	pid_t old_pid = ctx->args[1];
	struct linux_binprm *bprm = (void *)ctx->args[2];
	__u32 zero = 0;
	struct exec_event *e;
	unsigned long start, end;
	__u64 fn, args, size;
	long n;

	if (!pt_in_scope(bpf_get_current_pid_tgid() >> 32))
		return 0;
	e = bpf_map_lookup_elem(&exec_scratch, &zero);
	if (!e)
		return 0;
	fill_current(&e->hdr, t, PROC_EVENT_EXEC);
	e->hdr.tid = old_pid;
	e->hdr.exit_code = 0;
	e->hdr.child_pid = 0;
	e->argc = BPF_CORE_READ(bprm, argc);

	n = bpf_probe_read_kernel_str(e->data, EXEC_FILENAME_MAX, BPF_CORE_READ(bprm, filename));
	if (n <= 0) {
		e->data[0] = 0;
		n = 1;
	}
	fn = n;
	if (fn > EXEC_FILENAME_MAX)
		fn = EXEC_FILENAME_MAX;
	e->filename_len = fn;

	/* The new image's argv, just copied to its stack by execve. */
	start = BPF_CORE_READ(t, mm, arg_start);
	end = BPF_CORE_READ(t, mm, arg_end);
	args = end > start ? end - start : 0;
	e->args_truncated = 0;
	if (args > EXEC_ARGS_MAX) {
		args = EXEC_ARGS_MAX;
		e->args_truncated = 1;
	}
	if (args && bpf_probe_read_user(e->data + fn, args, (void *)start)) {
		args = 0;
		e->args_truncated = 1;
	}
	e->args_len = args;

	size = offsetof(struct exec_event, data) + fn + args;
	if (size > sizeof(*e))
		return 0;
	output(e, size);
	return 0;
}

/* sched_process_exit(struct task_struct *p): one argument before Linux 6.16
 * (group_dead came then); only args[0] is read, on every kernel. */
static __always_inline int report_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *t = (void *)ctx->args[0];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct proc_event *e;

	/* A thread ending is not a process exit; of the threads of an
	 * exit_group, one reports. */
	if (!pt_group_left(t) || !pt_in_scope(tgid) || !pt_claim_exit(t))
		return 0;
	pt_exit(tgid);
	e = fm_reserve(sizeof(*e));
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	fill_current(e, t, PROC_EVENT_EXIT);
	e->exit_code = BPF_CORE_READ(t, exit_code);
	fm_submit(e, sizeof(*e));
	return 0;
}

PT_EXIT_PROGRAMS(report_exit)

SEC("raw_tracepoint/sched_process_fork")
int on_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *child = (void *)ctx->args[1];
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 child_tgid = BPF_CORE_READ(child, tgid);
	struct proc_event *e;

	/* A new thread of the same process is not a fork. */
	if (child_tgid == tgid || BPF_CORE_READ(child, pid) != child_tgid)
		return 0;
	if (!pt_in_scope(tgid))
		return 0;
	if (!pt_fork(tgid, child_tgid))
		fm_count(PROC_CTR_TRACK_FULL);
	e = fm_reserve(sizeof(*e));
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	fill_current(e, (void *)bpf_get_current_task(), PROC_EVENT_FORK);
	e->child_pid = child_tgid;
	e->start_ns = BPF_CORE_READ(child, start_time);
	fm_submit(e, sizeof(*e));
	return 0;
}
