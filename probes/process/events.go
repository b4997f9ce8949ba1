package process

import (
	"syscall"
	"time"
)

// Process identifies the process an event is about. IDs are as seen from
// the initial PID and user namespaces.
type Process struct {
	// PID is the thread group ID, what user space calls the PID.
	PID uint32
	// PPID is the PID of the real parent (the one wait() reports to).
	PPID uint32
	// UID and GID are the real user and group IDs.
	UID uint32
	GID uint32
	// CgroupID is the cgroup v2 ID (the inode number of its directory).
	CgroupID uint64
	// Comm is the task's name, at most 15 bytes: after an exec, the base
	// name of the new executable.
	Comm string
}

// Exec reports a successful execve: the process now runs Filename.
type Exec struct {
	// Time the new program was loaded.
	Time time.Time
	Process
	// TID is the thread that called execve. It differs from PID when a
	// thread other than the leader executed; the process keeps its PID.
	TID uint32
	// Filename is the path given to execve as the kernel resolved it (for
	// execveat, "/dev/fd/N/..." forms), at most 511 bytes.
	Filename string
	// Argv is the new program's arguments, Argv[0] included, as it found
	// them on its stack.
	Argv []string
	// ArgvTruncated is set when Argv is incomplete: the arguments exceed
	// 4096 bytes (the last string kept may be cut), or could not be read.
	ArgvTruncated bool
}

// Exit reports the end of a process: its last thread exited.
type Exit struct {
	// Time the last thread exited.
	Time time.Time
	Process
	// ExitCode is the exit status (0-255) of a process that exited, or -1
	// when a signal killed it (as os.ProcessState.ExitCode).
	ExitCode int
	// Signal is the signal that killed the process, 0 when it exited.
	Signal syscall.Signal
	// CoreDumped is set when the signal dumped core.
	CoreDumped bool
	// Lifetime is the time from the process's fork to its exit.
	Lifetime time.Duration
}

// Fork reports a new process (new threads are not reported).
type Fork struct {
	// Time the child was created.
	Time time.Time
	// Process is the parent.
	Process
	// ChildPID is the new process's PID.
	ChildPID uint32
}
