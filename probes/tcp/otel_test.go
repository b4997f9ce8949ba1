package tcp

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill/probes"
)

// harness drives the TCP mapping with synthetic events on a bus, without
// eBPF.
type harness struct {
	opened *probes.Topic[ConnOpened]
	stats  *probes.Topic[ConnStats]
	closed *probes.Topic[ConnClosed]
	reader *sdkmetric.ManualReader
	spans  *tracetest.SpanRecorder
	rec    *recorder
}

func newHarness(t testing.TB, attrs probes.Attributes, opts ...Option) *harness {
	t.Helper()
	bus := probes.NewBus()
	h := &harness{
		opened: probes.Produce[ConnOpened](bus),
		stats:  probes.Produce[ConnStats](bus),
		closed: probes.Produce[ConnClosed](bus),
		reader: sdkmetric.NewManualReader(),
		spans:  tracetest.NewSpanRecorder(),
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(h.reader))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(h.spans))
	t.Cleanup(func() {
		bus.Close()
		_ = mp.Shutdown(context.Background())
		_ = tp.Shutdown(context.Background())
	})
	r, err := New(opts...).Telemetry(&probes.TelemetryEnv{
		Bus: bus, Buffer: 1 << 16, Meter: mp.Meter("test"), Tracer: tp.Tracer("test"), Attributes: attrs,
	})
	if err != nil {
		t.Fatal(err)
	}
	h.rec = r.(*recorder)
	return h
}

// run records everything published so far, then stops the recorder.
func (h *harness) run(t testing.TB) {
	t.Helper()
	stop := make(chan struct{})
	close(stop)
	if err := h.rec.Run(stop); err != nil {
		t.Fatal(err)
	}
}

func (h *harness) metric(t testing.TB, name string) metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := h.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return metricdata.Metrics{}
}

var (
	start     = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	clientCon = Conn{
		ID: 7, PID: 42, TID: 43, Comm: "curl", Role: RoleClient,
		Local:  netip.MustParseAddrPort("10.0.0.1:54321"),
		Remote: netip.MustParseAddrPort("10.0.0.2:443"),
	}
	clientAttrs = []attribute.KeyValue{
		semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("client"),
		semconv.NetworkPeerAddress("10.0.0.2"), semconv.NetworkPeerPort(443),
		semconv.ProcessPID(42), semconv.ProcessExecutableName("curl"),
	}
)

const allAttrs = probes.DefaultAttributes | probes.AttrPID

func with(kv []attribute.KeyValue, more ...attribute.KeyValue) attribute.Set {
	return attribute.NewSet(append(append([]attribute.KeyValue{}, kv...), more...)...)
}

func TestDeltasAcrossPeriodicStatsAndClose(t *testing.T) {
	h := newHarness(t, allAttrs)
	h.opened.Publish(&ConnOpened{Time: start, Conn: clientCon})
	for _, sent := range []uint64{100, 300, 300} {
		h.stats.Publish(&ConnStats{Time: start.Add(time.Second), Conn: clientCon, Duration: time.Second,
			Stats: Stats{BytesSent: sent, BytesReceived: 10, SegmentsOut: 5, SRTT: 2 * time.Millisecond}})
	}
	h.closed.Publish(&ConnClosed{Time: start.Add(3 * time.Second), Conn: clientCon, Duration: 3 * time.Second,
		Stats: Stats{BytesSent: 500, BytesReceived: 10, SegmentsOut: 9, SegmentsIn: 4, ResetsSent: 1, SRTT: 4 * time.Millisecond}})
	h.run(t)

	tx := with(clientAttrs, semconv.NetworkIODirectionTransmit)
	rx := with(clientAttrs, semconv.NetworkIODirectionReceive)
	sum := func(pts ...metricdata.DataPoint[int64]) metricdata.Sum[int64] {
		return metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, IsMonotonic: true, DataPoints: pts}
	}
	metricdatatest.AssertEqual(t, sum(
		metricdata.DataPoint[int64]{Attributes: tx, Value: 500},
		metricdata.DataPoint[int64]{Attributes: rx, Value: 10},
	), h.metric(t, metricBytes).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, sum(
		metricdata.DataPoint[int64]{Attributes: tx, Value: 9},
		metricdata.DataPoint[int64]{Attributes: rx, Value: 4},
	), h.metric(t, metricPackets).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, sum(
		metricdata.DataPoint[int64]{Attributes: tx, Value: 1},
	), h.metric(t, metricResets).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, DataPoints: []metricdata.DataPoint[int64]{
		{Attributes: attribute.NewSet(clientAttrs...), Value: 0},
	}}, h.metric(t, metricActive).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())

	dur := h.metric(t, metricDuration).Data.(metricdata.Histogram[float64])
	if len(dur.DataPoints) != 1 || dur.DataPoints[0].Count != 1 || dur.DataPoints[0].Sum != 3 {
		t.Errorf("duration histogram = %+v, want one sample of 3s", dur.DataPoints)
	}
	rtt := h.metric(t, metricRTT).Data.(metricdata.Histogram[float64])
	if len(rtt.DataPoints) != 1 || rtt.DataPoints[0].Count != 4 || rtt.DataPoints[0].Sum != 3*0.002+0.004 {
		t.Errorf("rtt histogram = %+v, want 3 samples of 2ms and one of 4ms", rtt.DataPoints)
	}
	if n := len(h.rec.flows); n != 0 {
		t.Errorf("%d flows remembered after close, want 0", n)
	}
}

// The recorder reads three channels in no particular order; a close must
// still come after the open and the stats published before it.
func TestOrderAcrossChannels(t *testing.T) {
	h := newHarness(t, allAttrs)
	const flows = 500
	for i := range uint64(flows) {
		c := clientCon
		c.ID = i + 1
		h.opened.Publish(&ConnOpened{Time: start, Conn: c})
		h.stats.Publish(&ConnStats{Time: start, Conn: c, Stats: Stats{BytesSent: 60}})
		h.closed.Publish(&ConnClosed{Time: start, Conn: c, Stats: Stats{BytesSent: 100}})
	}
	stop := make(chan struct{})
	done := make(chan error)
	go func() { done <- h.rec.Run(stop) }()
	// Let Run pick from the three channels at random for a while.
	time.Sleep(50 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	metricdatatest.AssertEqual(t, metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, IsMonotonic: true,
		DataPoints: []metricdata.DataPoint[int64]{{Attributes: with(clientAttrs, semconv.NetworkIODirectionTransmit), Value: flows * 100}},
	}, h.metric(t, metricBytes).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality,
		DataPoints: []metricdata.DataPoint[int64]{{Attributes: attribute.NewSet(clientAttrs...), Value: 0}},
	}, h.metric(t, metricActive).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
}

func TestAttributeChoiceAndEphemeralPorts(t *testing.T) {
	server := clientCon
	server.ID, server.Role = 8, RoleServer
	server.Local, server.Remote = netip.MustParseAddrPort("[::1]:8080"), netip.MustParseAddrPort("[::1]:40000")

	for _, tc := range []struct {
		attrs probes.Attributes
		c     Conn
		want  []attribute.KeyValue
	}{
		{probes.DefaultAttributes, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"),
			semconv.NetworkPeerAddress("::1"), semconv.NetworkLocalPort(8080),
			semconv.ProcessExecutableName("curl")}},
		{probes.AttrPID, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"), semconv.ProcessPID(42)}},
		{probes.AttrServerPort, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"), semconv.NetworkLocalPort(8080)}},
		{probes.AttrServerPort, clientCon, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("client"), semconv.NetworkPeerPort(443)}},
		{0, clientCon, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("client")}},
	} {
		h := newHarness(t, tc.attrs)
		h.closed.Publish(&ConnClosed{Time: start, Conn: tc.c, Stats: Stats{BytesReceived: 1}})
		h.run(t)
		got := h.metric(t, metricBytes).Data.(metricdata.Sum[int64]).DataPoints
		want := with(tc.want, semconv.NetworkIODirectionReceive)
		if len(got) != 1 || !got[0].Attributes.Equals(&want) {
			t.Errorf("attributes %b, role %v: got %v, want %v", tc.attrs, tc.c.Role, got, want.ToSlice())
		}
	}
}

func TestSpansWithKernelTimes(t *testing.T) {
	h := newHarness(t, probes.DefaultAttributes, WithSpans())
	end := start.Add(1500 * time.Millisecond)
	h.closed.Publish(&ConnClosed{Time: end, Conn: clientCon, Duration: 1500 * time.Millisecond,
		Stats: Stats{BytesSent: 123, SRTT: time.Millisecond}})
	h.run(t)
	spans := h.spans.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1", len(spans))
	}
	s := spans[0]
	if s.Name() != spanName || !s.StartTime().Equal(start) || !s.EndTime().Equal(end) || s.SpanKind().String() != "client" {
		t.Errorf("span %s %v..%v kind %v, want %s %v..%v client", s.Name(), s.StartTime(), s.EndTime(), s.SpanKind(), spanName, start, end)
	}
	attrs := attribute.NewSet(s.Attributes()...)
	for _, kv := range []attribute.KeyValue{semconv.NetworkLocalPort(54321), semconv.NetworkPeerPort(443), attribute.Int64("flowmill.tcp.bytes_sent", 123)} {
		if v, ok := attrs.Value(kv.Key); !ok || v != kv.Value {
			t.Errorf("span attribute %s = %v, want %v", kv.Key, v.Emit(), kv.Value.Emit())
		}
	}

	off := newHarness(t, allAttrs)
	off.closed.Publish(&ConnClosed{Time: end, Conn: clientCon, Duration: time.Second})
	off.run(t)
	if n := len(off.spans.Ended()); n != 0 {
		t.Errorf("%d spans without WithSpans, want 0", n)
	}
}

func TestFlowTableIsBounded(t *testing.T) {
	h := newHarness(t, probes.DefaultAttributes, WithMaxFlows(8))
	for i := range uint64(1000) {
		c := clientCon
		c.ID = i + 1
		h.stats.Publish(&ConnStats{Conn: c, Stats: Stats{BytesSent: 1}})
	}
	h.run(t)
	if n := len(h.rec.flows); n > 8 {
		t.Errorf("%d flows remembered, want at most 8", n)
	}
}

func TestExplicitBucketsHint(t *testing.T) {
	bus := probes.NewBus()
	probes.Produce[ConnOpened](bus)
	probes.Produce[ConnStats](bus)
	closed := probes.Produce[ConnClosed](bus)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { bus.Close(); _ = mp.Shutdown(context.Background()) })
	r, err := New().Telemetry(&probes.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("test"),
		Tracer: sdktrace.NewTracerProvider().Tracer("test"), ExplicitBuckets: true})
	if err != nil {
		t.Fatal(err)
	}
	closed.Publish(&ConnClosed{Conn: clientCon, Duration: time.Second, Stats: Stats{SRTT: time.Millisecond}})
	stop := make(chan struct{})
	close(stop)
	if err := r.Run(stop); err != nil {
		t.Fatal(err)
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if m.Name == metricRTT {
			if got := m.Data.(metricdata.Histogram[float64]).DataPoints[0].Bounds; len(got) != len(rttBuckets) {
				t.Errorf("rtt bounds %v, want %v", got, rttBuckets)
			}
			return
		}
	}
	t.Fatal("no rtt histogram")
}

// BenchmarkRecordFlow measures recording one short flow (open, one
// periodic report, close) into the SDK, peers sharing attribute sets as
// clients of a few servers do.
func BenchmarkRecordFlow(b *testing.B) {
	h := newHarness(b, allAttrs)
	r := h.rec
	st := Stats{BytesSent: 1000, BytesReceived: 2000, SegmentsOut: 10, SegmentsIn: 12, SRTT: 50 * time.Microsecond}
	b.ReportAllocs()
	var id uint64
	for b.Loop() {
		id++
		c := clientCon
		c.ID = id
		r.recordOpened(&ConnOpened{Time: start, Conn: c})
		r.recordStats(&ConnStats{Time: start, Conn: c, Stats: st})
		fin := st
		fin.BytesSent += 500
		fin.SegmentsOut += 2
		r.recordClosed(&ConnClosed{Time: start, Conn: c, Stats: fin, Duration: time.Millisecond})
	}
}

// BenchmarkRecordStats measures one periodic report of an open flow whose
// counters grew.
func BenchmarkRecordStats(b *testing.B) {
	h := newHarness(b, allAttrs)
	r := h.rec
	e := ConnStats{Conn: clientCon, Stats: Stats{SRTT: 50 * time.Microsecond}}
	b.ReportAllocs()
	for b.Loop() {
		e.BytesSent += 1000
		e.BytesReceived += 1000
		e.SegmentsOut++
		e.SegmentsIn++
		r.recordStats(&e)
	}
}

// BenchmarkRecordFlowNewPeers is BenchmarkRecordFlow with a distinct peer
// per flow: every flow builds its attribute sets.
func BenchmarkRecordFlowNewPeers(b *testing.B) {
	h := newHarness(b, allAttrs)
	r := h.rec
	st := Stats{BytesSent: 1000, BytesReceived: 2000, SegmentsOut: 10, SegmentsIn: 12, SRTT: 50 * time.Microsecond}
	b.ReportAllocs()
	var id uint64
	for b.Loop() {
		id++
		c := clientCon
		c.ID = id
		c.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(id >> 16), byte(id >> 8), byte(id)}), 443)
		r.recordOpened(&ConnOpened{Time: start, Conn: c})
		r.recordStats(&ConnStats{Time: start, Conn: c, Stats: st})
		r.recordClosed(&ConnClosed{Time: start, Conn: c, Stats: st, Duration: time.Millisecond})
	}
}

// BenchmarkSDKAdd is the baseline: one counter Add with a prepared
// attribute set, the unit the flow cost is made of.
func BenchmarkSDKAdd(b *testing.B) {
	h := newHarness(b, allAttrs)
	opt := h.rec.attrSets(&clientCon).tx
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		h.rec.bytes.Add(ctx, 1, opt...)
	}
}
