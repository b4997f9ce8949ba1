package http

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
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
// calls it (see probe.Telemetry). It records http.server.request.duration
// and http.client.request.duration from the kernel's aggregates (see
// red.go), read when the SDK collects, and makes a span per record.
//
// The OpenTelemetry API lets the SDK choose span IDs: each span is
// started with its event's IDs in the context (probe.ContextWithSpanIDs),
// which flowmill.IDGenerator gives the SDK back, so that the exported
// spans carry the IDs propagated downstream in traceparent. With another
// generator they carry the SDK's IDs (said once through otel.Handle when
// propagation is on) and the structure is kept: a server span with a
// traceparent is the child of that remote span (same trace ID); a client
// span is the child of its server span. The server span ends after its
// client requests, so a client span waits for it (at most parentWait, then
// it is recorded as the child of the event's IDs).
//
// With propagation on, flowmill.http.client.propagation counts the client
// requests by what became of their trace context
// (flowmill.http.propagation: injected, present, tls, http2, other_conn,
// untracked, header_too_large, not_http1, failed, unavailable).
//
// With a TCP family in the session (probe.TCPConns, looked up when
// requests are recorded, so it may attach after the exporter is made),
// server spans carry their connection's RTT and retransmissions; the
// connections of the requests waiting to be recorded are looked up
// together, in one read of the kernel's state.
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	r := &recorder{
		tracer:      env.Tracer,
		checkIDs:    p.propagate,
		bus:         env.Bus,
		lastRetrans: make(map[netip.AddrPort]uint32),
		pending:     make(map[trace.SpanID][]pendingClient),
		done:        make(map[trace.SpanID]doneServer),
	}
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
	r.red.src = p.totals
	if err := r.registerRED(env.Meter); err != nil {
		r.unregister()
		return nil, fmt.Errorf("http: %w", err)
	}
	if p.propagate {
		if err := r.observePropagation(env.Meter, p); err != nil {
			return nil, fmt.Errorf("http: %w", err)
		}
	}
	var err error
	if r.servers, err = probe.Subscribe[ServerRequest](env.Bus, env.Buffer); err != nil {
		r.unregister()
		return nil, fmt.Errorf("http: %w", err)
	}
	if r.clients, err = probe.Subscribe[ClientRequest](env.Bus, env.Buffer); err != nil {
		r.servers.Close()
		r.unregister()
		return nil, fmt.Errorf("http: %w", err)
	}
	return r, nil
}

// Propagation metric.
const (
	metricPropagation = "flowmill.http.client.propagation"
	attrPropagation   = "flowmill.http.propagation"
)

// observePropagation registers the propagation counters, read from the
// probe when the SDK collects.
func (r *recorder) observePropagation(m metric.Meter, p *Probe) error {
	c, err := m.Int64ObservableCounter(metricPropagation, metric.WithUnit("{request}"),
		metric.WithDescription("Client requests by what became of their trace context (W3C traceparent)."))
	if err != nil {
		return err
	}
	sets := map[Propagation]metric.ObserveOption{}
	for _, v := range []Propagation{PropagationInjected, PropagationPresent, PropagationTLS, PropagationHTTP2,
		PropagationOtherConn, PropagationUntracked, PropagationHeaderTooLarge, PropagationNotHTTP1,
		PropagationFailed, PropagationUnavailable} {
		sets[v] = metric.WithAttributeSet(attribute.NewSet(attribute.String(attrPropagation, v.String())))
	}
	r.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := p.PropagationStats()
		for v, n := range map[Propagation]uint64{
			PropagationInjected: s.Injected, PropagationPresent: s.Present, PropagationTLS: s.TLS,
			PropagationHTTP2: s.HTTP2, PropagationOtherConn: s.OtherConn, PropagationUntracked: s.Untracked,
			PropagationHeaderTooLarge: s.HeaderTooLarge, PropagationNotHTTP1: s.NotHTTP1,
			PropagationFailed: s.Failed, PropagationUnavailable: s.Unavailable,
		} {
			if n > 0 {
				o.ObserveInt64(c, int64(n), sets[v])
			}
		}
		return nil
	}, c)
	return err
}

func (r *recorder) unregister() {
	if r.reg != nil {
		r.reg.Unregister()
		r.reg = nil
	}
	if r.red.reg != nil {
		r.red.reg.Unregister()
		r.red.reg = nil
	}
}

// started checks, once, that the SDK gave a span the IDs of its event
// (flowmill.IDGenerator): otherwise the trace context sent downstream names
// spans that are not exported.
func (r *recorder) started(span trace.Span, ids probe.SpanIDs) {
	if !r.checkIDs || !span.IsRecording() {
		return
	}
	r.checkIDs = false
	if span.SpanContext().SpanID() != ids.SpanID {
		otel.Handle(errors.New("flowmill: http: the TracerProvider does not use flowmill.IDGenerator: exported spans carry other IDs " +
			"than the trace context sent downstream, so traces do not join up across services " +
			"(sdktrace.WithIDGenerator(flowmill.IDGenerator{}))"))
	}
}

const (
	parentWait = time.Minute // how long a client span waits for its server span
	maxPending = 1 << 14     // client spans waiting, at most
	maxDone    = 1 << 14     // recorded server spans remembered for late children
)

type recorder struct {
	tracer           trace.Tracer
	checkIDs         bool                // check the next recording span's IDs (see started)
	reg              metric.Registration // the propagation counters' callback
	server, client   metric.Float64Histogram
	red              redState // the kernel's request metrics
	servers          *probe.Sub[ServerRequest]
	clients          *probe.Sub[ClientRequest]
	pending          map[trace.SpanID][]pendingClient // by the event's parent span ID
	nPending         int
	done             map[trace.SpanID]doneServer // event span ID -> exported span
	doneOld, doneNew map[trace.SpanID]doneServer

	// With a TCP family in the session, server spans carry what the
	// kernel knows of their connection. The family is looked up when the
	// first requests are recorded, as the exporter may be made before
	// the session's probes attach.
	bus         *probe.Bus
	tcp         probe.TCPConns            // nil until found
	tcpFailing  bool                      // the last TCPConnBatch failed (reported once)
	batch       []ServerRequest           // the served requests being recorded
	queries     []probe.TCPConnQuery      // their connections, in the same order
	lastRetrans map[netip.AddrPort]uint32 // by peer: the connection's retransmits at its last request
}

const (
	// maxConns bounds lastRetrans; past it, the table starts over.
	maxConns = 1 << 14
	// maxBatch bounds the served requests recorded with one lookup of
	// their connections.
	maxBatch = 1024
)

// lookupConns asks the TCP family, once for the whole batch, about the
// connections of the served requests in r.batch; the answers are in
// r.queries. Without a TCP family, every answer is "not found".
func (r *recorder) lookupConns() {
	r.queries = slices.Grow(r.queries[:0], len(r.batch))
	for i := range r.batch {
		r.queries = append(r.queries, probe.TCPConnQuery{Remote: r.batch[i].Peer})
	}
	if r.tcp == nil {
		if r.tcp, _ = probe.Lookup[probe.TCPConns](r.bus); r.tcp == nil {
			return
		}
	}
	err := r.tcp.TCPConnBatch(r.queries)
	if err != nil && !r.tcpFailing {
		// Those spans lack their TCP attributes; say so once, not
		// per batch, until lookups work again.
		otel.Handle(fmt.Errorf("flowmill: http: reading the connections of served requests for their TCP attributes: %w", err))
	}
	r.tcpFailing = err != nil
}

// tcpAttrs returns what the TCP family knew of a served request's
// connection when its batch was recorded (at most the session's read
// latency after the handler returned): its RTT, and the segments it
// retransmitted since the previous request on the connection ended (or
// since it opened), so that a slow request can be told apart from a slow
// network.
func (r *recorder) tcpAttrs(q *probe.TCPConnQuery) []attribute.KeyValue {
	if !q.OK {
		return nil
	}
	info, peer := q.Info, q.Remote
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
			servers = r.recordServers(s, servers)
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

// recordServers records s and the served requests already waiting behind
// it (up to maxBatch), with one lookup of their connections for all: the
// TCP family's answer costs a read of kernel state, too much to pay per
// request at a high request rate. It returns servers, or nil once it is
// closed.
func (r *recorder) recordServers(s ServerRequest, servers <-chan ServerRequest) <-chan ServerRequest {
	r.batch = append(r.batch[:0], s)
more:
	for len(r.batch) < maxBatch {
		select {
		case s, ok := <-servers:
			if !ok {
				servers = nil
				break more
			}
			r.batch = append(r.batch, s)
		default:
			break more
		}
	}
	r.lookupConns()
	for i := range r.batch {
		r.recordServer(&r.batch[i], &r.queries[i])
	}
	clear(r.batch) // no strings kept alive
	return servers
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
			servers = r.recordServers(s, servers)
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
	// The requests counted since the last collection, recorded before
	// the callback goes: the SDK's final collection (its Shutdown) has
	// them.
	if _, err := r.pull(context.Background()); err != nil {
		otel.Handle(err)
	}
	r.unregister()
	r.servers.Close()
	r.clients.Close()
	clear(r.pending)
	clear(r.done)
	clear(r.lastRetrans)
}

// recordServer records a served request; q is the TCP family's answer
// about its connection.
func (r *recorder) recordServer(s *ServerRequest, q *probe.TCPConnQuery) {
	method := methodOf(s.Method)
	attrs := serverMetricAttrs(s)
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
	attrs = append(attrs, semconv.URLPath(s.Path))
	// Unknown sizes are left out, not reported as -1: a chunked request
	// body, and what a handler wrote on a connection it hijacked.
	if s.RequestBodySize >= 0 {
		attrs = append(attrs, semconv.HTTPRequestBodySize(int(s.RequestBodySize)))
	}
	if s.ResponseBodySize >= 0 && !s.Hijacked {
		attrs = append(attrs, semconv.HTTPResponseBodySize(int(s.ResponseBodySize)))
	}
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
	attrs = append(attrs, r.tcpAttrs(q)...)
	ids := probe.SpanIDs{TraceID: s.Span.TraceID, SpanID: s.Span.SpanID}
	ctx, span := r.tracer.Start(probe.ContextWithSpanIDs(ctx, ids), name, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithTimestamp(s.Start), trace.WithAttributes(attrs...))
	r.started(span, ids)
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

// serverMetricAttrs returns the attributes of http.server.request.duration
// for a served request (the span's first ones too).
func serverMetricAttrs(s *ServerRequest) []attribute.KeyValue {
	scheme := s.Scheme.String()
	if scheme == "" {
		scheme = "http" // net/http sets Request.TLS for every request over TLS
	}
	attrs := []attribute.KeyValue{semconv.HTTPRequestMethodKey.String(methodOf(s.Method)), semconv.URLScheme(scheme)}
	if v := s.ProtocolVersion.String(); v != "" {
		attrs = append(attrs, semconv.NetworkProtocolVersion(v))
	}
	if s.StatusCode > 0 { // 0: hijacked, whatever was sent is unknown
		attrs = append(attrs, semconv.HTTPResponseStatusCode(s.StatusCode))
	}
	if s.Route != "" {
		attrs = append(attrs, semconv.HTTPRoute(s.Route))
	}
	if s.StatusCode >= 500 {
		attrs = append(attrs, semconv.ErrorTypeKey.String(strconv.Itoa(s.StatusCode)))
	}
	return attrs
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

// clientMetricAttrs returns the attributes of http.client.request.duration
// for a sent request.
func clientMetricAttrs(c *ClientRequest) []attribute.KeyValue {
	host, port := splitHostPort(c.Host)
	attrs := []attribute.KeyValue{semconv.HTTPRequestMethodKey.String(methodOf(c.Method)), semconv.ServerAddress(host)}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	// url.scheme is opt-in on http.client.request.duration: on the span
	// only.
	if v := c.ProtocolVersion.String(); v != "" {
		attrs = append(attrs, semconv.NetworkProtocolVersion(v))
	}
	if c.StatusCode > 0 {
		attrs = append(attrs, semconv.HTTPResponseStatusCode(c.StatusCode))
	}
	if et := errorTypeOf(c); et != "" {
		attrs = append(attrs, semconv.ErrorTypeKey.String(et))
	}
	return attrs
}

func (r *recorder) recordClient(c *ClientRequest) {
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
	if sc := c.Scheme.String(); sc != "" {
		attrs = append(attrs, semconv.URLScheme(sc))
	}
	if v := c.ProtocolVersion.String(); v != "" {
		attrs = append(attrs, semconv.NetworkProtocolVersion(v))
	}
	if c.StatusCode > 0 {
		attrs = append(attrs, semconv.HTTPResponseStatusCode(c.StatusCode))
	}
	// Sizes come from Content-Length: -1 (chunked, or none given) is left
	// out; a response to HEAD declares the size of a body it does not have.
	if c.RequestBodySize >= 0 {
		attrs = append(attrs, semconv.HTTPRequestBodySize(int(c.RequestBodySize)))
	}
	if c.ResponseBodySize >= 0 && c.StatusCode > 0 && c.Method != "HEAD" {
		attrs = append(attrs, semconv.HTTPResponseBodySize(int(c.ResponseBodySize)))
	}
	et := errorTypeOf(c)
	if et != "" {
		attrs = append(attrs, semconv.ErrorTypeKey.String(et))
	}
	if c.Propagation != PropagationNone {
		attrs = append(attrs, attribute.String(attrPropagation, c.Propagation.String()))
	}
	ids := probe.SpanIDs{TraceID: c.Span.TraceID, SpanID: c.Span.SpanID}
	_, span := r.tracer.Start(probe.ContextWithSpanIDs(ctx, ids), methodOf(c.Method), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(c.Start), trace.WithAttributes(attrs...))
	r.started(span, ids)
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
