package http

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// SpanContext identifies a request's span and its parent.
type SpanContext struct {
	// TraceID is the trace: the incoming traceparent's for a server request
	// that carried one, the parent's for a client request made while
	// serving one, a new random ID otherwise.
	TraceID trace.TraceID
	// SpanID is this request's span, a random ID.
	SpanID trace.SpanID
	// ParentSpanID is the parent span; zero for a root span.
	ParentSpanID trace.SpanID
	// RemoteParent says the parent came from a traceparent header (it is
	// another process's span).
	RemoteParent bool
	// Sampled is, for a server request with a remote parent, its
	// traceparent's sampled flag, and for a trace flowmill started,
	// whether it sampled it (always, without WithSampling); for a client
	// request, the sampled flag it propagates: its parent's, or its own
	// decision when it has none.
	Sampled bool
}

// Propagation says what became of a client request's trace context.
type Propagation uint8

// Outcomes of propagation (see PropagationStats for the counts).
const (
	// PropagationNone: not attempted: propagation is off, or the request
	// failed before it was given a connection.
	PropagationNone Propagation = iota
	// PropagationPending: prepared, and the request had not been written
	// when its response came (or it never was).
	PropagationPending
	// PropagationInjected: it carried traceparent (and tracestate).
	PropagationInjected
	// PropagationPresent: it had a traceparent of its own, sent as it was.
	PropagationPresent
	// PropagationTLS: sent over TLS, not propagated.
	PropagationTLS
	// PropagationHTTP2: not sent over an HTTP/1 connection (HTTP/2), not
	// propagated.
	PropagationHTTP2
	// PropagationOtherConn: over a net.Conn other than *net.TCPConn, not
	// propagated.
	PropagationOtherConn
	// PropagationUntracked: over a connection opened before the probe
	// attached, not propagated.
	PropagationUntracked
	// PropagationHeaderTooLarge: its header block did not end within the
	// first 4 KiB of its first write, not propagated.
	PropagationHeaderTooLarge
	// PropagationNotHTTP1: its first write was not an HTTP/1 request
	// line, not propagated.
	PropagationNotHTTP1
	// PropagationFailed: a kernel table was full or an operation failed,
	// sent unchanged.
	PropagationFailed
	// PropagationUnavailable: propagation could not be set up (see
	// Status.PropagationErr).
	PropagationUnavailable
)

var propagationNames = [...]string{"none", "pending", "injected", "present", "tls", "http2",
	"other_conn", "untracked", "header_too_large", "not_http1", "failed", "unavailable"}

// String returns the outcome's name: "injected", "tls", ...
func (p Propagation) String() string {
	if int(p) < len(propagationNames) {
		return propagationNames[p]
	}
	return fmt.Sprintf("Propagation(%d)", uint8(p))
}

// MarshalText writes the name.
func (p Propagation) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (p *Propagation) UnmarshalText(b []byte) error {
	for i, n := range propagationNames {
		if n == string(b) {
			*p = Propagation(i)
			return nil
		}
	}
	return fmt.Errorf("unknown propagation outcome %q", b)
}

// ProtocolVersion is the HTTP version a request was exchanged with (the
// network.protocol.version attribute): {1, 1} for HTTP/1.1, {2, 0} for
// HTTP/2; zero when unknown (a client request that got no response).
type ProtocolVersion struct{ Major, Minor uint8 }

// String returns "1.0", "1.1", "2" (the semantic conventions' form), or ""
// for the zero value.
func (v ProtocolVersion) String() string {
	switch {
	case v.Major == 0 && v.Minor == 0:
		return ""
	case v.Major >= 2 && v.Minor == 0:
		return strconv.Itoa(int(v.Major))
	}
	return strconv.Itoa(int(v.Major)) + "." + strconv.Itoa(int(v.Minor))
}

// MarshalText writes String.
func (v ProtocolVersion) MarshalText() ([]byte, error) { return []byte(v.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (v *ProtocolVersion) UnmarshalText(b []byte) error {
	*v = ProtocolVersion{}
	if len(b) == 0 {
		return nil
	}
	maj, min, _ := strings.Cut(string(b), ".")
	a, err1 := strconv.ParseUint(maj, 10, 8)
	var c uint64
	var err2 error
	if min != "" {
		c, err2 = strconv.ParseUint(min, 10, 8)
	}
	if err1 != nil || err2 != nil || a == 0 {
		return fmt.Errorf("bad HTTP version %q", b)
	}
	*v = ProtocolVersion{uint8(a), uint8(c)}
	return nil
}

// Scheme is a request's URL scheme (the url.scheme attribute).
type Scheme uint8

// Schemes.
const (
	// SchemeUnknown: not known (a client request whose URL scheme is
	// neither http nor https, made through Transport.RegisterProtocol).
	SchemeUnknown Scheme = iota
	// SchemeHTTP: plain text (HTTP/1, or HTTP/2 with prior knowledge, h2c).
	SchemeHTTP
	// SchemeHTTPS: over TLS. A served request is https when
	// Request.TLS is set.
	SchemeHTTPS
)

// String returns "http", "https", or "" when unknown.
func (s Scheme) String() string {
	switch s {
	case SchemeHTTP:
		return "http"
	case SchemeHTTPS:
		return "https"
	}
	return ""
}

// MarshalText writes String.
func (s Scheme) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (s *Scheme) UnmarshalText(b []byte) error {
	switch string(b) {
	case "":
		*s = SchemeUnknown
	case "http":
		*s = SchemeHTTP
	case "https":
		*s = SchemeHTTPS
	default:
		return fmt.Errorf("unknown scheme %q", b)
	}
	return nil
}

// ParentLink says how a client request found its parent.
type ParentLink uint8

// How a client request was attached to the request being served.
const (
	// NoParent: the request was made outside any served request (or from a
	// goroutine and context the probe cannot relate to one); it starts a
	// new trace.
	NoParent ParentLink = iota
	// ParentByContext: the client request's context is, or derives from,
	// the served request's context (r.Context()), on any goroutine.
	ParentByContext
	// ParentByGoroutine: the client request was made on the goroutine
	// serving the request.
	ParentByGoroutine
)

// String returns "none", "context" or "goroutine".
func (l ParentLink) String() string {
	switch l {
	case ParentByContext:
		return "context"
	case ParentByGoroutine:
		return "goroutine"
	}
	return "none"
}

// ServerRequest is a request the program served with net/http (HTTP/1.x
// or HTTP/2, in plain text or over TLS), published when its handler
// returned.
type ServerRequest struct {
	// Start is when the handler was called (the request line and headers
	// had been read); End is when it returned.
	Start, End time.Time
	// Method is the request method (at most 16 bytes).
	Method string
	// Path is the URL path, without the query (at most 128 bytes).
	Path string
	// Pattern is the ServeMux pattern that matched, as registered
	// ("GET /users/{id}"), empty when the handler is not a ServeMux or no
	// pattern matched; Route is its path part ("/users/{id}"), the
	// http.route attribute. A middleware that hands the mux a copy of the
	// request (r.WithContext) hides the pattern from the probe.
	Pattern, Route string
	// Host is the Host header (at most 64 bytes).
	Host string
	// ProtocolVersion is Request.ProtoMajor and ProtoMinor: 1.1, 2, ...
	ProtocolVersion ProtocolVersion
	// Scheme is https when the request came over TLS (Request.TLS is
	// set), http otherwise.
	Scheme Scheme
	// Peer is the client's address (Request.RemoteAddr).
	Peer netip.AddrPort
	// StatusCode is the status sent; a handler that wrote nothing sends
	// 200. It is 0 when the handler hijacked the connection.
	StatusCode int
	// RequestBodySize is the declared Content-Length, -1 when unknown
	// (chunked).
	RequestBodySize int64
	// ResponseBodySize is the number of body bytes the handler wrote
	// through the ResponseWriter; what it wrote on a connection it
	// hijacked is not counted.
	ResponseBodySize int64
	// Hijacked says the handler took over the connection (WebSocket, for
	// instance).
	Hijacked bool
	Span     SpanContext
	// Goroutine is the ID of the goroutine that served the request.
	Goroutine uint64
	// PID and TID are the process and the thread the handler returned on.
	PID, TID uint32
}

// Duration is End - Start.
func (r *ServerRequest) Duration() time.Duration { return r.End.Sub(r.Start) }

// ClientRequest is an HTTP request the program sent with a net/http
// Transport (one per attempt: redirects and retries are separate requests),
// published when the Transport returned the response headers or an error.
type ClientRequest struct {
	// Start is when the Transport was called; End is when it returned, with
	// the response headers (the body is read afterwards, by the caller).
	Start, End time.Time
	// Method is the request method (at most 16 bytes).
	Method string
	// Host is the URL's host[:port] (at most 64 bytes); Path its path (at
	// most 128 bytes).
	Host, Path string
	// Scheme is the URL's scheme (https: over TLS, HTTP/1.1 or HTTP/2 as
	// negotiated).
	Scheme Scheme
	// ProtocolVersion is the response's version (Response.ProtoMajor and
	// ProtoMinor), zero when there was no response.
	ProtocolVersion ProtocolVersion
	// StatusCode is the response's status, 0 when there was none.
	StatusCode int
	// RequestBodySize is the declared request Content-Length (-1: unknown);
	// ResponseBodySize the response's (-1: unknown).
	RequestBodySize, ResponseBodySize int64
	// Error is the Go type of the error the Transport returned, such as
	// "*net.OpError" (the OTel error.type), empty on success; "_OTHER"
	// when the type could not be resolved (the session counts such
	// events as incomplete).
	Error string
	Span  SpanContext
	// Parent says how the parent span was found.
	Parent ParentLink
	// Propagation says whether the request carried its trace context
	// (traceparent) to the server, and if not, why.
	Propagation Propagation
	// Goroutine is the ID of the goroutine that sent the request.
	Goroutine uint64
	// PID and TID are the process and the thread the Transport returned on.
	PID, TID uint32
}

// Duration is End - Start.
func (r *ClientRequest) Duration() time.Duration { return r.End.Sub(r.Start) }

// routeOf returns the path part of a ServeMux pattern
// "[METHOD ][HOST]/[PATH]".
func routeOf(pattern string) string {
	if i := strings.IndexAny(pattern, " \t"); i >= 0 {
		pattern = strings.TrimLeft(pattern[i:], " \t")
	}
	if i := strings.IndexByte(pattern, '/'); i > 0 {
		pattern = pattern[i:]
	}
	return pattern
}

type spanJSON struct {
	TraceID      string `json:"trace_id"`
	SpanID       string `json:"span_id"`
	ParentSpanID string `json:"parent_span_id,omitempty"`
	RemoteParent bool   `json:"remote_parent,omitempty"`
	Sampled      bool   `json:"sampled,omitempty"`
}

// MarshalJSON writes the IDs in hex, as in traceparent; a root span has no
// parent_span_id.
func (s SpanContext) MarshalJSON() ([]byte, error) {
	j := spanJSON{TraceID: s.TraceID.String(), SpanID: s.SpanID.String(), RemoteParent: s.RemoteParent, Sampled: s.Sampled}
	if s.ParentSpanID.IsValid() {
		j.ParentSpanID = s.ParentSpanID.String()
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads what MarshalJSON writes.
func (s *SpanContext) UnmarshalJSON(b []byte) error {
	var j spanJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	var err error
	*s = SpanContext{RemoteParent: j.RemoteParent, Sampled: j.Sampled}
	if s.TraceID, err = trace.TraceIDFromHex(j.TraceID); err != nil {
		return fmt.Errorf("span context: trace_id: %w", err)
	}
	if s.SpanID, err = trace.SpanIDFromHex(j.SpanID); err != nil {
		return fmt.Errorf("span context: span_id: %w", err)
	}
	if j.ParentSpanID != "" {
		if s.ParentSpanID, err = trace.SpanIDFromHex(j.ParentSpanID); err != nil {
			return fmt.Errorf("span context: parent_span_id: %w", err)
		}
	}
	return nil
}
