package tcp

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill/internal/probe"
)

// harness drives the TCP mapping with synthetic events on a bus, without
// eBPF.
type harness struct {
	opened *probe.Topic[ConnOpened]
	stats  *probe.Topic[ConnStats]
	closed *probe.Topic[ConnClosed]
	reader *sdkmetric.ManualReader
	spans  *tracetest.SpanRecorder
	rec    *recorder
	conns  *fakeConns // the open connections tcp.active reports
}

// fakeConns stands for the attachment's table of open connections.
type fakeConns struct {
	mu   sync.Mutex
	open map[uint64]Conn
}

func (f *fakeConns) eachOpen(fn func(*Conn)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.open {
		fn(&c)
	}
	return nil
}

func (f *fakeConns) set(cs ...Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.open)
	for _, c := range cs {
		f.open[c.ID] = c
	}
}

func newHarness(t testing.TB, attrs probe.Attributes, opts ...Option) *harness {
	t.Helper()
	bus := probe.NewBus()
	conns := &fakeConns{open: map[uint64]Conn{}}
	probe.Provide[openConns](bus, conns)
	return newHarnessOn(t, bus, conns, 1<<16, attrs, opts...)
}

// newHarnessOn is newHarness on a bus that provides openConns, with
// subscriptions of buf events.
func newHarnessOn(t testing.TB, bus *probe.Bus, conns *fakeConns, buf int, attrs probe.Attributes, opts ...Option) *harness {
	t.Helper()
	h := &harness{
		conns:  conns,
		opened: probe.Produce[ConnOpened](bus),
		stats:  probe.Produce[ConnStats](bus),
		closed: probe.Produce[ConnClosed](bus),
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
	r, err := New(opts...).Telemetry(&probe.TelemetryEnv{
		Bus: bus, Buffer: buf, Meter: mp.Meter("test"), Tracer: tp.Tracer("test"), Attributes: attrs,
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

// active returns the sum of tcp.active over its series, 0 if there are
// none.
func (h *harness) active(t testing.TB) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := h.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == metricActive {
				for _, p := range m.Data.(metricdata.Sum[int64]).DataPoints {
					n += p.Value
				}
			}
		}
	}
	return n
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

const allAttrs = probe.DefaultAttributes | probe.AttrPID

func with(kv []attribute.KeyValue, more ...attribute.KeyValue) attribute.Set {
	return attribute.NewSet(append(append([]attribute.KeyValue{}, kv...), more...)...)
}

func TestDeltasAcrossPeriodicStatsAndClose(t *testing.T) {
	h := newHarness(t, allAttrs)
	h.opened.Publish(&ConnOpened{Time: start, Conn: clientCon})
	for _, sent := range []uint64{100, 300, 300} {
		h.stats.Publish(&ConnStats{Time: start.Add(time.Second), Conn: clientCon, Duration: time.Second,
			Counters: Counters{BytesSent: sent, BytesReceived: 10, SegmentsOut: 5, SRTT: 2 * time.Millisecond}})
	}
	h.closed.Publish(&ConnClosed{Time: start.Add(3 * time.Second), Conn: clientCon, Duration: 3 * time.Second,
		Counters: Counters{BytesSent: 500, BytesReceived: 10, SegmentsOut: 9, SegmentsIn: 4, ResetsSent: 1, SRTT: 4 * time.Millisecond}})
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

// The recorder reads two channels in no particular order; a close must
// still come after the stats published before it.
func TestOrderAcrossChannels(t *testing.T) {
	h := newHarness(t, allAttrs)
	const flows = 500
	for i := range uint64(flows) {
		c := clientCon
		c.ID = i + 1
		h.opened.Publish(&ConnOpened{Time: start, Conn: c})
		h.stats.Publish(&ConnStats{Time: start, Conn: c, Counters: Counters{BytesSent: 60}})
		h.closed.Publish(&ConnClosed{Time: start, Conn: c, Counters: Counters{BytesSent: 100}})
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
}

// tcp.active is observed at each collection from the connections the
// attachment knows to be open, by attribute set (a set seen before stays,
// at 0); once the recorder has stopped it is no longer observed.
func TestActiveObserved(t *testing.T) {
	h := newHarness(t, allAttrs)
	other, server := clientCon, clientCon
	other.ID, other.Local = 8, netip.MustParseAddrPort("10.0.0.1:54322")
	server.ID, server.Role = 9, RoleServer
	serverAttrs := []attribute.KeyValue{
		semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("server"),
		semconv.NetworkPeerAddress("10.0.0.2"), semconv.NetworkLocalPort(54321),
		semconv.ProcessPID(42), semconv.ProcessExecutableName("curl"),
	}
	active := func(pts ...metricdata.DataPoint[int64]) metricdata.Sum[int64] {
		return metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, DataPoints: pts}
	}
	h.conns.set(clientCon, other, server)
	metricdatatest.AssertEqual(t, active(
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(clientAttrs...), Value: 2},
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(serverAttrs...), Value: 1},
	), h.metric(t, metricActive).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	h.conns.set(server) // the client series stays, at 0
	metricdatatest.AssertEqual(t, active(
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(clientAttrs...), Value: 0},
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(serverAttrs...), Value: 1},
	), h.metric(t, metricActive).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	// A connection that opened and closed between two collections gets
	// its series too.
	brief := clientCon
	brief.ID, brief.PID = 10, 43
	briefAttrs := append(clientAttrs[:len(clientAttrs)-2:len(clientAttrs)-2], semconv.ProcessPID(43), semconv.ProcessExecutableName("curl"))
	h.closed.Publish(&ConnClosed{Time: start, Conn: brief})
	h.rec.drain()
	metricdatatest.AssertEqual(t, active(
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(clientAttrs...), Value: 0},
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(serverAttrs...), Value: 1},
		metricdata.DataPoint[int64]{Attributes: attribute.NewSet(briefAttrs...), Value: 0},
	), h.metric(t, metricActive).Data.(metricdata.Sum[int64]), metricdatatest.IgnoreTimestamp())
	h.run(t)
	var rm metricdata.ResourceMetrics
	if err := h.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == metricActive && len(m.Data.(metricdata.Sum[int64]).DataPoints) > 0 {
				t.Errorf("tcp.active observed after the recorder stopped: %+v", m.Data)
			}
		}
	}
}

func TestAttributeChoiceAndEphemeralPorts(t *testing.T) {
	server := clientCon
	server.ID, server.Role = 8, RoleServer
	server.Local, server.Remote = netip.MustParseAddrPort("[::1]:8080"), netip.MustParseAddrPort("[::1]:40000")

	for _, tc := range []struct {
		attrs probe.Attributes
		c     Conn
		want  []attribute.KeyValue
	}{
		{probe.DefaultAttributes, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"),
			semconv.NetworkPeerAddress("::1"), semconv.NetworkLocalPort(8080),
			semconv.ProcessExecutableName("curl")}},
		{probe.AttrPID, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"), semconv.ProcessPID(42)}},
		{probe.AttrServerPort, server, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv6, attrRole.String("server"), semconv.NetworkLocalPort(8080)}},
		{probe.AttrServerPort, clientCon, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("client"), semconv.NetworkPeerPort(443)}},
		{0, clientCon, []attribute.KeyValue{
			semconv.NetworkTransportTCP, semconv.NetworkTypeIPv4, attrRole.String("client")}},
	} {
		h := newHarness(t, tc.attrs)
		h.closed.Publish(&ConnClosed{Time: start, Conn: tc.c, Counters: Counters{BytesReceived: 1}})
		h.run(t)
		got := h.metric(t, metricBytes).Data.(metricdata.Sum[int64]).DataPoints
		want := with(tc.want, semconv.NetworkIODirectionReceive)
		if len(got) != 1 || !got[0].Attributes.Equals(&want) {
			t.Errorf("attributes %b, role %v: got %v, want %v", tc.attrs, tc.c.Role, got, want.ToSlice())
		}
	}
}

func TestSpansWithKernelTimes(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes, WithSpans())
	end := start.Add(1500 * time.Millisecond)
	h.closed.Publish(&ConnClosed{Time: end, Conn: clientCon, Duration: 1500 * time.Millisecond,
		Counters: Counters{BytesSent: 123, SRTT: time.Millisecond}})
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
	h := newHarness(t, probe.DefaultAttributes, WithMaxFlows(8))
	for i := range uint64(1000) {
		c := clientCon
		c.ID = i + 1
		h.stats.Publish(&ConnStats{Conn: c, Counters: Counters{BytesSent: 1}})
	}
	h.run(t)
	if n := len(h.rec.flows); n > 8 {
		t.Errorf("%d flows remembered, want at most 8", n)
	}
}

func TestExplicitBucketsHint(t *testing.T) {
	bus := probe.NewBus()
	probe.Produce[ConnOpened](bus)
	probe.Produce[ConnStats](bus)
	closed := probe.Produce[ConnClosed](bus)
	probe.Provide[openConns](bus, &fakeConns{open: map[uint64]Conn{}})
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { bus.Close(); _ = mp.Shutdown(context.Background()) })
	r, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("test"),
		Tracer: sdktrace.NewTracerProvider().Tracer("test"), ExplicitBuckets: true})
	if err != nil {
		t.Fatal(err)
	}
	closed.Publish(&ConnClosed{Conn: clientCon, Duration: time.Second, Counters: Counters{SRTT: time.Millisecond}})
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
	st := Counters{BytesSent: 1000, BytesReceived: 2000, SegmentsOut: 10, SegmentsIn: 12, SRTT: 50 * time.Microsecond}
	b.ReportAllocs()
	var id uint64
	for b.Loop() {
		id++
		c := clientCon
		c.ID = id
		r.recordStats(&ConnStats{Time: start, Conn: c, Counters: st})
		fin := st
		fin.BytesSent += 500
		fin.SegmentsOut += 2
		r.recordClosed(&ConnClosed{Time: start, Conn: c, Counters: fin, Duration: time.Millisecond})
	}
}

// BenchmarkRecordStats measures one periodic report of an open flow whose
// counters grew.
func BenchmarkRecordStats(b *testing.B) {
	h := newHarness(b, allAttrs)
	r := h.rec
	e := ConnStats{Conn: clientCon, Counters: Counters{SRTT: 50 * time.Microsecond}}
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
	st := Counters{BytesSent: 1000, BytesReceived: 2000, SegmentsOut: 10, SegmentsIn: 12, SRTT: 50 * time.Microsecond}
	b.ReportAllocs()
	var id uint64
	for b.Loop() {
		id++
		c := clientCon
		c.ID = id
		c.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(id >> 16), byte(id >> 8), byte(id)}), 443)
		r.recordStats(&ConnStats{Time: start, Conn: c, Counters: st})
		r.recordClosed(&ConnClosed{Time: start, Conn: c, Counters: st, Duration: time.Millisecond})
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
