package grpc

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
)

// SpanContext identifies an RPC's span and its parent.
type SpanContext struct {
	// TraceID is the trace: the incoming traceparent's for an RPC that
	// carried one, a new random ID otherwise.
	TraceID trace.TraceID
	// SpanID is this RPC's span, a random ID.
	SpanID trace.SpanID
	// ParentSpanID is the parent span; zero for a root span.
	ParentSpanID trace.SpanID
	// RemoteParent says the parent came from traceparent metadata (it is
	// another process's span).
	RemoteParent bool
	// Sampled is, for a served RPC with a remote parent, its
	// traceparent's sampled flag; for a client RPC, its trace's: false
	// only when the served RPC or HTTP request it belongs to came with an
	// unsampled traceparent (its span is then not recorded by a
	// parent-based sampler, like its parent's).
	Sampled bool
}

// ServerRPC is an RPC served by the program with google.golang.org/grpc,
// unary or streaming: one event per RPC, when its status has been sent
// and its handler returned.
type ServerRPC struct {
	// Start is when grpc-go dispatched the RPC to its handler (after its
	// request headers were read); End when the handler had returned and
	// the status was sent.
	Start, End time.Time
	// FullMethod is the RPC's method as sent by the client:
	// "/grpc.health.v1.Health/Check".
	FullMethod string
	// Service and Method are its two parts: "grpc.health.v1.Health" and
	// "Check" (empty when FullMethod is malformed).
	Service, Method string
	// Code is the status code sent. StatusKnown is false when no status
	// was seen being sent (then Code is OK and means nothing).
	Code        codes.Code
	StatusKnown bool
	// Peer is the client's address (zero when the connection is not TCP).
	Peer netip.AddrPort
	// ServerPort is the local port the RPC came in on (0: unknown).
	ServerPort int
	// StreamID is the RPC's HTTP/2 stream ID.
	StreamID uint32
	// Span is the RPC's span and its parent.
	Span SpanContext
	// Goroutine is the ID of the goroutine that ran the handler (0:
	// unknown).
	Goroutine uint64
	// PID and TID are the process and the thread the RPC started on.
	PID, TID uint32
}

// ParentLink says how a client RPC found its parent.
type ParentLink uint8

// How a client RPC was attached to the RPC being served.
const (
	// NoParent: made outside any served RPC or HTTP request (or from a
	// goroutine and context the probe cannot relate to one); it starts a
	// trace.
	NoParent ParentLink = iota
	// ParentByContext: its context is, or derives from, the served RPC's
	// (the handler's ctx) or the served HTTP request's (r.Context()), on
	// any goroutine.
	ParentByContext
	// ParentByGoroutine: made on the goroutine serving the RPC or the
	// HTTP request.
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

// MarshalText writes the name.
func (l ParentLink) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (l *ParentLink) UnmarshalText(b []byte) error {
	for _, v := range []ParentLink{NoParent, ParentByContext, ParentByGoroutine} {
		if v.String() == string(b) {
			*l = v
			return nil
		}
	}
	return fmt.Errorf("unknown parent link %q", b)
}

// ClientRPC is an RPC the program made with a google.golang.org/grpc
// ClientConn: a unary one (Invoke, what generated stubs call), from the
// call to its return; or a stream (NewStream), from its creation to its
// end (its status received, or its failure or cancellation).
type ClientRPC struct {
	// Start and End bound the RPC.
	Start, End time.Time
	// FullMethod, Service and Method are as in ServerRPC.
	FullMethod, Service, Method string
	// Target is the ClientConn's dial target ("dns:///api:443",
	// "passthrough:///127.0.0.1:50051"), cut to 64 bytes.
	Target string
	// Code is the status the call ended with (Unknown for an error that
	// is not a gRPC status).
	Code codes.Code
	// Span is the RPC's span; its parent is the served RPC, or the
	// request served over net/http (see ParentHTTP), it was made for (see
	// Parent).
	Span SpanContext
	// Parent says how the parent was found.
	Parent ParentLink
	// ParentHTTP says the parent is a request served over net/http,
	// traced by the HTTP family (probes/http), rather than a served RPC.
	ParentHTTP bool
	// Goroutine is the ID of the goroutine that made the call (0:
	// unknown).
	Goroutine uint64
	// PID and TID are the process and the thread the call started on.
	PID, TID uint32
}

// Duration is End - Start.
func (r *ClientRPC) Duration() time.Duration { return r.End.Sub(r.Start) }

// Duration is End - Start.
func (r *ServerRPC) Duration() time.Duration { return r.End.Sub(r.Start) }

// splitMethod cuts "/service/method" into its parts (substrings of full).
func splitMethod(full string) (service, method string) {
	s := strings.TrimPrefix(full, "/")
	i := strings.LastIndexByte(s, '/')
	if i <= 0 || i == len(s)-1 {
		return "", ""
	}
	return s[:i], s[i+1:]
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
	*s = SpanContext{RemoteParent: j.RemoteParent, Sampled: j.Sampled}
	var err error
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
