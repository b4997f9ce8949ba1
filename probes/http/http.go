// Package http is the HTTP probe family: a span for every request the
// calling Go program serves with net/http (ServerRequest) and every request
// it sends with a net/http Transport (ClientRequest), with no change to its
// handlers, middleware or clients. Served requests are traced over HTTP/1.x
// and HTTP/2, in plain text (HTTP/2 with prior knowledge: h2c, through
// Server.Protocols) and over TLS (HTTP/2 negotiated by ALPN); client
// requests over HTTP/1.x and HTTP/2, plain text or TLS. Events carry the
// protocol version (network.protocol.version: 1.1, 2) and the scheme
// (url.scheme: http, https).
//
// HTTP/2 served requests run ServeHTTP on a goroutine of their own, with
// net/http's HTTP/2 ResponseWriter: the probe learns that writer's type,
// itab and the fields holding its status code and bytes written from this
// very program, by serving one h2c request over an in-memory pipe when it
// attaches and walking the writer's dynamic type with reflect. If that
// fails (a Go release that reshaped it), HTTP/2 served requests are
// counted as unsupported and Status says why (Status.ServerHTTP2 is
// false).
//
// It places uprobes on the program's own executable (/proc/self/exe): one
// after the stack check of net/http.serverHandler.ServeHTTP and one on each
// of its RET instructions, and the same for net/http.(*Transport).roundTrip.
// A served request costs two uprobe hits (HTTP/2: three, see Traces), a
// sent request two. Functions are
// found in the Go pclntab, so stripped binaries (-ldflags='-s -w') work;
// RETs are found by disassembling the function (uretprobes corrupt Go
// stacks and are never used); the struct field offsets the kernel side
// reads are taken from the very types compiled into the program, so there
// is no offsets table to fall behind a Go release.
//
// Traces: a served request with a W3C traceparent header is a child of that
// remote span, and its tracestate is passed on, over HTTP/1 and HTTP/2.
// HTTP/1 headers are scanned in the bytes the server read. HTTP/2 headers
// are HPACK-decoded into Request.Header, a Go map: one more uprobe, at the
// entry of net/http's newWriterAndRequest (Go 1.26's bundled HTTP/2, Go
// 1.27's net/http/internal/http2), reads the decoded header fields (the
// first 64 of a request) and keeps what it finds for the request's
// handler, by its stream. Where those fields are is learnt from this very
// program when the probe attaches, by serving it one in-memory HTTP/2
// request with known values: if that fails, HTTP/2 served requests start
// a trace of their own and Status.Skipped says why. A client request is a child of the served request whose
// context it was given (r.Context() or a context derived from it, on any
// goroutine), or else of the request its goroutine is serving. Otherwise it
// starts a trace.
//
// Propagation (on by default; WithoutPropagation turns it off): every
// request sent over plain-text HTTP/1 carries a W3C traceparent naming the
// current trace and the request's own client span, and the tracestate of
// the served request it belongs to; a downstream service instrumented with
// flowmill or any OpenTelemetry SDK continues the trace. The header is
// added to the request's bytes as they are written to the socket, by an
// sk_msg program (bpf_msg_push_data), so nothing writes the program's
// memory: it works under kernel lockdown, where bpf_probe_write_user is
// refused. A sock_ops program attached to the process's cgroup (v2) puts
// the process's outgoing TCP connections, and only those, in the sockhash
// that program runs on; a third uprobe, on
// net/http.(*persistConn).roundTrip, tells it which request the next write
// on a connection starts and what it carries. A request that already has a
// traceparent (set by the application or an instrumented Transport, in any
// letter case) is left exactly as it is. Not propagated: requests over TLS
// (the kernel sees their encrypted bytes), HTTP/2, connections other than
// *net.TCPConn (a custom DialContext's own net.Conn type), connections
// opened before the probe attached, and requests whose header block does
// not end within the first 4 KiB of their first write. Every request not
// propagated is counted, by reason: see PropagationStats and
// ClientRequest.Propagation. The exported spans carry the IDs sent in
// traceparent when the TracerProvider uses flowmill.IDGenerator.
//
// Metrics: http.server.request.duration and http.client.request.duration
// are aggregated in the kernel from every request, sampled or not (a
// histogram per series of metric attributes, each bucket with its count and
// sum), and recorded at each collection of the MeterProvider: exact counts
// and sums, nothing sent per request. Requests the table of series could
// not take are counted in flowmill.http.requests.unaggregated and in
// Stats.EventsLost. WithSampling decides sampling in the kernel, so that
// requests that are not sampled send nothing at all.
//
// Limits: only amd64 Linux is supported. Requests whose entry probe could
// not read the Request, or (on kernels that preempt uprobe programs) was
// overtaken on its CPU by another request's, are not traced, and are
// counted in Stats.EventsLost; an HTTP/2 request whose traceparent was read
// but could not be kept for its handler starts a trace of its own and is
// counted in Stats.Incomplete.
package http

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

// Option configures the probe.
type Option func(*Probe)

// WithMaxInFlight bounds the requests tracked at once in the kernel, for
// each of serving and sending (default 16384). Beyond it the oldest entries
// are evicted and counted in the session's Stats.Evicted.
// At most 1<<22.
func WithMaxInFlight(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("http.WithMaxInFlight", n, 1, 1<<22) {
			p.maxInFlight = uint32(n)
		}
	}
}

// WithStaleAfter sets how long a request may stay in flight before its
// entry is dropped as one that will never return (a handler that panicked,
// for instance): default 10 minutes. Dropped entries are counted in the
// session's Stats.Evicted.
// It must be at least a second.
func WithStaleAfter(d time.Duration) Option {
	return func(p *Probe) {
		if p.opts.Duration("http.WithStaleAfter", d, time.Second, 24*365*time.Hour) {
			p.staleAfter = d
		}
	}
}

// WithoutPropagation turns trace context propagation off: outgoing
// requests are sent as the program wrote them, and no socket program is
// loaded. Client spans are made all the same.
func WithoutPropagation() Option {
	return func(p *Probe) { p.propagate = false }
}

// WithSampling makes only the requests that are sampled send a record
// (ServerRequest, ClientRequest: a span each), the sampling decided in the
// kernel before anything is sent, as the OpenTelemetry SDK's
// ParentBased(TraceIDRatioBased(ratio)) sampler decides it: a request with
// a remote parent (an incoming traceparent) is sampled when its parent
// is; a trace flowmill starts is sampled when its trace ID falls under
// ratio by the rule of TraceIDRatioBased, so that an SDK sampler of the
// same ratio takes the same decision on the spans flowmill exports. The
// requests made while serving one follow it. ratio is between 0 and 1.
//
// The request metrics (http.server.request.duration and
// http.client.request.duration) count every request at any ratio: they
// are aggregated in the kernel, apart from the records. Requests that are
// not sampled still propagate their trace context (flagged not sampled).
//
// Without this option, the environment decides as it does for the SDK:
// OTEL_TRACES_SAMPLER set to parentbased_always_on (1),
// parentbased_always_off or always_off (0), traceidratio or
// parentbased_traceidratio (OTEL_TRACES_SAMPLER_ARG, 1 if it is not a
// ratio) turns sampling on; flowmill's decision is always parent-based.
// Otherwise (unset, always_on, other samplers) every request sends a
// record and the SDK's sampler alone decides what is exported. Status says
// which applies.
func WithSampling(ratio float64) Option {
	return func(p *Probe) {
		if !(ratio >= 0 && ratio <= 1) {
			p.opts.Fail(fmt.Sprintf("http.WithSampling(%v)", ratio), "the ratio must be between 0 and 1")
			return
		}
		p.sampling, p.sampleRatio, p.samplingSet = true, ratio, true
	}
}

// Probe is the HTTP probe family. Create it with New.
type Probe struct {
	maxInFlight uint32
	staleAfter  time.Duration
	propagate   bool
	opts        probe.Options
	// Sampling in the kernel (WithSampling, or the environment).
	sampling, samplingSet bool
	sampleRatio           float64

	mu     sync.Mutex
	status Status
	att    *attachment // the last Attach's, for PropagationStats
}

// Status says what the probe instrumented in its last Attach.
type Status struct {
	// Server and Client say whether serving and sending are instrumented.
	Server, Client bool
	// ServerHTTP2 says whether requests served over HTTP/2 (over TLS or
	// h2c) are instrumented too. When net/http's HTTP/2 ResponseWriter
	// could not be learnt from this program, they are not (Skipped says
	// why) and are counted as unsupported in the session's stats.
	ServerHTTP2 bool
	// Propagation says whether outgoing requests get W3C trace context
	// (plain-text HTTP/1 only: Skipped says what is not propagated).
	Propagation bool
	// PropagationErr says why propagation is not on although it was not
	// turned off (WithoutPropagation): an error wrapping
	// ErrPropagationUnavailable and the cause (probe.ErrNotSupported for a
	// kernel that refused the socket programs, for instance). Spans are
	// made all the same.
	PropagationErr error `json:"-"`
	// Sampling says whether only sampled requests send records
	// (WithSampling or OTEL_TRACES_SAMPLER), SamplingRatio the ratio of
	// the traces flowmill starts that are sampled then.
	Sampling      bool
	SamplingRatio float64
	// Skipped lists what was left out and why, such as the client when the
	// program never sends HTTP requests (the linker left the Transport
	// out), and what is not propagated.
	Skipped []string
}

// ErrPropagationUnavailable is wrapped by Status.PropagationErr when trace
// context propagation could not be set up.
var ErrPropagationUnavailable = errors.New("http: trace context propagation unavailable")

// New returns the HTTP probe, to pass to flowmill.WithProbes. It produces
// ServerRequest and ClientRequest.
func New(opts ...Option) *Probe {
	p := &Probe{maxInFlight: 16384, staleAfter: 10 * time.Minute, propagate: true, sampleRatio: 1}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("http")
			continue
		}
		o(p)
	}
	if !p.samplingSet {
		p.sampleRatio, p.sampling = samplingFromEnv()
	}
	return p
}

// totals returns the last Attach's request metrics, nil before one.
func (p *Probe) totals() requestTotals {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.att == nil {
		return nil
	}
	return p.att
}

// Name returns "http".
func (p *Probe) Name() string { return "http" }

// Prepare reports invalid options and declares the event types; the
// session calls it (see flowmill.New).
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[ServerRequest](b)
	probe.Produce[ClientRequest](b)
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
	serverFunc = "net/http.serverHandler.ServeHTTP"
	clientFunc = "net/http.(*Transport).roundTrip"
	// Only with propagation: its entry, no return.
	pconnFunc = "net/http.(*persistConn).roundTrip"
)

// What Status.Skipped says of propagation.
const (
	skippedTLS = "trace context propagation: requests over TLS (https) and HTTP/2 are not propagated: " +
		"the header is added to the bytes written to the socket, which are encrypted (or framed) there"
	skippedOff = "trace context propagation: off (WithoutPropagation)"
	skippedH2  = "HTTP/2 served requests: not instrumented (counted as unsupported): "
	// Only when what reads HTTP/2 header fields could not be set up
	// (see h2Context).
	skippedH2Context = "incoming trace context over HTTP/2: traceparent and tracestate are not read " +
		"(requests served over HTTP/2 start a trace of their own): "
)

// PropagationStats counts the client requests whose trace context was,
// and was not, propagated, by reason, since the last Attach (the final
// counts after the session closed). Losses are in the session's Stats as
// well: a connection opened before the probe attached, TLS, HTTP/2, other
// connection types and a header too large as Unsupported; kernel failures,
// full tables and a tracestate not passed on as Incomplete (the request
// was traced; ClientRequest.Propagation says what it lacked).
type PropagationStats struct {
	// Injected: traceparent (and tracestate) added.
	Injected uint64
	// Present: the request already had a traceparent, left as it was.
	Present uint64
	// TLS: sent over TLS, whose bytes the kernel sees encrypted.
	TLS uint64
	// HTTP2: answered without an HTTP/1 connection (HTTP/2, or a protocol
	// registered with Transport.RegisterProtocol).
	HTTP2 uint64
	// OtherConn: over a net.Conn that is not a *net.TCPConn (a custom
	// DialContext's own type).
	OtherConn uint64
	// Untracked: over a connection the probe does not track: opened
	// before it attached.
	Untracked uint64
	// HeaderTooLarge: the header block did not end within the first
	// 4 KiB of the request's first write.
	HeaderTooLarge uint64
	// NotHTTP1: the request's first write was not an HTTP/1 request line.
	NotHTTP1 uint64
	// Failed: a kernel table was full, the socket could not be found or
	// the bytes could not be inserted; the request was sent unchanged.
	Failed uint64
	// Unavailable: propagation could not be set up (Status.PropagationErr).
	Unavailable uint64
	// Unwritten: prepared for a request whose first write never came
	// (it failed before it was sent), removed when stale.
	Unwritten uint64
	// TracestateDropped: served requests whose tracestate could not be
	// kept (longer than 512 bytes, or a full table), and requests that
	// went out without it.
	TracestateDropped uint64
}

// PropagationStats returns the propagation counters of the last Attach.
func (p *Probe) PropagationStats() PropagationStats {
	p.mu.Lock()
	a := p.att
	p.mu.Unlock()
	if a == nil {
		return PropagationStats{}
	}
	return a.propagationStats()
}
