package http

import (
	"encoding/json"
	"fmt"
	"net/netip"
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
	// Sampled is the traceparent's sampled flag (server requests with a
	// remote parent only).
	Sampled bool
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

// ServerRequest is an HTTP/1 request the program served, published when its
// handler returned.
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
	// Peer is the client's address (Request.RemoteAddr).
	Peer netip.AddrPort
	// StatusCode is the status sent; a handler that wrote nothing sends
	// 200. It is 0 when the handler hijacked the connection.
	StatusCode int
	// RequestBodySize is the declared Content-Length, -1 when unknown
	// (chunked).
	RequestBodySize int64
	// ResponseBodySize is the number of body bytes the handler wrote.
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
	// StatusCode is the response's status, 0 when there was none.
	StatusCode int
	// RequestBodySize is the declared request Content-Length (-1: unknown);
	// ResponseBodySize the response's (-1: unknown).
	RequestBodySize, ResponseBodySize int64
	// Error is the Go type of the error the Transport returned, such as
	// "*net.OpError" (the OTel error.type), empty on success.
	Error string
	Span  SpanContext
	// Parent says how the parent span was found.
	Parent ParentLink
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
