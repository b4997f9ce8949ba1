// Package grpc is the gRPC probe family: a span for every RPC the calling Go
// program serves with google.golang.org/grpc (ServerRPC), unary and
// streaming, from the moment its handler is dispatched to the status sent,
// and for every RPC it makes with a grpc ClientConn (ClientRPC): unary
// calls (Invoke, what generated stubs call) and streams (NewStream, until
// the stream finishes), with no change to the servers, clients,
// interceptors or handlers.
//
// It places uprobes on the program's own executable (/proc/self/exe): one
// after the stack check of grpc.(*Server).handleStream and one on each of
// its RET instructions, one at the entry of the HTTP/2 transport's
// writeStatus (the status code sent) and one at the entry of its
// operateHeaders (the request's metadata): four hits per RPC served. For
// clients: (*ClientConn).Invoke and NewStream, entry and RETs, and the
// entry of (*clientStream).finish, which every RPC made also hits (a
// stream ends there): three hits per RPC made. Functions are found in the
// Go pclntab, so stripped binaries (-ldflags='-s -w') work; RETs are found
// by disassembling the function (uretprobes corrupt Go stacks and are
// never used); the struct field offsets and interface tables the kernel
// side reads are taken from the grpc-go types compiled into the program
// (the library imports the application's grpc-go, as a Go binary holds one
// version of each module; its unexported types are found among the
// program's type descriptors), so there is no offsets table to fall
// behind a grpc-go release. Nothing is served or called to learn them:
// the library links none of grpc-go's server.
//
// The server part and the client part are independent: each is
// instrumented when its functions are in the program and its layout is
// known, and each one left out is in Status.Skipped with the reason
// (Status.Server, Status.Client say what was instrumented). A program that
// is only a gRPC client may have no server functions at all: the linker
// leaves out what is never called (not always: built without
// -tags=grpcnotrace, or with grpc-go v1.76.0 even with it, a client keeps
// grpc-go's server linked, and its part attached, though never called).
// A program with neither part gets an attachment that does nothing, never
// an error; a layout the probe does not know is reported in Status and
// that part skipped, never a panic. The library's go.mod requires the
// oldest grpc-go it is tested with (v1.76.0); newer ones (v1.85.0 is
// tested) are what applications pick.
//
// Traces: an RPC served whose metadata carries a W3C traceparent is a
// child of that remote span (the HTTP/2 request header fields are read as
// grpc-go decoded them, on the connection's reader goroutine, and matched
// to the handler by transport and stream ID). A client RPC is a child of
// the served RPC whose context it was given (the handler's ctx or a
// context derived from it, on any goroutine), or else of the RPC its
// goroutine is serving. Failing that, with the HTTP family (probes/http)
// in the same session, listed before this one in flowmill.WithProbes, it
// is a child of the request served over net/http whose context it was
// given (r.Context() or a context derived from it, on any goroutine), or
// else of the request its goroutine is serving (ClientRPC.ParentHTTP;
// Status.HTTPParenting says whether this is on). Otherwise it starts a
// trace.
//
// Not done: outgoing trace context. gRPC metadata travels HPACK-encoded
// in HTTP/2 HEADERS frames, which cannot be safely rewritten on their way
// to the socket (an sk_msg program would have to re-encode the header
// block against the HPACK dynamic table shared with the peer), and writing
// the program's memory (bpf_probe_write_user) is refused under kernel
// lockdown: Status.Propagation is false and Status.PropagationErr says
// why. Without the HTTP family attached before this one, client RPCs
// made while serving an HTTP request start a trace (Status.Skipped says
// so). RPCs served through Server.ServeHTTP (grpc-go on net/http's
// HTTP/2 server) are not instrumented: they are counted as unsupported in
// the session's stats, as are streams whose ClientStream a stream
// interceptor wrapped. Only amd64 Linux is supported.
package grpc

import (
	"errors"
	"sync"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

// Option configures the probe.
type Option func(*Probe)

// WithMaxInFlight bounds the RPCs tracked at once in the kernel (default
// 16384). Beyond it the oldest entries are evicted and counted in the
// session's Stats.Evicted. At most 1<<22.
func WithMaxInFlight(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("grpc.WithMaxInFlight", n, 1, 1<<22) {
			p.maxInFlight = uint32(n)
		}
	}
}

// WithStaleAfter sets how long an RPC may stay in flight before its entry
// is dropped as one that will never return (a handler that panicked, or a
// stream that is never closed): default 1 hour. Dropped entries are
// counted in the session's Stats.Evicted. It must be at least a second.
func WithStaleAfter(d time.Duration) Option {
	return func(p *Probe) {
		if p.opts.Duration("grpc.WithStaleAfter", d, time.Second, 24*365*time.Hour) {
			p.staleAfter = d
		}
	}
}

// Probe is the gRPC probe family. Create it with New.
type Probe struct {
	maxInFlight uint32
	staleAfter  time.Duration
	opts        probe.Options

	mu     sync.Mutex
	status Status
}

// Status says what the probe instrumented in its last Attach.
type Status struct {
	// Server says whether served RPCs are instrumented: false when the
	// program has no grpc-go server (Skipped says so) or its layout is
	// not one the probe knows.
	Server bool
	// IncomingContext says whether a served RPC's traceparent metadata
	// makes its span a child of the caller's.
	IncomingContext bool
	// Client says whether RPCs the program makes (ClientConn.Invoke and
	// NewStream) are instrumented, whether or not Server is; when it is
	// false, Skipped says why.
	Client bool
	// HTTPParenting says whether client RPCs find the request served over
	// net/http they are made for, as their parent (the HTTP family,
	// probes/http, attached before this one). When it is false while
	// Client is true, Skipped says why.
	HTTPParenting bool
	// Propagation says whether outgoing RPCs get W3C trace context:
	// always false, see PropagationErr.
	Propagation bool
	// PropagationErr says why outgoing RPCs get no trace context: an
	// error wrapping ErrPropagationUnavailable.
	PropagationErr error `json:"-"`
	// Skipped lists what was left out and why.
	Skipped []string
}

// ErrPropagationUnavailable is wrapped by Status.PropagationErr: outgoing
// gRPC trace context injection is not done.
var ErrPropagationUnavailable = errors.New("grpc: trace context propagation unavailable")

// errNoInjection is the reason (see the package documentation).
var errNoInjection = errors.New("gRPC metadata is sent HPACK-encoded in HTTP/2 HEADERS frames, " +
	"which cannot be safely rewritten on their way to the socket, and writing the program's memory " +
	"(bpf_probe_write_user) is refused under kernel lockdown")

// New returns the gRPC probe, to pass to flowmill.WithProbes. It produces
// ServerRPC and ClientRPC.
func New(opts ...Option) *Probe {
	p := &Probe{maxInFlight: 16384, staleAfter: time.Hour}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("grpc")
			continue
		}
		o(p)
	}
	return p
}

// Name returns "grpc".
func (p *Probe) Name() string { return "grpc" }

// Prepare reports invalid options and declares the event types; the
// session calls it (see flowmill.New).
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[ServerRPC](b)
	probe.Produce[ClientRPC](b)
	return p.opts.Err()
}

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
	serverFunc  = "google.golang.org/grpc.(*Server).handleStream"
	statusFunc  = "google.golang.org/grpc/internal/transport.(*http2Server).writeStatus"
	headersFunc = "google.golang.org/grpc/internal/transport.(*http2Server).operateHeaders"

	invokeFunc    = "google.golang.org/grpc.(*ClientConn).Invoke"
	newStreamFunc = "google.golang.org/grpc.(*ClientConn).NewStream"
	finishFunc    = "google.golang.org/grpc.(*clientStream).finish"
)

// What Status.Skipped says of what is not done.
const (
	skippedHTTPParent  = "HTTP parenting: no HTTP family (probes/http) attached before this one: client RPCs made while serving an HTTP request start traces of their own"
	skippedPropagation = "trace context propagation: not done: gRPC metadata is HPACK-encoded in HTTP/2 HEADERS frames, " +
		"which cannot be safely rewritten, and bpf_probe_write_user is refused under kernel lockdown"
	skippedServeHTTP = "RPCs served through Server.ServeHTTP (net/http's HTTP/2 server): not instrumented, counted as unsupported"
)
