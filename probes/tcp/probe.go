// Package tcp is the TCP connection probe family: connection lifecycle
// (ConnOpened, ConnClosed) and per-flow counters (ConnStats, and the final
// Stats in ConnClosed) for IPv4 and IPv6, client and server side.
//
// It attaches to stable raw tracepoints only (inet_sock_set_state,
// tcp_destroy_sock, tcp_send_reset, tcp_receive_reset), so it needs neither
// kprobes nor fentry. The kernel sends one record when a connection is
// established and one when it ends; the counters are the socket's own,
// read at close, so nothing runs per packet. Periodic ConnStats for open
// connections are read from the kernel's tcp_info through sock_diag (what
// ss -ti shows), inside each connection's network namespace.
//
// The probe runs on Linux; elsewhere Attach fails with an error wrapping
// probes.ErrNotSupported, so that programs using it still build.
package tcp

import "time"

// Option configures the probe.
type Option func(*Probe)

// WithStatsInterval sets how often ConnStats is sent for each open
// connection (default 5s). Zero disables periodic stats.
func WithStatsInterval(d time.Duration) Option {
	return func(p *Probe) { p.interval = d }
}

// WithMaxFlows bounds the kernel's table of in-flight connections (default
// 65536). When it is full the least recently used entry is evicted, and the
// eviction is counted in the session's Stats.Evicted.
func WithMaxFlows(n int) Option {
	return func(p *Probe) { p.maxFlows = uint32(n) }
}

// Probe is the TCP probe family. Create it with New.
type Probe struct {
	interval time.Duration
	maxFlows uint32
	spans    bool // see WithSpans
}

// New returns the TCP probe, to pass to flowmill.WithProbes. It produces
// ConnOpened, ConnStats and ConnClosed.
func New(opts ...Option) *Probe {
	p := &Probe{interval: 5 * time.Second, maxFlows: 65536}
	for _, o := range opts {
		o(p)
	}
	return p
}

// Name returns "tcp".
func (p *Probe) Name() string { return "tcp" }
