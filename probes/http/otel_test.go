package http

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/probe"
)

// TestTelemetry: the client span, published before its server span (as the
// probe does: the client returns first), becomes the child of the exported
// server span, which is the child of the remote traceparent span.
func TestTelemetry(t *testing.T) {
	bus := probe.NewBus()
	servers := probe.Produce[ServerRequest](bus)
	probe.Produce[ClientRequest](bus)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
	if err != nil {
		t.Fatal(err)
	}
	r := rec.(*recorder)
	t0 := time.Unix(1000, 0)
	remote := SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{2}, ParentSpanID: trace.SpanID{3}, RemoteParent: true, Sampled: true}
	// The clients first, as the probe publishes them.
	r.recordClient(&ClientRequest{Start: t0.Add(time.Millisecond), End: t0.Add(2 * time.Millisecond), Method: "GET", Host: "db:8080", Path: "/q",
		StatusCode: 503, Span: SpanContext{TraceID: remote.TraceID, SpanID: trace.SpanID{4}, ParentSpanID: remote.SpanID}, Parent: ParentByGoroutine,
		Scheme: SchemeHTTPS, ProtocolVersion: ProtocolVersion{1, 1}})
	r.recordClient(&ClientRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "BREW", Host: "127.0.0.1:1", Error: "*net.OpError",
		Span: SpanContext{TraceID: trace.TraceID{9}, SpanID: trace.SpanID{9}}})
	servers.Publish(&ServerRequest{Start: t0, End: t0.Add(3 * time.Millisecond), Method: "GET", Path: "/users/7", Route: "/users/{id}",
		Host: "api:80", Peer: netip.MustParseAddrPort("10.0.0.1:5555"), StatusCode: 500, Span: remote,
		Scheme: SchemeHTTPS, ProtocolVersion: ProtocolVersion{2, 0}})
	// The metrics come from the kernel's series, here a fake's.
	src := &fakeTotals{}
	src.add("s", requestSeries{IsServer: true, Server: ServerRequest{Method: "GET", Route: "/users/{id}", StatusCode: 500,
		Scheme: SchemeHTTPS, ProtocolVersion: ProtocolVersion{2, 0}}}, 3*time.Millisecond)
	src.add("c1", requestSeries{Client: ClientRequest{Method: "GET", Host: "db:8080", StatusCode: 503,
		ProtocolVersion: ProtocolVersion{1, 1}}}, time.Millisecond)
	src.add("c2", requestSeries{Client: ClientRequest{Method: "BREW", Host: "127.0.0.1:1", Error: "*net.OpError"}}, time.Millisecond)
	r.red.src = func() requestTotals { return src }
	stop := make(chan struct{})
	close(stop) // record what is buffered, then return
	if err := rec.Run(stop); err != nil {
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
	has(srv, semconv.URLScheme("https"))
	has(srv, semconv.NetworkProtocolVersion("2"))
	has(cl, semconv.URLScheme("https"))
	has(cl, semconv.NetworkProtocolVersion("1.1"))
	for _, a := range orphan.Attributes() {
		if a.Key == semconv.URLSchemeKey || a.Key == semconv.NetworkProtocolVersionKey {
			t.Errorf("client without a response or a known scheme has %v", a)
		}
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		h, ok := m.Data.(metricdata.Histogram[float64])
		if !ok {
			continue
		}
		for _, dp := range h.DataPoints {
			counts[m.Name] += dp.Count
			scheme, hasScheme := dp.Attributes.Value(semconv.URLSchemeKey)
			version, _ := dp.Attributes.Value(semconv.NetworkProtocolVersionKey)
			host, _ := dp.Attributes.Value(semconv.ServerAddressKey)
			switch {
			case m.Name == metricServerDuration:
				// url.scheme is required, network.protocol.version
				// recommended.
				if scheme.AsString() != "https" || version.AsString() != "2" {
					t.Errorf("server metric attributes %v", dp.Attributes.ToSlice())
				}
			case host.AsString() == "db":
				// url.scheme is opt-in on the client metric.
				if hasScheme || version.AsString() != "1.1" {
					t.Errorf("client metric attributes %v", dp.Attributes.ToSlice())
				}
			}
		}
	}
	if counts[metricServerDuration] != 1 || counts[metricClientDuration] != 2 {
		t.Errorf("histogram counts %v", counts)
	}
}

// fakeTCP is a TCP family's service with made-up connections, counting
// how it is asked.
type fakeTCP struct {
	mu      sync.Mutex
	conns   map[netip.AddrPort]probe.TCPConnInfo
	singles int   // TCPConn calls
	batches []int // the size of each TCPConnBatch
}

func (f *fakeTCP) TCPConn(local, remote netip.AddrPort) (probe.TCPConnInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.singles++
	i, ok := f.conns[remote]
	return i, ok && !local.IsValid()
}

func (f *fakeTCP) TCPConnBatch(qs []probe.TCPConnQuery) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.batches = append(f.batches, len(qs))
	for i := range qs {
		qs[i].Info, qs[i].OK = f.conns[qs[i].Remote]
		qs[i].OK = qs[i].OK && !qs[i].Local.IsValid()
	}
	return nil
}

func (f *fakeTCP) set(peer netip.AddrPort, i *probe.TCPConnInfo) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i == nil {
		delete(f.conns, peer)
	} else {
		f.conns[peer] = *i
	}
}

// newRecorder returns the probe's recorder on bus, recording into sr.
func newRecorder(t *testing.T, bus *probe.Bus, sr *tracetest.SpanRecorder) *recorder {
	t.Helper()
	probe.Produce[ServerRequest](bus)
	probe.Produce[ClientRequest](bus)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 1 << 12, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
	if err != nil {
		t.Fatal(err)
	}
	r := rec.(*recorder)
	t.Cleanup(r.release)
	return r
}

// With a TCP family in the session, a server span carries its connection's
// RTT and the retransmissions since the previous request on it.
func TestTelemetryTCP(t *testing.T) {
	bus := probe.NewBus()
	peer := netip.MustParseAddrPort("10.0.0.1:5555")
	tcp := &fakeTCP{conns: map[netip.AddrPort]probe.TCPConnInfo{}}
	tcp.set(peer, &probe.TCPConnInfo{SRTT: 1500 * time.Microsecond, MinRTT: time.Millisecond, Retransmits: 3})
	probe.Provide[probe.TCPConns](bus, tcp)
	sr := tracetest.NewSpanRecorder()
	r := newRecorder(t, bus, sr)
	t0 := time.Unix(1000, 0)
	req := func(path string) { // one batch each
		r.recordServers(ServerRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "GET", Path: path, Peer: peer, StatusCode: 200,
			Span: SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{byte(len(path))}}}, nil)
	}
	req("/a")
	tcp.set(peer, &probe.TCPConnInfo{SRTT: 2 * time.Millisecond, MinRTT: time.Millisecond, Retransmits: 5})
	req("/bb")
	req("/ccc") // no new retransmissions
	tcp.set(peer, nil)
	req("/dddd") // connection unknown: no TCP attributes
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

// At a high request rate, the connections of the served requests waiting
// to be recorded are looked up together, never one request at a time: a
// lookup reads kernel state (and the single one may wait for the
// session's records and a rate limit), which per request would leave the
// exporter behind.
func TestTelemetryTCPBatched(t *testing.T) {
	const n = 3000
	bus := probe.NewBus()
	tcp := &fakeTCP{conns: map[netip.AddrPort]probe.TCPConnInfo{}}
	peer := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 4000)
	}
	for i := range n {
		tcp.set(peer(i), &probe.TCPConnInfo{SRTT: time.Duration(i+1) * time.Microsecond})
	}
	probe.Provide[probe.TCPConns](bus, tcp)
	sr := tracetest.NewSpanRecorder()
	r := newRecorder(t, bus, sr)
	servers := probe.Produce[ServerRequest](bus)
	t0 := time.Unix(1000, 0)
	for i := range n {
		var sid trace.SpanID
		binary.BigEndian.PutUint64(sid[:], uint64(i+1))
		servers.Publish(&ServerRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "GET", Path: fmt.Sprintf("/%d", i),
			Peer: peer(i), StatusCode: 200, Span: SpanContext{TraceID: trace.TraceID{1}, SpanID: sid}})
	}
	stop := make(chan struct{})
	close(stop) // record what is buffered, then return
	if err := r.Run(stop); err != nil {
		t.Fatal(err)
	}
	if tcp.singles != 0 || len(tcp.batches) > (n+maxBatch-1)/maxBatch {
		t.Errorf("%d requests: %d single lookups and %d batches %v, want at most %d batches", n, tcp.singles, len(tcp.batches), tcp.batches, (n+maxBatch-1)/maxBatch)
	}
	spans := sr.Ended()
	if len(spans) != n {
		t.Fatalf("%d spans, want %d", len(spans), n)
	}
	for _, s := range spans {
		path, _ := attrOf(s, semconv.URLPathKey)
		srtt, ok := attrOf(s, attrTCPSRTT)
		var i int
		fmt.Sscanf(path.AsString(), "/%d", &i)
		if !ok || srtt.AsFloat64() != (time.Duration(i+1)*time.Microsecond).Seconds() {
			t.Errorf("%s: srtt %v (present %v)", path.AsString(), srtt.AsFloat64(), ok)
		}
	}
}

// The exporter may be made before the session's probes attach, so the TCP
// family's service is looked up when requests are recorded, not when the
// recorder is made; without one, spans simply have no TCP attributes.
func TestTelemetryTCPLate(t *testing.T) {
	bus := probe.NewBus()
	sr := tracetest.NewSpanRecorder()
	r := newRecorder(t, bus, sr)
	peer := netip.MustParseAddrPort("10.0.0.1:5555")
	t0 := time.Unix(1000, 0)
	req := func(path string) {
		r.recordServers(ServerRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "GET", Path: path, Peer: peer, StatusCode: 200,
			Span: SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{byte(len(path))}}}, nil)
	}
	req("/before") // no TCP family yet
	tcp := &fakeTCP{conns: map[netip.AddrPort]probe.TCPConnInfo{peer: {SRTT: time.Millisecond}}}
	probe.Provide[probe.TCPConns](bus, tcp)
	req("/after")
	spans := recorded(sr)
	if _, ok := attrOf(spans["/before"], attrTCPSRTT); ok {
		t.Error("TCP attributes without a TCP family")
	}
	if v, ok := attrOf(spans["/after"], attrTCPSRTT); !ok || v.AsFloat64() != 0.001 {
		t.Errorf("after the TCP family attached: srtt %v (present %v)", v.AsFloat64(), ok)
	}
}

// recorded returns the ended spans by URL path.
func recorded(sr *tracetest.SpanRecorder) map[string]sdktrace.ReadOnlySpan {
	out := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range sr.Ended() {
		if v, ok := attrOf(s, semconv.URLPathKey); ok {
			out[v.AsString()] = s
		}
	}
	return out
}

// recordAll publishes events with publish before the recorder runs, then
// runs it until it has recorded what is buffered, and returns the spans
// by URL path.
func recordAll(t *testing.T, bus *probe.Bus, publish func(servers *probe.Topic[ServerRequest], clients *probe.Topic[ClientRequest])) map[string]sdktrace.ReadOnlySpan {
	t.Helper()
	servers, clients := probe.Produce[ServerRequest](bus), probe.Produce[ClientRequest](bus)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 1 << 12, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
	if err != nil {
		t.Fatal(err)
	}
	publish(servers, clients)
	stop := make(chan struct{})
	close(stop) // Run records what is buffered, then returns
	if err := rec.Run(stop); err != nil {
		t.Fatal(err)
	}
	return recorded(sr)
}

func attrOf(s sdktrace.ReadOnlySpan, k attribute.Key) (attribute.Value, bool) {
	for _, a := range s.Attributes() {
		if a.Key == k {
			return a.Value, true
		}
	}
	return attribute.Value{}, false
}

// Body sizes that are not known (a chunked request body, what a handler
// wrote on a hijacked connection, a response without Content-Length) are
// left out of the span rather than reported as -1.
func TestTelemetryBodySizes(t *testing.T) {
	t0 := time.Unix(1000, 0)
	spans := recordAll(t, probe.NewBus(), func(servers *probe.Topic[ServerRequest], clients *probe.Topic[ClientRequest]) {
		srv := func(path string, req, resp int64, status int, hijacked bool) {
			servers.Publish(&ServerRequest{Start: t0, End: t0.Add(time.Millisecond), Method: "POST", Path: path, StatusCode: status,
				RequestBodySize: req, ResponseBodySize: resp, Hijacked: hijacked,
				Span: SpanContext{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{byte(len(path))}}})
		}
		srv("/chunked", -1, 5, 200, false)
		srv("/sized", 10, 7, 200, false)
		srv("/hijacked", 0, 0, 0, true)
		cl := func(path, method string, req, resp int64, status int) {
			clients.Publish(&ClientRequest{Start: t0, End: t0.Add(time.Millisecond), Method: method, Host: "db:80", Path: path,
				StatusCode: status, RequestBodySize: req, ResponseBodySize: resp,
				Span: SpanContext{TraceID: trace.TraceID{2}, SpanID: trace.SpanID{byte(len(path))}}})
		}
		cl("/c/chunked", "POST", -1, -1, 200)
		cl("/c/sized", "PUT", 3, 4, 200)
		cl("/c/head", "HEAD", 0, 99, 200)
	})
	for _, w := range []struct {
		path      string
		req, resp int64 // -1: absent
	}{
		{"/chunked", -1, 5}, {"/sized", 10, 7}, {"/hijacked", 0, -1},
		{"/c/chunked", -1, -1}, {"/c/sized", 3, 4}, {"/c/head", 0, -1},
	} {
		s := spans[w.path]
		if s == nil {
			t.Errorf("no span for %s", w.path)
			continue
		}
		for _, f := range []struct {
			key  attribute.Key
			want int64
		}{{semconv.HTTPRequestBodySizeKey, w.req}, {semconv.HTTPResponseBodySizeKey, w.resp}} {
			v, ok := attrOf(s, f.key)
			switch {
			case f.want < 0 && ok:
				t.Errorf("%s: %s = %v, want it left out", w.path, f.key, v.AsInt64())
			case f.want >= 0 && (!ok || v.AsInt64() != f.want):
				t.Errorf("%s: %s = %v (present %v), want %d", w.path, f.key, v.AsInt64(), ok, f.want)
			}
		}
	}
	if v, ok := attrOf(spans["/hijacked"], semconv.HTTPResponseStatusCodeKey); ok {
		t.Errorf("hijacked: status code %v, want it left out", v.AsInt64())
	}
}

// TestTelemetryIDs: with flowmill.IDGenerator, the exported spans carry
// their events' IDs (those sent downstream in traceparent): a root server
// span its trace and span ID, its client span its span ID, as the child of
// the server span; with the SDK's own generator, the structure alone is
// kept, and the mismatch is said once through otel.Handle.
func TestTelemetryIDs(t *testing.T) {
	root := ServerRequest{Method: "GET", Path: "/a", Route: "/a", StatusCode: 200,
		Span: SpanContext{TraceID: trace.TraceID{7, 7}, SpanID: trace.SpanID{1, 1}}}
	remote := ServerRequest{Method: "GET", Path: "/b", Route: "/b", StatusCode: 200,
		Span: SpanContext{TraceID: trace.TraceID{8}, SpanID: trace.SpanID{2, 2}, ParentSpanID: trace.SpanID{9}, RemoteParent: true, Sampled: true}}
	client := ClientRequest{Method: "GET", Host: "b:80", Span: SpanContext{TraceID: root.Span.TraceID, SpanID: trace.SpanID{3, 3}, ParentSpanID: root.Span.SpanID},
		Parent: ParentByContext, Propagation: PropagationInjected}
	orphan := ClientRequest{Method: "PUT", Host: "c:80", Span: SpanContext{TraceID: trace.TraceID{5}, SpanID: trace.SpanID{4, 4}}}
	record := func(t *testing.T, opts ...sdktrace.TracerProviderOption) map[string]sdktrace.ReadOnlySpan {
		bus := probe.NewBus()
		servers, clients := probe.Produce[ServerRequest](bus), probe.Produce[ClientRequest](bus)
		sr := tracetest.NewSpanRecorder()
		tp := sdktrace.NewTracerProvider(append(opts, sdktrace.WithSpanProcessor(sr))...)
		mp := sdkmetric.NewMeterProvider()
		rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: tp.Tracer("t")})
		if err != nil {
			t.Fatal(err)
		}
		clients.Publish(&client)
		clients.Publish(&orphan)
		servers.Publish(&root)
		servers.Publish(&remote)
		stop := make(chan struct{})
		close(stop)
		if err := rec.Run(stop); err != nil {
			t.Fatal(err)
		}
		out := map[string]sdktrace.ReadOnlySpan{}
		for _, s := range sr.Ended() {
			out[s.Name()] = s
		}
		if len(out) != 4 {
			t.Fatalf("spans %v", out)
		}
		return out
	}
	var handled []error
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { handled = append(handled, err) }))
	t.Cleanup(func() { otel.SetErrorHandler(otel.ErrorHandlerFunc(func(error) {})) })

	t.Run("flowmill IDs", func(t *testing.T) {
		handled = nil
		s := record(t, sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
		check := func(name string, tid trace.TraceID, sid, parent trace.SpanID) {
			t.Helper()
			sp := s[name]
			if sp.SpanContext().TraceID() != tid || sp.SpanContext().SpanID() != sid || sp.Parent().SpanID() != parent {
				t.Errorf("%s: trace %s span %s parent %s, want %s %s %s", name, sp.SpanContext().TraceID(), sp.SpanContext().SpanID(), sp.Parent().SpanID(), tid, sid, parent)
			}
		}
		check("GET", client.Span.TraceID, client.Span.SpanID, root.Span.SpanID)
		check("PUT", orphan.Span.TraceID, orphan.Span.SpanID, trace.SpanID{})
		a, b := s["GET /a"], s["GET /b"]
		if a == nil || b == nil {
			t.Fatalf("server spans missing: %v", s)
		}
		if a.SpanContext().TraceID() != root.Span.TraceID || a.SpanContext().SpanID() != root.Span.SpanID || a.Parent().IsValid() {
			t.Errorf("root server span %v, want %v", a.SpanContext(), root.Span)
		}
		if b.SpanContext().TraceID() != remote.Span.TraceID || b.SpanContext().SpanID() != remote.Span.SpanID || b.Parent().SpanID() != remote.Span.ParentSpanID {
			t.Errorf("server span %v (parent %v), want %v", b.SpanContext(), b.Parent(), remote.Span)
		}
		if len(handled) != 0 {
			t.Errorf("errors handled: %v", handled)
		}
	})
	t.Run("SDK IDs", func(t *testing.T) {
		handled = nil
		s := record(t)
		if s["GET"].SpanContext().SpanID() == client.Span.SpanID {
			t.Errorf("the SDK's generator gave the event's ID")
		}
		if len(handled) != 1 || !strings.Contains(handled[0].Error(), "IDGenerator") {
			t.Errorf("errors handled: %v, want one about flowmill.IDGenerator", handled)
		}
	})
}

// fakeTotals is a kernel's table of series, made up.
type fakeTotals struct {
	mu     sync.Mutex
	ids    []string
	series map[string]requestSeries
	b      map[string]*redBuckets
	lost   uint64
}

// add counts a request of duration d in the series id.
func (f *fakeTotals) add(id string, s requestSeries, d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.series == nil {
		f.series, f.b = map[string]requestSeries{}, map[string]*redBuckets{}
	}
	if _, ok := f.series[id]; !ok {
		f.ids = append(f.ids, id)
		f.series[id], f.b[id] = s, &redBuckets{}
	}
	i := min(int(d.Nanoseconds()>>10), redBucketCount-1) // any bucket will do
	f.b[id][i].Count++
	f.b[id][i].SumNs += uint64(d.Nanoseconds())
}

func (f *fakeTotals) eachSeries(fn func(string, func() (requestSeries, bool), *redBuckets)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, id := range f.ids {
		b := *f.b[id]
		fn(id, func() (requestSeries, bool) { return f.series[id], true }, &b)
	}
	return nil
}

func (f *fakeTotals) unaggregated() uint64 { return f.lost }

// TestREDExact: each collection records the requests the kernel counted
// since the last, so that every collection's histogram has the exact count
// and sum of the requests so far (cumulative) or since the last (delta),
// whatever their spread over the buckets; a collection that finds nothing
// new records nothing.
func TestREDExact(t *testing.T) {
	for _, temp := range []metricdata.Temporality{metricdata.CumulativeTemporality, metricdata.DeltaTemporality} {
		t.Run(temp.String(), func(t *testing.T) {
			bus := probe.NewBus()
			probe.Produce[ServerRequest](bus)
			probe.Produce[ClientRequest](bus)
			reader := sdkmetric.NewManualReader(sdkmetric.WithTemporalitySelector(func(sdkmetric.InstrumentKind) metricdata.Temporality { return temp }))
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
			rec, err := New().Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 16, Meter: mp.Meter("t"), Tracer: trace.NewNoopTracerProvider().Tracer("t")})
			if err != nil {
				t.Fatal(err)
			}
			r := rec.(*recorder)
			t.Cleanup(r.release)
			src := &fakeTotals{}
			r.red.src = func() requestTotals { return src }
			get := &requestSeries{IsServer: true, Server: ServerRequest{Method: "GET", Route: "/a", StatusCode: 200, Scheme: SchemeHTTP}}
			collect := func() (count uint64, sum float64) {
				var rm metricdata.ResourceMetrics
				if err := reader.Collect(context.Background(), &rm); err != nil {
					t.Fatal(err)
				}
				for _, sm := range rm.ScopeMetrics {
					for _, m := range sm.Metrics {
						if h, ok := m.Data.(metricdata.Histogram[float64]); ok && m.Name == metricServerDuration {
							for _, dp := range h.DataPoints {
								count += dp.Count
								sum += dp.Sum
							}
						}
					}
				}
				return count, sum
			}
			var wantN uint64
			var wantSum time.Duration
			for round, n := range []int{1, 997, 0, 50} {
				if temp == metricdata.DeltaTemporality {
					wantN, wantSum = 0, 0
				}
				for i := range n {
					d := time.Duration(i*7919+round) * time.Microsecond
					src.add("get", *get, d)
					wantN++
					wantSum += d
				}
				gotN, gotSum := collect()
				if gotN != wantN || math.Abs(gotSum-wantSum.Seconds()) > 1e-9*float64(wantN+1) {
					t.Errorf("round %d: count %d sum %.9fs, want %d and %.9fs", round, gotN, gotSum, wantN, wantSum.Seconds())
				}
			}
		})
	}
}
