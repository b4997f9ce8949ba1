package flowmill_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otellog "go.opentelemetry.io/otel/log"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/otelviews"
	"github.com/flowmill/flowmill/probes/tcp"
)

func comm(t *testing.T) string {
	b, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// collect returns the metrics of the scope flowmill.ScopeName by name.
func collect(t *testing.T, r *sdkmetric.ManualReader) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != flowmill.ScopeName {
			continue
		}
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

func sumPoint(m metricdata.Metrics, want attribute.Set) (metricdata.DataPoint[int64], bool) {
	s, _ := m.Data.(metricdata.Sum[int64])
	for _, dp := range s.DataPoints {
		if dp.Attributes.Equals(&want) {
			return dp, true
		}
	}
	return metricdata.DataPoint[int64]{}, false
}

func expPoint(m metricdata.Metrics, want attribute.Set) (metricdata.ExponentialHistogramDataPoint[float64], bool) {
	h, _ := m.Data.(metricdata.ExponentialHistogram[float64])
	for _, dp := range h.DataPoints {
		if dp.Attributes.Equals(&want) {
			return dp, true
		}
	}
	return metricdata.ExponentialHistogramDataPoint[float64]{}, false
}

// TestExporterCountsATransferOnce moves N bytes through real loopback
// sockets, lets a periodic report see them, closes the connection and
// checks that the bytes counters grew by exactly N on each side, that the
// histograms hold the RTT and the duration, and that the span carries the
// kernel's times.
func TestExporterCountsATransferOnce(t *testing.T) {
	testutil.RequireBPF(t)
	const n = 123457
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader), sdkmetric.WithView(otelviews.Views()...))
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	t.Cleanup(func() {
		_ = mp.Shutdown(context.Background())
		_ = tp.Shutdown(context.Background())
	})

	s, err := flowmill.Start(t.Context(), flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(20*time.Millisecond), tcp.WithSpans())))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp), flowmill.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })
	reports, err := flowmill.Subscribe[tcp.ConnStats](s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reports.Close)

	began := time.Now()
	port, client, server := testutil.Transfer(t, n)

	// Wait for a periodic report of the client side with all N bytes
	// acknowledged: the close must not count them again.
	deadline := time.After(testutil.Timeout(10 * time.Second))
	for seen := false; !seen; {
		select {
		case e := <-reports.Events():
			seen = e.Role == tcp.RoleClient && int(e.Remote.Port()) == port && e.BytesSent == n
		case <-deadline:
			t.Fatal("no periodic report of the transfer within 10s")
		}
	}
	client.Close()
	server.Close()
	ended := time.Now()

	base := []attribute.KeyValue{
		semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, semconv.NetworkPeerAddress("127.0.0.1"),
		semconv.ProcessExecutableName(comm(t)),
	}
	clientAttrs := attribute.NewSet(append(base[:len(base):len(base)], attribute.String("flowmill.tcp.role", "client"), semconv.NetworkPeerPort(port))...)
	serverAttrs := attribute.NewSet(append(base[:len(base):len(base)], attribute.String("flowmill.tcp.role", "server"), semconv.NetworkLocalPort(port))...)
	dir := func(s attribute.Set, d attribute.KeyValue) attribute.Set {
		return attribute.NewSet(append(s.ToSlice(), d)...)
	}

	// Both closes are recorded when both durations are.
	var ms map[string]metricdata.Metrics
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		ms = collect(t, reader)
		c, ok1 := expPoint(ms["tcp.connection.duration"], clientAttrs)
		s, ok2 := expPoint(ms["tcp.connection.duration"], serverAttrs)
		if ok1 && ok2 && c.Count == 1 && s.Count == 1 {
			break
		}
		if time.Since(start) > testutil.Timeout(10*time.Second) {
			t.Fatalf("closes not recorded within 10s: %+v", ms["tcp.connection.duration"])
		}
	}

	got, _ := sumPoint(ms["tcp.bytes"], dir(clientAttrs, semconv.NetworkIODirectionTransmit))
	metricdatatest.AssertEqual(t, metricdata.DataPoint[int64]{Attributes: dir(clientAttrs, semconv.NetworkIODirectionTransmit), Value: n}, got, metricdatatest.IgnoreTimestamp())
	got, _ = sumPoint(ms["tcp.bytes"], dir(serverAttrs, semconv.NetworkIODirectionReceive))
	metricdatatest.AssertEqual(t, metricdata.DataPoint[int64]{Attributes: dir(serverAttrs, semconv.NetworkIODirectionReceive), Value: n}, got, metricdatatest.IgnoreTimestamp())
	if _, ok := sumPoint(ms["tcp.bytes"], dir(clientAttrs, semconv.NetworkIODirectionReceive)); ok {
		t.Error("the client received bytes it was never sent")
	}
	for _, a := range []attribute.Set{clientAttrs, serverAttrs} {
		active, _ := sumPoint(ms["tcp.active"], a)
		if active.Value != 0 {
			t.Errorf("tcp.active{%s} = %d after close, want 0", a.Encoded(attribute.DefaultEncoder()), active.Value)
		}
	}

	elapsed := ended.Sub(began)
	for _, a := range []attribute.Set{clientAttrs, serverAttrs} {
		d, _ := expPoint(ms["tcp.connection.duration"], a)
		if mx, _ := d.Max.Value(); d.Sum <= 0 || mx > elapsed.Seconds() {
			t.Errorf("duration %+v outside (0, %v]", d, elapsed)
		}
		rtt, ok := expPoint(ms["tcp.rtt"], a)
		mn, _ := rtt.Min.Value()
		mx, _ := rtt.Max.Value()
		if !ok || rtt.Count < 1 || mn <= 0 || mx > 0.2 {
			t.Errorf("rtt %+v: want samples in (0, 200ms] on loopback", rtt)
		}
	}

	// Spans of the two sides, with the kernel's times.
	var mine []sdktrace.ReadOnlySpan
	for start := time.Now(); len(mine) < 2 && time.Since(start) < 5*time.Second; time.Sleep(20 * time.Millisecond) {
		mine = mine[:0]
		for _, sp := range spans.Ended() {
			for _, kv := range sp.Attributes() {
				if (kv.Key == semconv.NetworkPeerPortKey || kv.Key == semconv.NetworkLocalPortKey) && kv.Value.AsInt64() == int64(port) {
					mine = append(mine, sp)
				}
			}
		}
	}
	if len(mine) != 2 {
		t.Fatalf("%d spans for port %d, want 2", len(mine), port)
	}
	for _, sp := range mine {
		if sp.Name() != "tcp.connection" || sp.StartTime().Before(began) || sp.EndTime().After(ended) || !sp.EndTime().After(sp.StartTime()) ||
			(sp.SpanKind() != trace.SpanKindClient && sp.SpanKind() != trace.SpanKindServer) {
			t.Errorf("span %s %v %v..%v, want tcp.connection within %v..%v", sp.Name(), sp.SpanKind(), sp.StartTime(), sp.EndTime(), began, ended)
		}
	}

	if m, ok := ms["flowmill.events.read"]; !ok {
		t.Error("no flowmill.events.read")
	} else if s := m.Data.(metricdata.Sum[int64]); len(s.DataPoints) != 1 || s.DataPoints[0].Value < 4 {
		t.Errorf("flowmill.events.read = %+v, want at least the 2 opens and 2 closes", s.DataPoints)
	}
	for _, name := range []string{"flowmill.events.lost", "flowmill.flows.evicted", "flowmill.events.dropped", "flowmill.hooks.missed"} {
		if _, ok := ms[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
}

// TestExporterStopsWithSessionAndShutdownIsIdempotent closes the session
// under a running exporter, then shuts it down concurrently many times.
func TestExporterStopsWithSessionAndShutdownIsIdempotent(t *testing.T) {
	testutil.RequireBPF(t)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	s, err := flowmill.Start(t.Context(), flowmill.WithProbes(tcp.New()))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })

	port, client, server := testutil.Transfer(t, 1000)
	client.Close()
	server.Close()
	time.Sleep(200 * time.Millisecond) // past the session's drain timer
	s.Close()
	select {
	case <-exp.Done():
	case <-time.After(testutil.Timeout(10 * time.Second)):
		t.Fatal("the exporter did not stop with its session")
	}
	// What the session delivered before it closed is recorded.
	ms := collect(t, reader)
	var total int64
	for _, dp := range ms["tcp.bytes"].Data.(metricdata.Sum[int64]).DataPoints {
		if v, _ := dp.Attributes.Value(semconv.NetworkPeerPortKey); v.AsInt64() == int64(port) {
			total += dp.Value
		}
	}
	if total != 1000 {
		t.Errorf("client side bytes for port %d = %d, want 1000", port, total)
	}

	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if err := exp.Shutdown(context.Background()); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		})
	}
	wg.Wait()
	if err := exp.Close(); err != nil {
		t.Errorf("Close after Shutdown: %v", err)
	}
	if _, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp)); !errors.Is(err, flowmill.ErrClosed) {
		t.Errorf("NewExporter on a closed session: %v, want ErrClosed", err)
	}
}

// silent is a probe family with no OpenTelemetry mapping.
type silent struct{}

func (silent) Name() string                                { return "silent" }
func (silent) Prepare(*probe.Bus) error                    { return nil }
func (silent) Attach(*probe.Env) (probe.Attachment, error) { return silentAtt{}, nil }

type silentAtt struct{}

func (silentAtt) Rings() []probe.Ring         { return nil }
func (silentAtt) Stats() (probe.Stats, error) { return probe.Stats{}, nil }
func (silentAtt) Close() error                { return nil }

func TestExporterNeedsAMappedFamily(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.Start(t.Context(), flowmill.WithProbes(silent{}))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	if _, err := flowmill.NewExporter(s); err == nil || !strings.Contains(err.Error(), "tcp.New()") {
		t.Errorf("NewExporter without a mapped family: %v, want an error naming tcp.New()", err)
	}
}

// logging is a probe family whose mapping emits one log record per run,
// to check what the exporter hands families for logs.
type logging struct{ silent }

func (logging) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	return logRecorder{env.Logger}, nil
}

type logRecorder struct{ l otellog.Logger }

func (r logRecorder) Run(stop <-chan struct{}) error {
	var rec otellog.Record
	rec.SetEventName("test.event")
	r.l.Emit(context.Background(), rec)
	<-stop
	return nil
}

// logSink is an in-memory sdklog.Exporter.
type logSink struct {
	mu   sync.Mutex
	recs []sdklog.Record
}

func (s *logSink) Export(_ context.Context, recs []sdklog.Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range recs {
		s.recs = append(s.recs, r.Clone())
	}
	return nil
}
func (s *logSink) Shutdown(context.Context) error   { return nil }
func (s *logSink) ForceFlush(context.Context) error { return nil }

// TestExporterLoggerProvider: families log through WithLoggerProvider's
// provider, in flowmill's instrumentation scope, and Shutdown flushes it.
func TestExporterLoggerProvider(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.Start(t.Context(), flowmill.WithProbes(logging{}))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	sink := &logSink{}
	lp := sdklog.NewLoggerProvider(sdklog.WithProcessor(sdklog.NewBatchProcessor(sink, sdklog.WithExportInterval(time.Hour))))
	t.Cleanup(func() { _ = lp.Shutdown(context.Background()) })
	exp, err := flowmill.NewExporter(s, flowmill.WithLoggerProvider(lp))
	if err != nil {
		t.Fatal(err)
	}
	// Run emits its record before it returns, which Shutdown waits for.
	if err := exp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.recs) != 1 || sink.recs[0].EventName() != "test.event" || sink.recs[0].InstrumentationScope().Name != flowmill.ScopeName {
		t.Errorf("records after Shutdown: %+v, want one test.event in scope %s", sink.recs, flowmill.ScopeName)
	}
}

// lossy is a mapped family whose attachment reports fixed loss counters.
type lossy struct{ logging }

func (lossy) Attach(*probe.Env) (probe.Attachment, error) { return lossyAtt{}, nil }

type lossyAtt struct{ silentAtt }

var lossyStats = probe.Stats{Lost: 1, Evicted: 2, Missed: 3, Malformed: 4, Incomplete: 5, Unsupported: 6, PollsFailed: 7}

func (lossyAtt) Stats() (probe.Stats, error) { return lossyStats, nil }

// Every per-probe loss counter reaches Session.Stats, before and after
// Close, and its health metric.
func TestExporterHealthCounters(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.New(flowmill.WithProbes(lossy{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })
	testutil.CheckStart(t, s.Start(t.Context()))
	want := flowmill.Stats{EventsLost: 1, Evicted: 2, Missed: 3, Malformed: 4, Incomplete: 5, Unsupported: 6, PollsFailed: 7}
	if st, err := s.Stats(); err != nil || st != want {
		t.Errorf("Stats: %+v, %v; want %+v", st, err, want)
	}
	ms := collect(t, reader)
	for name, v := range map[string]int64{
		"flowmill.events.read": 0, "flowmill.events.lost": 1, "flowmill.flows.evicted": 2,
		"flowmill.hooks.missed": 3, "flowmill.events.malformed": 4, "flowmill.events.incomplete": 5,
		"flowmill.events.unsupported": 6, "flowmill.polls.failed": 7, "flowmill.events.dropped": 0,
	} {
		p, ok := sumPoint(ms[name], *attribute.EmptySet())
		if !ok || p.Value != v {
			t.Errorf("%s: %+v (found %v), want %d", name, p, ok, v)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := s.Stats(); err != nil || st != want {
		t.Errorf("Stats after Close: %+v, %v; want the final %+v", st, err, want)
	}
}
