// Package process is the process lifecycle probe family: Fork, Exec (with
// filename and argv) and Exit (with exit status or signal, and lifetime) of
// the processes in the session's scope.
//
// It attaches to stable raw tracepoints only (sched_process_fork,
// sched_process_exec, sched_process_exit), so it needs neither kprobes nor
// fentry, and the kernel sends one record per fork, exec and exit in scope.
//
// # Scope
//
// In the session's default scope (flowmill.WithProcessScope, or no scope
// option) the probe observes that process and all its descendants: the
// kernel keeps the tree in a map, seeded with the scope process and its
// living descendants when the probe attaches, extended at each fork of a
// tracked process and pruned at each exit. A child forked while the map is
// full is not followed, and that loss is counted in the session's
// Stats.EventsLost (raise WithMaxProcesses). flowmill.WithHostScope
// observes every process, flowmill.WithCgroupScope the processes of a
// cgroup.
//
// # Cost
//
// Records are read in batches (see flowmill.WithMaxLatency). Exec records
// carry only the bytes of their filename and arguments. Decoding a fork or
// exit does not allocate; an exec allocates its Argv.
package process

import "github.com/flowmill/flowmill/internal/probe"

// Option configures the probe.
type Option func(*Probe)

// WithMaxProcesses bounds the kernel's table of the process tree followed
// in the default (process) scope (default 16384 processes). It is unused in
// host and cgroup scope. At most 1<<22.
func WithMaxProcesses(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("process.WithMaxProcesses", n, 1, 1<<22) {
			p.maxProcs = uint32(n)
		}
	}
}

// Probe is the process probe family. Create it with New.
type Probe struct {
	maxProcs uint32
	logs     bool // WithLogRecords
	opts     probe.Options
}

// New returns the process probe, to pass to flowmill.WithProbes. It
// produces Exec, Exit and Fork.
func New(opts ...Option) *Probe {
	p := &Probe{maxProcs: 16384}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("process")
			continue
		}
		o(p)
	}
	return p
}

// Name returns "process".
func (p *Probe) Name() string { return "process" }

// Prepare reports invalid options and declares the event types; the
// session calls it (see flowmill.New).
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[Exec](b)
	probe.Produce[Exit](b)
	probe.Produce[Fork](b)
	return p.opts.Err()
}
