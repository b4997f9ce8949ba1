package grpc

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/flowmill/flowmill/internal/probe"
)

// metricServerDuration is the RPC server duration of the semantic
// conventions flowmill pins (v1.43.0: rpc.server.call.duration, seconds).
const (
	metricServerDuration = "rpc.server.call.duration"
	metricClientDuration = "rpc.client.call.duration"
)

// durationBuckets are the semantic conventions' advisory boundaries, hinted
// with flowmill.WithExplicitBuckets.
var durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}

// Attribute keys of the RPC conventions that semconv v1.43.0 replaced
// (rpc.system.name, rpc.response.status_code, a combined rpc.method) and
// that the span name {rpc.service}/{rpc.method} is made of; both are
// recorded.
const (
	attrSystem     = attribute.Key("rpc.system")
	attrService    = attribute.Key("rpc.service")
	attrMethod     = attribute.Key("rpc.method")
	attrStatusCode = attribute.Key("rpc.grpc.status_code")
)

// Telemetry maps the probe's events to OpenTelemetry; flowmill.NewExporter
// calls it (see probe.Telemetry). It records rpc.server.call.duration and
// makes a server span per RPC, named {rpc.service}/{rpc.method}
// ("grpc.health.v1.Health/Check"), with rpc.system and rpc.system.name
// "grpc", rpc.service, rpc.method (the method alone), rpc.grpc.status_code
// (the number) and rpc.response.status_code (its name, "NOT_FOUND"),
// server.port, network.peer.address and network.peer.port. Its status is
// Error for the codes the conventions count as server errors (Unknown,
// DeadlineExceeded, Unimplemented, Internal, Unavailable, DataLoss), with
// error.type the code's name; other codes are the client's business. An
// RPC whose traceparent metadata was read is a child of that remote span.
// The metric carries the same rpc.* attributes; server.port and
// network.peer.address as env.Attributes selects (AttrServerPort,
// AttrPeerAddress).
//
// Client RPCs are client spans and rpc.client.call.duration, with the same
// rpc.* attributes and server.address and server.port from the
// ClientConn's target; their status is Error for every code but OK. A
// client span is the child of the served RPC it was made for, by the IDs
// the probe gave that RPC's span: exported spans carry those IDs when the
// TracerProvider uses flowmill.IDGenerator (otherwise the client span
// names a parent that is not exported).
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	r := &recorder{tracer: env.Tracer, attrs: env.Attributes}
	opts := []metric.Float64HistogramOption{metric.WithUnit("s"),
		metric.WithDescription("Measures the duration of an incoming Remote Procedure Call (RPC).")}
	if env.ExplicitBuckets {
		opts = append(opts, metric.WithExplicitBucketBoundaries(durationBuckets...))
	}
	var err error
	if r.server, err = env.Meter.Float64Histogram(metricServerDuration, opts...); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	copts := append([]metric.Float64HistogramOption{metric.WithDescription("Measures the duration of an outgoing Remote Procedure Call (RPC).")}, opts[1:]...)
	copts = append(copts, metric.WithUnit("s"))
	if r.client, err = env.Meter.Float64Histogram(metricClientDuration, copts...); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	if r.servers, err = probe.Subscribe[ServerRPC](env.Bus, env.Buffer); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	if r.clients, err = probe.Subscribe[ClientRPC](env.Bus, env.Buffer); err != nil {
		r.servers.Close()
		return nil, fmt.Errorf("grpc: %w", err)
	}
	return r, nil
}

type recorder struct {
	tracer  trace.Tracer
	attrs   probe.Attributes
	server  metric.Float64Histogram
	client  metric.Float64Histogram
	servers *probe.Sub[ServerRPC]
	clients *probe.Sub[ClientRPC]
}

// Run records events until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.servers.Close()
	defer r.clients.Close()
	servers, clients := r.servers.C(), r.clients.C()
	for servers != nil || clients != nil {
		select {
		case <-stop:
			r.drain(servers, clients)
			return nil
		case s, ok := <-servers:
			if !ok {
				servers = nil
				continue
			}
			r.record(&s)
		case c, ok := <-clients:
			if !ok {
				clients = nil
				continue
			}
			r.recordClient(&c)
		}
	}
	return nil
}

// drain records what is buffered.
func (r *recorder) drain(servers <-chan ServerRPC, clients <-chan ClientRPC) {
	for servers != nil || clients != nil {
		select {
		case s, ok := <-servers:
			if !ok {
				servers = nil
				continue
			}
			r.record(&s)
		case c, ok := <-clients:
			if !ok {
				clients = nil
				continue
			}
			r.recordClient(&c)
		default:
			return
		}
	}
}

// codeNames are the status codes' names in the conventions
// (rpc.response.status_code).
var codeNames = [...]string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
	"OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "_OTHER"
}

// serverError reports whether code c makes a server span an error (OTel
// gRPC conventions).
func serverError(c codes.Code) bool {
	switch c {
	case codes.Unknown, codes.DeadlineExceeded, codes.Unimplemented, codes.Internal, codes.Unavailable, codes.DataLoss:
		return true
	}
	return false
}

func (r *recorder) record(s *ServerRPC) {
	attrs, name := rpcAttrs(make([]attribute.KeyValue, 0, 12), s.Service, s.Method, s.Code, s.StatusKnown)
	failed := s.StatusKnown && serverError(s.Code)
	if failed {
		attrs = append(attrs, semconv.ErrorTypeKey.String(codeName(s.Code)))
	}
	mattrs := attrs
	if s.ServerPort > 0 && r.attrs.Has(probe.AttrServerPort) {
		mattrs = append(mattrs, semconv.ServerPort(s.ServerPort))
	}
	if s.Peer.IsValid() && r.attrs.Has(probe.AttrPeerAddress) {
		mattrs = append(mattrs, semconv.NetworkPeerAddress(s.Peer.Addr().String()))
	}
	r.server.Record(context.Background(), s.Duration().Seconds(), metric.WithAttributes(mattrs...))

	if s.ServerPort > 0 {
		attrs = append(attrs, semconv.ServerPort(s.ServerPort))
	}
	if s.Peer.IsValid() {
		attrs = append(attrs, semconv.NetworkPeerAddress(s.Peer.Addr().String()), semconv.NetworkPeerPort(int(s.Peer.Port())))
	}
	ctx := context.Background()
	if s.Span.RemoteParent {
		flags := trace.TraceFlags(0)
		if s.Span.Sampled {
			flags = trace.FlagsSampled
		}
		ctx = trace.ContextWithRemoteSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: s.Span.TraceID, SpanID: s.Span.ParentSpanID, TraceFlags: flags, Remote: true}))
	}
	ids := probe.SpanIDs{TraceID: s.Span.TraceID, SpanID: s.Span.SpanID}
	_, span := r.tracer.Start(probe.ContextWithSpanIDs(ctx, ids), name, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithTimestamp(s.Start), trace.WithAttributes(attrs...))
	if failed {
		span.SetStatus(otelcodes.Error, codeName(s.Code))
	}
	span.End(trace.WithTimestamp(s.End))
}

// rpcAttrs are the rpc.* attributes of an RPC.
func rpcAttrs(attrs []attribute.KeyValue, service, method string, code codes.Code, known bool) ([]attribute.KeyValue, string) {
	name := service + "/" + method
	if service == "" {
		method, name = "_OTHER", "_OTHER" // a malformed :path
	}
	attrs = append(attrs, attrSystem.String("grpc"), semconv.RPCSystemNameGRPC, attrMethod.String(method))
	if service != "" {
		attrs = append(attrs, attrService.String(service))
	}
	if known {
		attrs = append(attrs, attrStatusCode.Int(int(code)), semconv.RPCResponseStatusCode(codeName(code)))
	}
	return attrs, name
}

// splitTarget takes the host and port from a dial target
// ("dns:///api:443", "passthrough:///127.0.0.1:50051", "api:443").
func splitTarget(target string) (string, int) {
	if i := strings.Index(target, "://"); i >= 0 {
		target = target[i+3:]
		if j := strings.IndexByte(target, '/'); j >= 0 {
			target = target[j+1:]
		}
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return target, 0
	}
	p, _ := strconv.Atoi(port)
	return host, p
}

func (r *recorder) recordClient(c *ClientRPC) {
	attrs, name := rpcAttrs(make([]attribute.KeyValue, 0, 12), c.Service, c.Method, c.Code, true)
	host, port := splitTarget(c.Target)
	if host != "" {
		attrs = append(attrs, semconv.ServerAddress(host))
	}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	if c.Code != codes.OK {
		attrs = append(attrs, semconv.ErrorTypeKey.String(codeName(c.Code)))
	}
	r.client.Record(context.Background(), c.Duration().Seconds(), metric.WithAttributes(attrs...))
	ctx := context.Background()
	if c.Span.ParentSpanID.IsValid() {
		flags := trace.TraceFlags(0)
		if c.Span.Sampled {
			flags = trace.FlagsSampled
		}
		ctx = trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: c.Span.TraceID, SpanID: c.Span.ParentSpanID, TraceFlags: flags}))
	}
	ids := probe.SpanIDs{TraceID: c.Span.TraceID, SpanID: c.Span.SpanID}
	_, span := r.tracer.Start(probe.ContextWithSpanIDs(ctx, ids), name, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(c.Start), trace.WithAttributes(attrs...))
	if c.Code != codes.OK {
		span.SetStatus(otelcodes.Error, codeName(c.Code))
	}
	span.End(trace.WithTimestamp(c.End))
}
