/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A trimmed vmlinux.h for flowmill.
 *
 * It holds only the kernel types flowmill's programs read. Kernel structs are
 * declared with preserve_access_index, so every field access is relocated by
 * CO-RE against the running kernel's BTF when the object is loaded: the field
 * order and offsets below do not need to match any kernel, only the field
 * names and types. Keeping the header small and in the repository means
 * `go generate` gives the same object on every build machine.
 *
 * UAPI constants are copied from include/uapi/linux/bpf.h, which is stable ABI.
 */
#ifndef __FLOWMILL_VMLINUX_H__
#define __FLOWMILL_VMLINUX_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef _Bool bool;
enum { false = 0, true = 1 };
typedef int pid_t;

/* ---- UAPI (include/uapi/linux/bpf.h) ---- */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_CGROUP_ARRAY = 8,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_SOCKHASH = 18,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};

enum {
	BPF_RB_AVAIL_DATA = 0,
	BPF_RB_RING_SIZE = 1,
	BPF_RB_CONS_POS = 2,
	BPF_RB_PROD_POS = 3,
};

struct bpf_raw_tracepoint_args {
	__u64 args[0];
};

/* sk_msg verdicts. */
enum sk_action {
	SK_DROP = 0,
	SK_PASS = 1,
};

/* bpf_sock_ops.op values (only those used). */
enum {
	BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4,
};

#define __bpf_md_ptr(type, name)	\
union {					\
	type name;			\
	__u64 :64;			\
} __attribute__((aligned(8)))

struct bpf_sock;

/* Program contexts: their layout is UAPI (the kernel rewrites accesses by
 * these offsets), so they are not relocated and end where our use ends.
 * Ports: local_port in host byte order; remote_port in network byte order
 * in the high 16 bits of the word on little-endian machines (so
 * bpf_ntohl(remote_port) is the port). */
struct sk_msg_md {
	__bpf_md_ptr(void *, data);
	__bpf_md_ptr(void *, data_end);
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 size; /* total size of the message */
};

struct bpf_sock_ops {
	__u32 op;
	union {
		__u32 args[4];
		__u32 reply;
		__u32 replylong[4];
	};
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
};

/* x86-64 user registers as the kernel saves them (uprobe context). */
struct pt_regs {
	unsigned long r15;
	unsigned long r14;
	unsigned long r13;
	unsigned long r12;
	unsigned long bp;
	unsigned long bx;
	unsigned long r11;
	unsigned long r10;
	unsigned long r9;
	unsigned long r8;
	unsigned long ax;
	unsigned long cx;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
	unsigned long ip;
	unsigned long cs;
	unsigned long flags;
	unsigned long sp;
	unsigned long ss;
};

/* ---- kernel types, relocated with CO-RE ---- */
#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

typedef struct {
	s64 counter;
} atomic64_t;

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	atomic64_t skc_cookie; /* 0 until someone asks for it */
	unsigned long skc_flags;
};

struct sock {
	struct sock_common __sk_common;
	u16 sk_protocol;
};

struct minmax_sample {
	u32 t;
	u32 v;
};

struct minmax {
	struct minmax_sample s[3];
};

struct list_head {
	struct list_head *next;
	struct list_head *prev;
};

struct tcp_sock {
	u64 bytes_received;
	u64 bytes_acked;
	u32 segs_in;
	u32 segs_out;
	u32 total_retrans;
	u32 srtt_us;
	u32 mdev_us;
	struct minmax rtt_min;
	u32 snd_una;
	u32 write_seq;
	struct list_head tsorted_sent_queue; /* empty on a listener */
};

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
};

struct thread_info {
	u32 status; /* x86 only */
};

typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live; /* threads of the group that have not yet exited */
};

struct file {
	void *private_data;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct socket {
	struct file *file;
	struct sock *sk;
};

struct task_struct {
	struct files_struct *files;
	pid_t pid;
	pid_t tgid;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct mm_struct *mm;
	struct signal_struct *signal;
	int exit_code;
	u64 start_time;
	char comm[16];
	struct thread_info thread_info; /* first on x86 (THREAD_INFO_IN_TASK) */
};

struct linux_binprm {
	const char *filename;
	int argc;
};

#pragma clang attribute pop

#endif /* __FLOWMILL_VMLINUX_H__ */
