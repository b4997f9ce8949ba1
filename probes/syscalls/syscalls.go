// Package syscalls is the system call probe family: how many times each
// process in the session's scope made each system call, and, from that, a
// seccomp profile allowing exactly what was used.
//
// # Design
//
// Nothing is sent per system call. A program on the sys_enter raw
// tracepoint increments a per-CPU counter keyed by {PID, syscall number}
// in a bounded kernel hash map: no atomic operation, no ring buffer record,
// no wake-up on the hot path. User space reads the map on a timer
// (WithInterval) with batched lookups, sums the CPUs, and publishes a
// Counts event for each process whose counts changed. When a process dies
// the kernel notes it (sched_process_exit), and the next read publishes its
// final Counts (Exited set) and frees its entries, so the map holds only
// living processes and those that died since the last read.
//
// Counts are cumulative per process from the moment the probe attached (or
// the process appeared). Probe.Snapshot reads the kernel at once; Probe.Totals
// sums everything observed, including processes that have exited, and is
// what SeccompProfile is usually given.
//
// # Scope
//
// As in the process family, the default scope is the session's process and
// all its descendants (a tree the kernel follows across forks);
// flowmill.WithHostScope and flowmill.WithCgroupScope widen or change it.
//
// # Limits
//
// Entries that do not fit in the map (WithMaxEntries), exits that cannot be
// noted and children that cannot be followed are counted in the session's
// Stats.EventsLost. Only native x86-64 calls are counted: ia32 (int 0x80)
// and x32 calls are ignored. PIDs are those of the initial PID namespace;
// if a PID is reused within one interval of its previous owner's death, the
// two processes' counts are merged.
package syscalls

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

// ErrNotAttached is returned by Snapshot when the probe is not part of an
// open session.
var ErrNotAttached = errors.New("syscalls: probe not attached: pass it to flowmill.WithProbes and keep the session open")

// Option configures the probe.
type Option func(*Probe)

// WithInterval sets how often the kernel counters are read and Counts
// published (default 1s), between 10ms and 24h.
func WithInterval(d time.Duration) Option {
	return func(p *Probe) {
		if p.opts.Duration("syscalls.WithInterval", d, 10*time.Millisecond, 24*time.Hour) {
			p.interval = d
		}
	}
}

// WithMaxEntries bounds the kernel's table of {process, system call} pairs
// (default 65536; a process typically uses 30 to 100 distinct calls). Calls
// of a pair that finds the table full are not counted; they are counted in
// the session's Stats.EventsLost instead.
func WithMaxEntries(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("syscalls.WithMaxEntries", n, 1, 1<<24) {
			p.maxEntries = uint32(n)
		}
	}
}

// WithMaxProcesses bounds the kernel's tables of the process tree followed
// in the default (process) scope and of processes that died between two
// reads (default 16384 each).
func WithMaxProcesses(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("syscalls.WithMaxProcesses", n, 1, 1<<22) {
			p.maxProcs = uint32(n)
		}
	}
}

// Probe is the system call probe family. Create it with New. A Probe
// serves one session at a time; its query methods read that session's
// counters.
type Probe struct {
	interval   time.Duration
	maxEntries uint32
	maxProcs   uint32
	att        atomic.Pointer[attachment]
	opts       probe.Options
}

// New returns the system call probe, to pass to flowmill.WithProbes. It
// produces Counts.
func New(opts ...Option) *Probe {
	p := &Probe{interval: time.Second, maxEntries: 65536, maxProcs: 16384}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("syscalls")
			continue
		}
		o(p)
	}
	return p
}

// Name returns "syscalls".
func (p *Probe) Name() string { return "syscalls" }

// Prepare reports invalid options and declares the event type; the session
// calls it (see flowmill.New).
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[Counts](b)
	return p.opts.Err()
}

// Snapshot reads the kernel counters now and returns the counts of every
// living process observed, sorted by PID. It also publishes the Counts
// events the read produces, as a timed read would.
func (p *Probe) Snapshot() ([]Counts, error) {
	a := p.att.Load()
	if a == nil {
		return nil, ErrNotAttached
	}
	return a.snapshot()
}

// Totals returns, for each system call observed, how many times the
// processes in scope made it since the probe attached, including processes
// that have exited; sorted by number. It reads the kernel first while the
// session is open; after the session closed, it returns the totals as of
// the close.
func (p *Probe) Totals() ([]Count, error) {
	a := p.att.Load()
	if a == nil {
		return nil, ErrNotAttached
	}
	return a.totalCounts()
}
