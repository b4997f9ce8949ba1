package syscalls

import (
	"slices"
	"time"
)

// Count is how many times a system call was made.
type Count struct {
	Syscall Syscall
	N       uint64
}

// Counts reports the system calls of one process: for each call it made,
// how many times, since the probe attached or the process started. It is
// published after each read of the kernel counters for every process whose
// counts changed, and once more, with Exited set, after the process died.
// It is published by the probe's timer goroutine (see WithInterval), not a
// ring reader; a function subscriber (flowmill.SubscribeFunc) may call
// Probe.Snapshot and Probe.Totals.
type Counts struct {
	// Time the kernel counters were read.
	Time time.Time
	// PID is the process (thread group) ID.
	PID uint32
	// Exited is set on the last Counts of a process that died: they are
	// final.
	Exited bool
	// Syscalls holds the calls with a nonzero count, sorted by number.
	Syscalls []Count
}

// Of returns how many times the process made system call s.
func (c *Counts) Of(s Syscall) uint64 {
	i, ok := slices.BinarySearchFunc(c.Syscalls, s, func(c Count, s Syscall) int { return int(c.Syscall) - int(s) })
	if !ok {
		return 0
	}
	return c.Syscalls[i].N
}
