package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	colmetric "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	common "go.opentelemetry.io/proto/otlp/common/v1"
	metricpb "go.opentelemetry.io/proto/otlp/metrics/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// receiver is an OTLP/gRPC metrics and trace service that keeps what it
// receives.
type receiver struct {
	colmetric.UnimplementedMetricsServiceServer
	coltrace.UnimplementedTraceServiceServer
	mu      sync.Mutex
	metrics []*metricpb.ResourceMetrics
	spans   []*tracepb.ResourceSpans
}

func (r *receiver) Export(_ context.Context, req *colmetric.ExportMetricsServiceRequest) (*colmetric.ExportMetricsServiceResponse, error) {
	r.mu.Lock()
	r.metrics = append(r.metrics, req.ResourceMetrics...)
	r.mu.Unlock()
	return &colmetric.ExportMetricsServiceResponse{}, nil
}

type traceReceiver struct{ *receiver }

func (r traceReceiver) Export(_ context.Context, req *coltrace.ExportTraceServiceRequest) (*coltrace.ExportTraceServiceResponse, error) {
	r.mu.Lock()
	r.spans = append(r.spans, req.ResourceSpans...)
	r.mu.Unlock()
	return &coltrace.ExportTraceServiceResponse{}, nil
}

// flowmillMetrics returns the metrics of flowmill's scope, by name, from
// every export so far (later exports last).
func (r *receiver) flowmillMetrics() map[string][]*metricpb.Metric {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string][]*metricpb.Metric{}
	for _, rm := range r.metrics {
		for _, sm := range rm.ScopeMetrics {
			if sm.Scope.GetName() != "github.com/flowmill/flowmill" {
				continue
			}
			for _, m := range sm.Metrics {
				out[m.Name] = append(out[m.Name], m)
			}
		}
	}
	return out
}

func attrs(kvs []*common.KeyValue) map[string]string {
	out := map[string]string{}
	for _, kv := range kvs {
		switch v := kv.Value.Value.(type) {
		case *common.AnyValue_StringValue:
			out[kv.Key] = v.StringValue
		case *common.AnyValue_IntValue:
			out[kv.Key] = strconv.FormatInt(v.IntValue, 10)
		case *common.AnyValue_DoubleValue:
			out[kv.Key] = strconv.FormatFloat(v.DoubleValue, 'g', -1, 64)
		}
	}
	return out
}

// TestOTLPReceiverGetsTheExample runs the example on this test's process,
// pointed by OTEL_EXPORTER_OTLP_ENDPOINT at an OTLP/gRPC receiver started
// here, moves N bytes over loopback and checks what arrives against the
// README's table.
func TestOTLPReceiverGetsTheExample(t *testing.T) {
	testutil.RequireBPF(t)
	testutil.Need(t, exec.LookPath, "go")
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rcv := &receiver{}
	srv := grpc.NewServer()
	colmetric.RegisterMetricsServiceServer(srv, rcv)
	coltrace.RegisterTraceServiceServer(srv, traceReceiver{rcv})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)

	ex, _ := testutil.StartExample(t, testprog.OTLP, regexp.MustCompile(`observing process \d+ .*OTLP/gRPC`),
		[]string{
			"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + ln.Addr().String(),
			"OTEL_METRIC_EXPORT_INTERVAL=200",
			"OTEL_BSP_SCHEDULE_DELAY=200",
		},
		"-pid", strconv.Itoa(os.Getpid()), "-spans", "-interval", "100ms")

	const n = 54321
	began := time.Now()
	port, client, server := testutil.Transfer(t, n)
	client.Close()
	server.Close()
	ended := time.Now()
	sport := strconv.Itoa(port)

	// The client side's bytes, cumulative: wait for the value N.
	clientBytes := func() (map[string]string, int64) {
		ms := rcv.flowmillMetrics()["tcp.bytes"]
		for i := len(ms) - 1; i >= 0; i-- {
			for _, dp := range ms[i].GetSum().GetDataPoints() {
				if a := attrs(dp.Attributes); a["network.peer.port"] == sport && a["network.io.direction"] == "transmit" {
					return a, dp.GetAsInt()
				}
			}
		}
		return nil, 0
	}
	// And tcp.active: an observable, it reaches an export only from a
	// collection that follows the recording of a close (or sees the
	// connection open), which the one that carried the bytes may precede;
	// and the session's end unregisters its callback before the final
	// export.
	for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		_, v := clientBytes()
		active := len(rcv.flowmillMetrics()["tcp.active"])
		if v == n && active > 0 {
			break
		} else if time.Since(start) > testutil.Timeout(30*time.Second) {
			t.Fatalf("after 30s: tcp.bytes for port %d = %d, want %d; %d exports of tcp.active, want some\nexample:\n%s", port, v, n, active, ex.Log())
		}
	}
	if err := ex.Stop(); err != nil { // flushes the spans
		t.Errorf("the example did not exit cleanly: %v\n%s", err, ex.Log())
	}

	a, _ := clientBytes()
	want := map[string]string{
		"flowmill.tcp.role": "client", "network.io.direction": "transmit", "network.peer.address": "127.0.0.1",
		"network.peer.port": sport, "network.transport": "tcp", "network.type": "ipv4",
		"process.executable.name": a["process.executable.name"],
	}
	if len(a) != len(want) || a["process.executable.name"] == "" {
		t.Errorf("tcp.bytes attributes %v, want exactly the keys of %v", a, want)
	}
	for k, v := range want {
		if a[k] != v {
			t.Errorf("tcp.bytes attribute %s = %q, want %q", k, a[k], v)
		}
	}

	// Every documented metric, with its unit and kind.
	ms := rcv.flowmillMetrics()
	for _, d := range []struct{ name, unit, kind string }{
		{"tcp.bytes", "By", "counter"},
		{"tcp.packets", "{segment}", "counter"},
		{"tcp.active", "{connection}", "updown"},
		{"tcp.rtt", "s", "exphistogram"},
		{"tcp.connection.duration", "s", "exphistogram"},
		{"flowmill.events.read", "{event}", "counter"},
		{"flowmill.events.lost", "{event}", "counter"},
		{"flowmill.flows.evicted", "{flow}", "counter"},
		{"flowmill.events.dropped", "{event}", "counter"},
	} {
		got := ms[d.name]
		if len(got) == 0 {
			t.Errorf("no metric %s", d.name)
			continue
		}
		m := got[len(got)-1]
		kind := "other"
		switch {
		case m.GetSum() != nil && m.GetSum().IsMonotonic:
			kind = "counter"
		case m.GetSum() != nil:
			kind = "updown"
		case m.GetExponentialHistogram() != nil:
			kind = "exphistogram"
		}
		if m.Unit != d.unit || kind != d.kind {
			t.Errorf("%s: unit %q kind %s, want %q %s", d.name, m.Unit, kind, d.unit, d.kind)
		}
	}

	// The two spans of the connection.
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	var kinds []string
	for _, rs := range rcv.spans {
		for _, ss := range rs.ScopeSpans {
			for _, sp := range ss.Spans {
				a := attrs(sp.Attributes)
				if a["network.peer.port"] != sport && a["network.local.port"] != sport {
					continue
				}
				kinds = append(kinds, sp.Kind.String())
				start, end := time.Unix(0, int64(sp.StartTimeUnixNano)), time.Unix(0, int64(sp.EndTimeUnixNano))
				if sp.Name != "tcp.connection" || start.Before(began) || end.After(ended) || !end.After(start) {
					t.Errorf("span %s %v..%v, want tcp.connection within %v..%v", sp.Name, start, end, began, ended)
				}
				if sp.Kind == tracepb.Span_SPAN_KIND_CLIENT && a["flowmill.tcp.bytes_sent"] != strconv.Itoa(n) {
					t.Errorf("client span flowmill.tcp.bytes_sent = %q, want %d", a["flowmill.tcp.bytes_sent"], n)
				}
			}
		}
	}
	slices.Sort(kinds)
	if !slices.Equal(kinds, []string{"SPAN_KIND_CLIENT", "SPAN_KIND_SERVER"}) {
		t.Errorf("span kinds %v, want one client and one server", kinds)
	}
}
