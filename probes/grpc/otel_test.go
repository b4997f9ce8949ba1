package grpc

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/flowmill/flowmill/internal/probe"
)

// TestTelemetry: a server span per RPC with the RPC conventions'
// attributes, an error status only for server-side failures, the remote
// parent of a traceparent, and rpc.server.call.duration.
func TestTelemetry(t *testing.T) {
	bus := probe.NewBus()
	servers := probe.Produce[ServerRPC](bus)
	clients := probe.Produce[ClientRPC](bus)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: tp.Tracer("t"),
		Attributes: probe.DefaultAttributes})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1000, 0)
	peer := netip.MustParseAddrPort("10.0.0.1:5555")
	remote := SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{2}, ParentSpanID: trace.SpanID{3}, RemoteParent: true, Sampled: true}
	for i, c := range []codes.Code{codes.OK, codes.NotFound, codes.Unavailable} {
		s := ServerRPC{Start: t0, End: t0.Add(time.Duration(i+1) * time.Second), FullMethod: "/grpc.health.v1.Health/Check",
			Service: "grpc.health.v1.Health", Method: "Check", Code: c, StatusKnown: true, Peer: peer, ServerPort: 50051,
			Span: SpanContext{TraceID: trace.TraceID{9}, SpanID: trace.SpanID{byte(10 + i)}}}
		if i == 0 {
			s.Span = remote
		}
		servers.Publish(&s)
	}
	clients.Publish(&ClientRPC{Start: t0, End: t0.Add(time.Millisecond), FullMethod: "/pkg.Svc/Get", Service: "pkg.Svc", Method: "Get",
		Target: "dns:///db.internal:50051", Code: codes.NotFound,
		Span: SpanContext{TraceID: remote.TraceID, SpanID: trace.SpanID{7}, ParentSpanID: remote.SpanID, Sampled: true}, Parent: ParentByContext})
	stop := make(chan struct{})
	close(stop)
	if err := rec.Run(stop); err != nil {
		t.Fatal(err)
	}
	var spans []sdktrace.ReadOnlySpan
	var cl sdktrace.ReadOnlySpan
	for _, s := range sr.Ended() {
		if s.SpanKind() == trace.SpanKindClient {
			cl = s
		} else {
			spans = append(spans, s)
		}
	}
	if len(spans) != 3 || cl == nil {
		t.Fatalf("%d server spans, want 3, and client span %v", len(spans), cl)
	}
	if cl.Name() != "pkg.Svc/Get" || cl.Parent().SpanID() != remote.SpanID || cl.Parent().TraceID() != remote.TraceID || cl.Status().Code != otelcodes.Error {
		t.Errorf("client span %q parent %v status %v", cl.Name(), cl.Parent(), cl.Status())
	}
	ca := attribute.NewSet(cl.Attributes()...)
	if v, _ := ca.Value("server.address"); v.AsString() != "db.internal" {
		t.Errorf("client span server.address %v", v.AsInterface())
	}
	if v, _ := ca.Value("server.port"); v.AsInt64() != 50051 {
		t.Errorf("client span server.port %v", v.AsInterface())
	}
	for i, s := range spans {
		if s.Name() != "grpc.health.v1.Health/Check" || s.SpanKind() != trace.SpanKindServer {
			t.Errorf("span %d: %q kind %v", i, s.Name(), s.SpanKind())
		}
		attrs := attribute.NewSet(s.Attributes()...)
		for k, want := range map[attribute.Key]any{"rpc.system": "grpc", "rpc.system.name": "grpc", "rpc.service": "grpc.health.v1.Health",
			"rpc.method": "Check", "server.port": int64(50051), "network.peer.address": "10.0.0.1", "network.peer.port": int64(5555),
			"rpc.grpc.status_code":     int64([]codes.Code{codes.OK, codes.NotFound, codes.Unavailable}[i]),
			"rpc.response.status_code": []string{"OK", "NOT_FOUND", "UNAVAILABLE"}[i]} {
			if v, ok := attrs.Value(k); !ok || v.AsInterface() != want {
				t.Errorf("span %d: %s = %v, want %v", i, k, v.AsInterface(), want)
			}
		}
		if got, want := s.Status().Code, []otelcodes.Code{otelcodes.Unset, otelcodes.Unset, otelcodes.Error}[i]; got != want {
			t.Errorf("span %d: status %v, want %v", i, got, want)
		}
		if !s.StartTime().Equal(t0) || !s.EndTime().Equal(t0.Add(time.Duration(i+1)*time.Second)) {
			t.Errorf("span %d: times %v %v", i, s.StartTime(), s.EndTime())
		}
	}
	if p := spans[0].Parent(); p.TraceID() != remote.TraceID || p.SpanID() != remote.ParentSpanID || !p.IsRemote() {
		t.Errorf("span with a traceparent: parent %v", p)
	}
	if spans[1].Parent().IsValid() {
		t.Errorf("span without a traceparent: parent %v", spans[1].Parent())
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "rpc.server.call.duration" || m.Unit != "s" {
				continue
			}
			found = true
			h := m.Data.(metricdata.Histogram[float64])
			if len(h.DataPoints) != 3 {
				t.Errorf("%d data points, want 3 (one per code)", len(h.DataPoints))
			}
			for _, dp := range h.DataPoints {
				if dp.Count != 1 {
					t.Errorf("data point %v: count %d", dp.Attributes, dp.Count)
				}
				if _, ok := dp.Attributes.Value("server.port"); !ok {
					t.Errorf("data point %v: no server.port", dp.Attributes)
				}
			}
		}
	}
	if !found {
		t.Errorf("no rpc.server.call.duration in %+v", rm)
	}
	found = false
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			found = found || m.Name == "rpc.client.call.duration" && m.Unit == "s"
		}
	}
	if !found {
		t.Errorf("no rpc.client.call.duration in %+v", rm)
	}
}

func TestSplitMethod(t *testing.T) {
	for in, want := range map[string][2]string{
		"/grpc.health.v1.Health/Check": {"grpc.health.v1.Health", "Check"},
		"/a/b/c":                       {"a/b", "c"},
		"nope":                         {"", ""},
		"/x/":                          {"", ""},
	} {
		if s, m := splitMethod(in); s != want[0] || m != want[1] {
			t.Errorf("splitMethod(%q) = %q, %q", in, s, m)
		}
	}
}
