package http

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/probes"
)

// TestTelemetry: the client span, published before its server span (as the
// probe does: the client returns first), becomes the child of the exported
// server span, which is the child of the remote traceparent span.
func TestTelemetry(t *testing.T) {
	bus := probes.NewBus()
	servers, clients := probes.Produce[ServerRequest](bus), probes.Produce[ClientRequest](bus)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	rec, err := New().Telemetry(&probes.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1000, 0)
	remote := SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{2}, ParentSpanID: trace.SpanID{3}, RemoteParent: true, Sampled: true}
	clients.Publish(&ClientRequest{Start: t0.Add(time.Millisecond), End: t0.Add(2 * time.Millisecond), Method: "GET", Host: "db:8080", Path: "/q",
		StatusCode: 503, Span: SpanContext{TraceID: remote.TraceID, SpanID: trace.SpanID{4}, ParentSpanID: remote.SpanID}, Parent: ParentByGoroutine})
	clients.Publish(&ClientRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "BREW", Host: "127.0.0.1:1", Error: "*net.OpError",
		Span: SpanContext{TraceID: trace.TraceID{9}, SpanID: trace.SpanID{9}}})
	time.Sleep(50 * time.Millisecond) // the clients are read first
	servers.Publish(&ServerRequest{Start: t0, End: t0.Add(3 * time.Millisecond), Method: "GET", Path: "/users/7", Route: "/users/{id}",
		Host: "api:80", Peer: netip.MustParseAddrPort("10.0.0.1:5555"), StatusCode: 500, Span: remote})
	stop := make(chan struct{})
	done := make(chan error)
	go func() { done <- rec.Run(stop) }()
	time.Sleep(100 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	spans := sr.Ended()
	if len(spans) != 3 {
		t.Fatalf("%d spans, want 3", len(spans))
	}
	byName := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		byName[s.Name()] = s
	}
	srv, cl, orphan := byName["GET /users/{id}"], byName["GET"], byName["_OTHER"]
	if srv == nil || cl == nil || orphan == nil {
		t.Fatalf("span names: %v", byName)
	}
	if srv.SpanContext().TraceID() != remote.TraceID || srv.Parent().SpanID() != remote.ParentSpanID || !srv.Parent().IsRemote() || srv.SpanKind() != trace.SpanKindServer {
		t.Errorf("server span: trace %v parent %v", srv.SpanContext().TraceID(), srv.Parent())
	}
	if cl.Parent().SpanID() != srv.SpanContext().SpanID() || cl.SpanContext().TraceID() != remote.TraceID || cl.SpanKind() != trace.SpanKindClient {
		t.Errorf("client span parent %v, want the server span %v", cl.Parent(), srv.SpanContext())
	}
	if orphan.Parent().IsValid() {
		t.Errorf("parentless client has a parent %v", orphan.Parent())
	}
	if !srv.StartTime().Equal(t0) || !srv.EndTime().Equal(t0.Add(3*time.Millisecond)) {
		t.Errorf("server span times %v %v", srv.StartTime(), srv.EndTime())
	}
	has := func(s sdktrace.ReadOnlySpan, kv attribute.KeyValue) {
		t.Helper()
		for _, a := range s.Attributes() {
			if a == kv {
				return
			}
		}
		t.Errorf("%s lacks %v: %v", s.Name(), kv, s.Attributes())
	}
	has(srv, semconv.HTTPRoute("/users/{id}"))
	has(srv, semconv.HTTPResponseStatusCode(500))
	has(srv, semconv.ErrorTypeKey.String("500"))
	has(srv, semconv.NetworkPeerAddress("10.0.0.1"))
	has(srv, semconv.ServerAddress("api"))
	has(cl, semconv.ServerPort(8080))
	has(cl, semconv.ErrorTypeKey.String("503"))
	has(orphan, semconv.ErrorTypeKey.String("*net.OpError"))

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		for _, dp := range m.Data.(metricdata.Histogram[float64]).DataPoints {
			counts[m.Name] += dp.Count
		}
	}
	if counts[metricServerDuration] != 1 || counts[metricClientDuration] != 2 {
		t.Errorf("histogram counts %v", counts)
	}
}

type fakeTCP struct {
	mu    sync.Mutex
	conns map[netip.AddrPort]probes.TCPConnInfo
}

func (f *fakeTCP) TCPConn(local, remote netip.AddrPort) (probes.TCPConnInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i, ok := f.conns[remote]
	return i, ok && !local.IsValid()
}

func (f *fakeTCP) set(peer netip.AddrPort, i *probes.TCPConnInfo) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i == nil {
		delete(f.conns, peer)
	} else {
		f.conns[peer] = *i
	}
}

// With a TCP family in the session, a server span carries its connection's
// RTT and the retransmissions since the previous request on it.
func TestTelemetryTCP(t *testing.T) {
	bus := probes.NewBus()
	servers := probes.Produce[ServerRequest](bus)
	probes.Produce[ClientRequest](bus)
	peer := netip.MustParseAddrPort("10.0.0.1:5555")
	tcp := &fakeTCP{conns: map[netip.AddrPort]probes.TCPConnInfo{}}
	tcp.set(peer, &probes.TCPConnInfo{SRTT: 1500 * time.Microsecond, MinRTT: time.Millisecond, Retransmits: 3})
	probes.Provide[probes.TCPConns](bus, tcp)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	rec, err := New().Telemetry(&probes.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan error)
	go func() { done <- rec.Run(stop) }()
	t0 := time.Unix(1000, 0)
	req := func(path string) {
		servers.Publish(&ServerRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "GET", Path: path, Peer: peer, StatusCode: 200,
			Span: SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{byte(len(path))}}})
		time.Sleep(30 * time.Millisecond)
	}
	req("/a")
	tcp.set(peer, &probes.TCPConnInfo{SRTT: 2 * time.Millisecond, MinRTT: time.Millisecond, Retransmits: 5})
	req("/bb")
	req("/ccc") // no new retransmissions
	tcp.set(peer, nil)
	req("/dddd") // connection unknown: no TCP attributes
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := map[string][2]float64{"/a": {0.0015, 3}, "/bb": {0.002, 2}, "/ccc": {0.002, 0}}
	spans := sr.Ended()
	if len(spans) != 4 {
		t.Fatalf("%d spans", len(spans))
	}
	for _, s := range spans {
		got := map[attribute.Key]attribute.Value{}
		for _, a := range s.Attributes() {
			got[a.Key] = a.Value
		}
		path := got[semconv.URLPathKey].AsString()
		w, ok := want[path]
		srtt, has := got[attrTCPSRTT]
		if !ok {
			if has {
				t.Errorf("%s: TCP attributes for an unknown connection", path)
			}
			continue
		}
		if !has || srtt.AsFloat64() != w[0] || got[attrTCPRetransmits].AsInt64() != int64(w[1]) || got[attrTCPMinRTT].AsFloat64() != 0.001 {
			t.Errorf("%s: srtt %v retransmits %v, want %v", path, srtt, got[attrTCPRetransmits], w)
		}
	}
}
