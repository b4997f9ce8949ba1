// Package tcp is the TCP connection probe family: connection lifecycle
// (ConnOpened, ConnClosed) and per-flow counters (ConnStats, and the final
// Counters in ConnClosed) for IPv4 and IPv6, client and server side.
//
// It attaches to stable raw tracepoints only (inet_sock_set_state,
// tcp_destroy_sock, tcp_send_reset, tcp_receive_reset), so it needs neither
// kprobes nor fentry. The kernel sends one record when a connection is
// established and one when it ends; the counters are the socket's own,
// read at close, so nothing runs per packet.
//
// # Attribution
//
// A client connection belongs to the thread that called connect(). A
// server connection belongs to the process that owns the listening socket
// it was accepted from, whatever else listens on the same port (at another
// address, or in the same SO_REUSEPORT group): the kernel program keeps
// listening sockets by socket and finds, for each accepted socket, the
// listener it was cloned from. Listening sockets that exist before the
// probe starts are found through sock_diag and /proc/PID/fd; one shared by
// several processes belongs to the lowest PID. An accepted connection whose
// listener the kernel program could not identify is counted in the
// session's Stats.Unsupported.
//
// # Goroutines
//
// ConnOpened and ConnClosed are published on the session's ring-buffer
// reader goroutine. ConnStats are published from the probe's own poller
// goroutine, once per WithStatsInterval: they are read from the kernel's
// tcp_info through sock_diag (what ss -ti shows), inside each connection's
// network namespace.
//
// # Privileges
//
// Loading the probe needs CAP_BPF and CAP_PERFMON (or root). ConnStats of
// the session's own network namespace need nothing more (sock_diag dumps
// are not privileged). Those of connections in other network namespaces
// (containers, in host scope) need CAP_SYS_ADMIN, to enter the namespace
// (setns), and CAP_SYS_PTRACE to open /proc/PID/ns/net of other users'
// processes; without them, or when a namespace has vanished, its
// connections get no ConnStats and each round counts it in the session's
// Stats.PollsFailed. Listening sockets that existed before the probe
// started are attributed only where the same capabilities allow reading
// their namespace (one that cannot be read is counted in PollsFailed too)
// and their owners' /proc/PID/fd. CAP_NET_ADMIN is not needed.
//
// # What is counted
//
// Besides the records the kernel lost (EventsLost) and the flows its
// bounded table evicted (Evicted, see WithMaxFlows), the session's Stats
// count the probe's records that did not decode (Malformed), its events
// delivered with parts the kernel could not read (Incomplete; Conn.Missing
// says which), accepted connections of unknown listener (Unsupported), and
// the network namespaces a stats round could not read (PollsFailed).
//
// The probe runs on Linux; elsewhere Attach fails with an error wrapping
// probe.ErrNotSupported, so that programs using it still build.
package tcp

import (
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

// Option configures the probe.
type Option func(*Probe)

// WithStatsInterval sets how often ConnStats is sent for each open
// connection (default 5s), at least 10ms. Zero disables periodic stats.
func WithStatsInterval(d time.Duration) Option {
	return func(p *Probe) {
		if d == 0 || p.opts.Duration("tcp.WithStatsInterval", d, 10*time.Millisecond, 24*time.Hour) {
			p.interval = d
		}
	}
}

// WithMaxFlows bounds the kernel's table of in-flight connections (default
// 65536). When it is full the least recently used entry is evicted, and the
// eviction is counted in the session's Stats.Evicted. At most 1<<24.
func WithMaxFlows(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("tcp.WithMaxFlows", n, 1, 1<<24) {
			p.maxFlows = uint32(n)
		}
	}
}

// Probe is the TCP probe family. Create it with New.
type Probe struct {
	interval time.Duration
	maxFlows uint32
	spans    bool // see WithSpans
	opts     probe.Options
}

// New returns the TCP probe, to pass to flowmill.WithProbes. It produces
// ConnOpened, ConnStats and ConnClosed.
func New(opts ...Option) *Probe {
	p := &Probe{interval: 5 * time.Second, maxFlows: 65536}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("tcp")
			continue
		}
		o(p)
	}
	return p
}

// Name returns "tcp".
func (p *Probe) Name() string { return "tcp" }

// Prepare reports invalid options and declares the event types; the
// session calls it (see flowmill.New).
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[ConnOpened](b)
	probe.Produce[ConnStats](b)
	probe.Produce[ConnClosed](b)
	return p.opts.Err()
}
