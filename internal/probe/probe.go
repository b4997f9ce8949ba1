// Package probes is the contract between a flowmill session and the probe
// families (probes/tcp, probes/process, ...).
//
// A family implements [Probe]: given an [Env] it loads its eBPF objects,
// attaches them within the session's [Scope], and returns an [Attachment]
// whose ring buffers the session drains and whose records the family decodes
// and publishes as typed events on the session's [Bus]. A family may also
// implement [Telemetry], its mapping of those events to OpenTelemetry
// instruments and spans, which flowmill.NewExporter uses.
//
// Users pick families with flowmill.WithProbes; they rarely need this
// package directly.
package probe

import (
	"errors"
	"time"

	"github.com/cilium/ebpf"
)

// Errors a probe returns, wrapped with what is missing and what to do.
// Test for them with errors.Is.
var (
	// ErrPermission: the process may not load eBPF programs.
	ErrPermission = errors.New("insufficient privileges for eBPF")
	// ErrNoBTF: the kernel exposes no BTF, which CO-RE needs.
	ErrNoBTF = errors.New("kernel BTF not available")
	// ErrMissingHook: a tracepoint or function the probe attaches to does
	// not exist on this kernel or binary.
	ErrMissingHook = errors.New("attach point missing")
	// ErrNotSupported: the kernel lacks a feature the probe needs.
	ErrNotSupported = errors.New("kernel feature not supported")
)

// ScopeKind says which tasks a session observes.
type ScopeKind uint32

// Scope kinds; the values are shared with bpf/include/flowmill.h.
const (
	// ScopeHost observes every process on the host.
	ScopeHost ScopeKind = 0
	// ScopeProcess observes one process (all its threads).
	ScopeProcess ScopeKind = 1
	// ScopeCgroup observes the processes in a cgroup (v2) and its
	// descendants.
	ScopeCgroup ScopeKind = 2
)

// Scope is what a session observes. Filtering happens in the kernel.
type Scope struct {
	Kind ScopeKind
	// PID is the observed process for ScopeProcess.
	PID uint32
	// CgroupPath is the cgroup v2 directory for ScopeCgroup.
	CgroupPath string
}

// Env is what a session gives a probe when attaching it.
type Env struct {
	Scope Scope
	// Bus carries the probe's decoded events to subscribers.
	Bus *Bus
	// RingSize is the size in bytes of each event ring buffer (a power of
	// two, a multiple of the page size).
	RingSize uint32
	// WakeupBytes is how much unread data makes the kernel wake the reader;
	// below that the session drains on its timer.
	WakeupBytes uint64
	// BootTime converts kernel CLOCK_MONOTONIC nanoseconds to wall time.
	BootTime func(ktimeNS uint64) time.Time
	// Sync returns once the session has handled every record its probes'
	// kernel programs submitted before the call, rather than on the next
	// timed drain. A probe answering another family's question about
	// kernel state calls it first. It must not be called from a Ring's
	// Handle, and is a no-op before Start returns and after Close.
	Sync func()
}

// Ring is an event ring buffer and the function that decodes and publishes
// its records. Handle runs on one goroutine per ring; the record is only
// valid during the call.
type Ring struct {
	Map    *ebpf.Map
	Handle func(record []byte)
}

// Stats counts what a probe lost.
type Stats struct {
	// Lost is records dropped in the kernel because the ring buffer was full.
	Lost uint64
	// Evicted is entries pushed out of full kernel maps (flows, for
	// instance) before they could be reported.
	Evicted uint64
	// Missed is hook hits the kernel did not run the probe's programs for,
	// because one of them was already running on that CPU (an interrupt
	// during the same program, or, where the kernel preempts programs,
	// another task): see bpfload.Missed. The kernel does not say whether a
	// skipped hit was in the session's scope, so it is not counted as
	// lost. Linux 5.12 and later; 0 before.
	Missed uint64
	// Malformed is records read from a ring buffer that could not be
	// decoded (shorter than their layout, of an unknown kind, naming
	// something that cannot be resolved); each is dropped.
	Malformed uint64
	// Incomplete is events delivered with some fields unknown because the
	// kernel could not read them (a closing socket's counters, for
	// instance); the event says which fields are missing.
	Incomplete uint64
	// Unsupported is activity in scope that the probe saw but does not
	// instrument (outgoing requests that cannot carry injected trace
	// context, for instance).
	Unsupported uint64
	// PollsFailed is periodic reads of kernel state that failed for part
	// of the scope (a network namespace whose sock_diag dump failed); what
	// they would have reported is missing from that round.
	PollsFailed uint64
}

// Attachment is a loaded and attached probe.
type Attachment interface {
	// Rings lists the ring buffers the session must drain.
	Rings() []Ring
	// Stats reads the probe's loss counters.
	Stats() (Stats, error)
	// Close detaches and unloads everything; the session calls it once,
	// after it stopped draining the rings.
	Close() error
}

// Probe is a probe family, configured and ready to attach.
type Probe interface {
	// Name is a short name for errors and logs ("tcp").
	Name() string
	// Prepare reports the family's invalid options, if any, and declares
	// the event types it produces on b (with Produce), so that users can
	// subscribe before it attaches. It touches no kernel state. The
	// session calls it once, before Attach.
	Prepare(b *Bus) error
	// Attach loads and attaches the probe.
	Attach(env *Env) (Attachment, error)
}
