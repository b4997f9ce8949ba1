// Package http is the HTTP probe family: a span for every HTTP/1 request
// the calling Go program serves with net/http (ServerRequest) and every
// request it sends with a net/http Transport (ClientRequest), with no change
// to its handlers, middleware or clients.
//
// It places uprobes on the program's own executable (/proc/self/exe): one
// after the stack check of net/http.serverHandler.ServeHTTP and one on each
// of its RET instructions, and the same for net/http.(*Transport).roundTrip.
// A served request costs two uprobe hits, a sent request two. Functions are
// found in the Go pclntab, so stripped binaries (-ldflags='-s -w') work;
// RETs are found by disassembling the function (uretprobes corrupt Go
// stacks and are never used); the struct field offsets the kernel side
// reads are taken from the very types compiled into the program, so there
// is no offsets table to fall behind a Go release.
//
// Traces: a served request with a W3C traceparent header is a child of that
// remote span. A client request is a child of the served request whose
// context it was given (r.Context() or a context derived from it, on any
// goroutine), or else of the request its goroutine is serving. Otherwise it
// starts a trace.
//
// The probe does not inject traceparent into outgoing requests, so the
// services this program calls start their own traces. From the kernel,
// injection would mean adding an entry to the request's Header map, a Go
// heap allocation that eBPF cannot make, with bpf_probe_write_user, which
// kernel lockdown refuses and which bypasses the garbage collector's write
// barriers. In the process, it would mean replacing http.DefaultTransport
// behind the application's back (a data race with its own use, and no
// effect on clients with their own Transport). Neither is safe enough to do
// silently; a service that needs propagation downstream uses an explicitly
// instrumented Transport (otelhttp) for those calls.
//
// Limits: HTTP/2 served requests are not instrumented (they are counted in
// the session's Stats.EventsLost); only amd64 Linux is supported. Requests
// whose entry probe could not read the Request, or (on kernels that
// preempt uprobe programs) was overtaken on its CPU by another request's,
// are not traced either, and are counted in Stats.EventsLost too.
package http

import (
	"sync"
	"time"
)

// Option configures the probe.
type Option func(*Probe)

// WithMaxInFlight bounds the requests tracked at once in the kernel, for
// each of serving and sending (default 16384). Beyond it the oldest entries
// are evicted and counted in the session's Stats.Evicted.
func WithMaxInFlight(n int) Option { return func(p *Probe) { p.maxInFlight = uint32(n) } }

// WithStaleAfter sets how long a request may stay in flight before its
// entry is dropped as one that will never return (a handler that panicked,
// for instance): default 10 minutes. Dropped entries are counted in the
// session's Stats.Evicted.
func WithStaleAfter(d time.Duration) Option { return func(p *Probe) { p.staleAfter = d } }

// Probe is the HTTP probe family. Create it with New.
type Probe struct {
	maxInFlight uint32
	staleAfter  time.Duration

	mu     sync.Mutex
	status Status
}

// Status says what the probe instrumented in its last Attach.
type Status struct {
	// Server and Client say whether serving and sending are instrumented.
	Server, Client bool
	// Skipped lists what was left out and why, such as the client when the
	// program never sends HTTP requests (the linker left the Transport out).
	Skipped []string
}

// New returns the HTTP probe, to pass to flowmill.WithProbes. It produces
// ServerRequest and ClientRequest.
func New(opts ...Option) *Probe {
	p := &Probe{maxInFlight: 16384, staleAfter: 10 * time.Minute}
	for _, o := range opts {
		o(p)
	}
	return p
}

// Name returns "http".
func (p *Probe) Name() string { return "http" }

// Status reports what the last Attach instrumented.
func (p *Probe) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.status
	s.Skipped = append([]string(nil), s.Skipped...)
	return s
}

// The functions probed.
const (
	serverFunc = "net/http.serverHandler.ServeHTTP"
	clientFunc = "net/http.(*Transport).roundTrip"
)
