package http

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/probes"
)

// Metric names (OpenTelemetry HTTP semantic conventions).
const (
	metricServerDuration = "http.server.request.duration"
	metricClientDuration = "http.client.request.duration"
)

// durationBuckets are the semantic conventions' advisory boundaries, hinted
// with flowmill.WithExplicitBuckets.
var durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}

// Telemetry maps the probe's events to OpenTelemetry; flowmill.NewExporter
// calls it (see probes.Telemetry). It records http.server.request.duration
// and http.client.request.duration, and makes a span per request.
//
// The OpenTelemetry API lets the SDK choose span IDs, so the spans carry
// the SDK's IDs, not the events': the structure is kept instead. A server
// span with a traceparent is the child of that remote span (same trace
// ID); a client span is the child of its server span. The server span ends
// after its client requests, so a client span waits for it (at most
// parentWait, then it is recorded as the child of the event's IDs, which
// no exported span carries).
func (p *Probe) Telemetry(env *probes.TelemetryEnv) (probes.Recorder, error) {
	r := &recorder{
		tracer:      env.Tracer,
		lastRetrans: make(map[netip.AddrPort]uint32),
		pending:     make(map[trace.SpanID][]pendingClient),
		done:        make(map[trace.SpanID]doneServer),
	}
	// With a TCP family in the session, server spans carry what the kernel
	// knows of their connection.
	r.tcp, _ = probes.Lookup[probes.TCPConns](env.Bus)
	var opts []metric.Float64HistogramOption
	if env.ExplicitBuckets {
		opts = append(opts, metric.WithExplicitBucketBoundaries(durationBuckets...))
	}
	var e1, e2 error
	r.server, e1 = env.Meter.Float64Histogram(metricServerDuration, append(opts, metric.WithUnit("s"),
		metric.WithDescription("Duration of HTTP server requests."))...)
	r.client, e2 = env.Meter.Float64Histogram(metricClientDuration, append(opts, metric.WithUnit("s"),
		metric.WithDescription("Duration of HTTP client requests."))...)
	if err := errors.Join(e1, e2); err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	var err error
	if r.servers, err = probes.Subscribe[ServerRequest](env.Bus, env.Buffer); err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	if r.clients, err = probes.Subscribe[ClientRequest](env.Bus, env.Buffer); err != nil {
		r.servers.Close()
		return nil, fmt.Errorf("http: %w", err)
	}
	return r, nil
}

const (
	parentWait = time.Minute // how long a client span waits for its server span
	maxPending = 1 << 14     // client spans waiting, at most
	maxDone    = 1 << 14     // recorded server spans remembered for late children
)

type recorder struct {
	tracer           trace.Tracer
	server, client   metric.Float64Histogram
	servers          *probes.Sub[ServerRequest]
	clients          *probes.Sub[ClientRequest]
	pending          map[trace.SpanID][]pendingClient // by the event's parent span ID
	nPending         int
	done             map[trace.SpanID]doneServer // event span ID -> exported span
	doneOld, doneNew map[trace.SpanID]doneServer

	tcp         probes.TCPConns           // nil without a TCP family
	lastRetrans map[netip.AddrPort]uint32 // by peer: the connection's retransmits at its last request
}

// maxConns bounds lastRetrans; past it, the table starts over.
const maxConns = 1 << 14

// tcpAttrs returns what the TCP family knows of a served request's
// connection when the request is recorded (at most the session's read
// latency after the handler returned): its RTT, and the segments it
// retransmitted since the previous request on the connection ended (or
// since it opened), so that a slow request can be told apart from a slow
// network.
func (r *recorder) tcpAttrs(peer netip.AddrPort) []attribute.KeyValue {
	if r.tcp == nil || !peer.IsValid() {
		return nil
	}
	info, ok := r.tcp.TCPConn(netip.AddrPort{}, peer)
	if !ok {
		return nil
	}
	retrans := info.Retransmits
	if last, ok := r.lastRetrans[peer]; ok && last <= retrans {
		retrans -= last
	}
	if len(r.lastRetrans) >= maxConns {
		clear(r.lastRetrans)
	}
	r.lastRetrans[peer] = info.Retransmits
	return []attribute.KeyValue{
		attribute.Float64(attrTCPSRTT, info.SRTT.Seconds()),
		attribute.Float64(attrTCPMinRTT, info.MinRTT.Seconds()),
		attribute.Int64(attrTCPRetransmits, int64(retrans)),
	}
}

// Span attributes from the TCP family (see tcpAttrs); the names are those
// of probes/tcp's connection spans.
const (
	attrTCPSRTT        = "flowmill.tcp.srtt"
	attrTCPMinRTT      = "flowmill.tcp.min_rtt"
	attrTCPRetransmits = "flowmill.tcp.retransmits"
)

type pendingClient struct {
	c       ClientRequest
	arrived time.Time
}

type doneServer struct{ sc trace.SpanContext }

// Run records events until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.release()
	tick := time.NewTicker(parentWait / 4)
	defer tick.Stop()
	servers, clients := r.servers.C(), r.clients.C()
	for servers != nil || clients != nil {
		select {
		case <-stop:
			r.drain()
			return nil
		case <-tick.C:
			r.expire(time.Now().Add(-parentWait))
		case s, ok := <-servers:
			if !ok {
				servers = nil
				continue
			}
			r.recordServer(&s)
		case c, ok := <-clients:
			if !ok {
				clients = nil
				continue
			}
			r.recordClient(&c)
		}
	}
	r.expire(time.Now().Add(time.Hour))
	return nil
}

func (r *recorder) drain() {
	servers, clients := r.servers.C(), r.clients.C()
	for servers != nil || clients != nil {
		select {
		case s, ok := <-servers:
			if !ok {
				servers = nil
				continue
			}
			r.recordServer(&s)
		case c, ok := <-clients:
			if !ok {
				clients = nil
				continue
			}
			r.recordClient(&c)
		default:
			servers, clients = nil, nil
		}
	}
	r.expire(time.Now().Add(time.Hour))
}

func (r *recorder) release() {
	r.servers.Close()
	r.clients.Close()
	clear(r.pending)
	clear(r.done)
	clear(r.lastRetrans)
}

func (r *recorder) recordServer(s *ServerRequest) {
	method := methodOf(s.Method)
	attrs := []attribute.KeyValue{semconv.HTTPRequestMethodKey.String(method), semconv.HTTPResponseStatusCode(s.StatusCode)}
	if s.Route != "" {
		attrs = append(attrs, semconv.HTTPRoute(s.Route))
	}
	if s.StatusCode >= 500 {
		attrs = append(attrs, semconv.ErrorTypeKey.String(strconv.Itoa(s.StatusCode)))
	}
	r.server.Record(context.Background(), s.Duration().Seconds(), metric.WithAttributes(attrs...))

	ctx := context.Background()
	if s.Span.RemoteParent {
		flags := trace.TraceFlags(0)
		if s.Span.Sampled {
			flags = trace.FlagsSampled
		}
		ctx = trace.ContextWithRemoteSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: s.Span.TraceID, SpanID: s.Span.ParentSpanID, TraceFlags: flags, Remote: true}))
	}
	name := method
	if s.Route != "" {
		name += " " + s.Route
	}
	host, port := splitHostPort(s.Host)
	attrs = append(attrs, semconv.URLPath(s.Path), semconv.URLScheme("http"),
		semconv.HTTPRequestBodySize(int(s.RequestBodySize)), semconv.HTTPResponseBodySize(int(s.ResponseBodySize)))
	if host != "" {
		attrs = append(attrs, semconv.ServerAddress(host))
	}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	if s.Peer.IsValid() {
		attrs = append(attrs, semconv.NetworkPeerAddress(s.Peer.Addr().String()), semconv.NetworkPeerPort(int(s.Peer.Port())),
			semconv.ClientAddress(s.Peer.Addr().String()))
	}
	attrs = append(attrs, r.tcpAttrs(s.Peer)...)
	ctx, span := r.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithTimestamp(s.Start), trace.WithAttributes(attrs...))
	if s.StatusCode >= 500 {
		span.SetStatus(codes.Error, "")
	}
	span.End(trace.WithTimestamp(s.End))
	sc := span.SpanContext()
	r.remember(s.Span.SpanID, sc)
	for _, p := range r.pending[s.Span.SpanID] {
		r.clientSpan(trace.ContextWithSpanContext(ctx, sc), &p.c)
	}
	r.nPending -= len(r.pending[s.Span.SpanID])
	delete(r.pending, s.Span.SpanID)
}

// remember keeps the exported span of a server event for client events
// that arrive after it, in two generations (bounded memory).
func (r *recorder) remember(id trace.SpanID, sc trace.SpanContext) {
	if r.doneNew == nil {
		r.doneNew = r.done
	}
	if len(r.doneNew) >= maxDone/2 {
		r.doneOld, r.doneNew = r.doneNew, make(map[trace.SpanID]doneServer)
		r.done = r.doneNew
	}
	r.doneNew[id] = doneServer{sc}
}

func (r *recorder) recordClient(c *ClientRequest) {
	method := methodOf(c.Method)
	host, port := splitHostPort(c.Host)
	attrs := []attribute.KeyValue{semconv.HTTPRequestMethodKey.String(method), semconv.ServerAddress(host)}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	if c.StatusCode > 0 {
		attrs = append(attrs, semconv.HTTPResponseStatusCode(c.StatusCode))
	}
	if et := errorTypeOf(c); et != "" {
		attrs = append(attrs, semconv.ErrorTypeKey.String(et))
	}
	r.client.Record(context.Background(), c.Duration().Seconds(), metric.WithAttributes(attrs...))

	if c.Parent == NoParent {
		r.clientSpan(context.Background(), c)
		return
	}
	for _, m := range []map[trace.SpanID]doneServer{r.doneNew, r.doneOld} {
		if d, ok := m[c.Span.ParentSpanID]; ok {
			r.clientSpan(trace.ContextWithSpanContext(context.Background(), d.sc), c)
			return
		}
	}
	if r.nPending >= maxPending {
		r.orphan(c)
		return
	}
	r.pending[c.Span.ParentSpanID] = append(r.pending[c.Span.ParentSpanID], pendingClient{*c, time.Now()})
	r.nPending++
}

// expire records the client spans that waited since before cutoff for a
// server span that did not come.
func (r *recorder) expire(cutoff time.Time) {
	for id, ps := range r.pending {
		if ps[0].arrived.After(cutoff) {
			continue
		}
		for i := range ps {
			r.orphan(&ps[i].c)
		}
		r.nPending -= len(ps)
		delete(r.pending, id)
	}
}

// orphan records a client span as the child of its parent's event IDs.
func (r *recorder) orphan(c *ClientRequest) {
	ctx := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: c.Span.TraceID, SpanID: c.Span.ParentSpanID}))
	r.clientSpan(ctx, c)
}

func (r *recorder) clientSpan(ctx context.Context, c *ClientRequest) {
	host, port := splitHostPort(c.Host)
	attrs := []attribute.KeyValue{semconv.HTTPRequestMethodKey.String(methodOf(c.Method)),
		semconv.ServerAddress(host), semconv.URLPath(c.Path)}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	if c.StatusCode > 0 {
		attrs = append(attrs, semconv.HTTPResponseStatusCode(c.StatusCode))
	}
	if c.RequestBodySize >= 0 {
		attrs = append(attrs, semconv.HTTPRequestBodySize(int(c.RequestBodySize)))
	}
	et := errorTypeOf(c)
	if et != "" {
		attrs = append(attrs, semconv.ErrorTypeKey.String(et))
	}
	_, span := r.tracer.Start(ctx, methodOf(c.Method), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(c.Start), trace.WithAttributes(attrs...))
	if et != "" {
		span.SetStatus(codes.Error, c.Error)
	}
	span.End(trace.WithTimestamp(c.End))
}

// errorTypeOf is the error.type of a client request: the Go type of the
// Transport's error, or the status code of a 4xx/5xx response.
func errorTypeOf(c *ClientRequest) string {
	if c.Error != "" {
		return c.Error
	}
	if c.StatusCode >= 400 {
		return strconv.Itoa(c.StatusCode)
	}
	return ""
}

// methodOf keeps the methods the semantic conventions know; others are
// _OTHER, so that a client cannot make a metric series per method name.
func methodOf(m string) string {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY":
		return m
	}
	return "_OTHER"
}

func splitHostPort(hp string) (string, int) {
	host, p, err := net.SplitHostPort(hp)
	if err != nil {
		return hp, 0
	}
	port, _ := strconv.Atoi(p)
	return host, port
}
