package tcp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
)

// WithSpans makes the exporter (flowmill.NewExporter) create one span per
// closed connection: it starts when the connection was established and
// ends when it closed, both at the kernel's times, with kind client or
// server and the final counters as attributes. Off by default.
func WithSpans() Option {
	return func(p *Probe) { p.spans = true }
}

// Names of the metrics and the invented attributes, as documented in the
// README. Where a semantic convention exists it is used instead.
const (
	metricBytes    = "tcp.bytes"
	metricPackets  = "tcp.packets"
	metricRetrans  = "tcp.retrans"
	metricResets   = "tcp.resets"
	metricActive   = "tcp.active"
	metricRTT      = "tcp.rtt"
	metricDuration = "tcp.connection.duration"
	spanName       = "tcp.connection"

	attrRole = attribute.Key("flowmill.tcp.role")
)

// Explicit bucket boundaries in seconds, hinted with
// flowmill.WithExplicitBuckets.
var (
	rttBuckets      = []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5}
	durationBuckets = []float64{1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 500e-3, 1, 5, 10, 30, 60, 300, 600, 1800, 3600}
)

// openConns is the service through which the probe's attachment tells its
// Telemetry which connections are open, for tcp.active. It is private to
// the family, provided on the session's bus.
type openConns interface {
	// eachOpen calls fn for every connection known to be open once the
	// records the kernel sent so far are handled and the flows it evicted
	// from its table (whose close is never reported) are forgotten.
	eachOpen(fn func(*Conn)) error
}

// Telemetry maps the probe's events to OpenTelemetry; flowmill.NewExporter
// calls it (see probe.Telemetry).
//
// Per flow, the cumulative counters of the periodic ConnStats and of the
// final ConnClosed are turned into deltas against the last values seen for
// that flow (Conn.ID), so each byte, segment and reset is counted once.
// A periodic reading can, rarely, count the peer's FIN as a received byte
// (when it arrives while the kernel assembles the reading); a counter
// cannot go back, so that byte stays counted.
// The table of last values is bounded by WithMaxFlows; a flow leaves it at
// its close. tcp.active is observed at each collection from the
// connections the probe knows to be open (not from the events, which a
// full subscription may miss, and of which a flow evicted from the
// kernel's table has no close).
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	conns, ok := probe.Lookup[openConns](env.Bus)
	if !ok {
		return nil, fmt.Errorf("tcp: the session has no table of open TCP connections: the TCP probe is not attached to it; start the session with it (flowmill.WithProbes)")
	}
	r := &recorder{
		spans:  p.spans,
		tracer: env.Tracer,
		attrs:  env.Attributes,
		conns:  conns,
		max:    int(p.maxFlows),
		flows:  make(map[uint64]flowState),
		sets:   make(map[setKey]*attrSets),
		active: activeSets{sets: make(map[setKey]attribute.Set)},
	}
	if err := r.instruments(env.Meter, env.ExplicitBuckets); err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	var err error
	if r.stats, err = probe.Subscribe[ConnStats](env.Bus, env.Buffer); err != nil {
		r.callback.Unregister()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	if r.closed, err = probe.Subscribe[ConnClosed](env.Bus, env.Buffer); err != nil {
		r.callback.Unregister()
		r.stats.Close()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	return r, nil
}

type recorder struct {
	spans  bool
	tracer trace.Tracer
	attrs  probe.Attributes

	bytes, packets, retrans, resets metric.Int64Counter
	rtt, duration                   metric.Float64Histogram

	// tcp.active, observed from conns by callback.
	conns    openConns
	open     metric.Int64ObservableUpDownCounter
	callback metric.Registration
	active   activeSets

	stats  *probe.Sub[ConnStats]
	closed *probe.Sub[ConnClosed]

	// Used by Run's goroutine only.
	flows map[uint64]flowState
	max   int
	tick  uint64 // events handled, the clock of flowState.touched
	sets  map[setKey]*attrSets
}

// flowState is what the recorder remembers of an open flow: the cumulative
// counters already recorded.
type flowState struct {
	sent, received  uint64
	segsOut, segsIn uint32
	retrans         uint32
	rstSent, rstRec uint32
	touched         uint64
	sets            *attrSets
}

// attrSets are a flow's metric attributes, built once per distinct set,
// as ready option slices: passing one option to a variadic parameter
// would allocate its slice on every measurement.
type attrSets struct {
	base, tx, rx []metric.AddOption // without and with network.io.direction
	rec          []metric.RecordOption
}

// setKey is what the selected metric attributes depend on; fields of
// groups that are not selected stay zero, so flows share sets.
type setKey struct {
	role       Role
	v6         bool
	peer       netip.Addr
	serverPort uint16
	pid        uint32
	comm       string
}

const maxSets = 4096

func (r *recorder) instruments(m metric.Meter, explicit bool) error {
	var errs [7]error
	r.bytes, errs[0] = m.Int64Counter(metricBytes, metric.WithUnit("By"),
		metric.WithDescription("TCP payload bytes, by network.io.direction: acknowledged by the peer (transmit) or received in order (receive)."))
	r.packets, errs[1] = m.Int64Counter(metricPackets, metric.WithUnit("{segment}"),
		metric.WithDescription("TCP segments sent (transmit) and received (receive), pure ACKs and retransmissions included."))
	r.retrans, errs[2] = m.Int64Counter(metricRetrans, metric.WithUnit("{segment}"),
		metric.WithDescription("TCP segments retransmitted."))
	r.resets, errs[3] = m.Int64Counter(metricResets, metric.WithUnit("{segment}"),
		metric.WithDescription("TCP RST segments sent (transmit) and received (receive)."))
	r.open, errs[4] = m.Int64ObservableUpDownCounter(metricActive, metric.WithUnit("{connection}"),
		metric.WithDescription("Open TCP connections: established, not yet closed."))
	rttOpts := []metric.Float64HistogramOption{metric.WithUnit("s"),
		metric.WithDescription("Smoothed TCP round-trip time (the kernel's srtt): one sample per connection per stats report and one at close.")}
	durOpts := []metric.Float64HistogramOption{metric.WithUnit("s"),
		metric.WithDescription("Time from establishment to close of TCP connections.")}
	if explicit {
		rttOpts = append(rttOpts, metric.WithExplicitBucketBoundaries(rttBuckets...))
		durOpts = append(durOpts, metric.WithExplicitBucketBoundaries(durationBuckets...))
	}
	r.rtt, errs[5] = m.Float64Histogram(metricRTT, rttOpts...)
	r.duration, errs[6] = m.Float64Histogram(metricDuration, durOpts...)
	if err := errors.Join(errs[:]...); err != nil {
		return fmt.Errorf("creating instruments: %w", err)
	}
	reg, err := m.RegisterCallback(r.observeActive, r.open)
	if err != nil {
		return fmt.Errorf("registering the %s callback: %w", metricActive, err)
	}
	r.callback = reg
	return nil
}

// activeSets are the attribute sets of tcp.active, used by its callback
// (which the SDK may call from several goroutines, apart from Run's): each
// set seen, bounded by maxSets.
type activeSets struct {
	mu     sync.Mutex
	sets   map[setKey]attribute.Set
	counts map[setKey]int64
}

// note makes sure tcp.active has a series for k.
func (a *activeSets) note(r *recorder, k setKey) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.sets[k]; ok {
		return
	}
	if len(a.sets) >= maxSets {
		clear(a.sets)
	}
	a.sets[k] = attribute.NewSet(r.attributes(k)...)
}

// observeActive observes tcp.active: the open connections, by attribute
// set.
func (r *recorder) observeActive(_ context.Context, o metric.Observer) error {
	a := &r.active
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.counts == nil {
		a.counts = make(map[setKey]int64)
	}
	clear(a.counts)
	err := r.conns.eachOpen(func(c *Conn) { a.counts[r.setKey(c)]++ })
	if err != nil {
		return fmt.Errorf("tcp: reading the open connections for %s: %w", metricActive, err)
	}
	if len(a.sets)+len(a.counts) > maxSets {
		clear(a.sets)
	}
	for k := range a.counts {
		if _, ok := a.sets[k]; !ok {
			a.sets[k] = attribute.NewSet(r.attributes(k)...)
		}
	}
	// A series once seen stays, at 0 when nothing of it is open (as an
	// UpDownCounter's would), until the sets are cleared.
	for k, set := range a.sets {
		o.ObserveInt64(r.open, a.counts[k], metric.WithAttributeSet(set))
	}
	return nil
}

// Run records events until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.release()
	stats, closed := r.stats.C(), r.closed.C()
	for stats != nil || closed != nil {
		select {
		case <-stop:
			r.drain()
			return nil
		case e, ok := <-stats:
			if !ok {
				stats = nil
				continue
			}
			r.recordStats(&e)
		case e, ok := <-closed:
			if !ok {
				closed = nil
				continue
			}
			r.handleClosed(&e)
		}
	}
	return nil
}

func (r *recorder) release() {
	r.callback.Unregister()
	r.stats.Close()
	r.closed.Close()
	clear(r.flows)
	clear(r.sets)
}

// drain records what the channels hold.
func (r *recorder) drain() {
	r.drainStats()
	for {
		select {
		case e, ok := <-r.closed.C():
			if !ok {
				return
			}
			r.handleClosed(&e)
		default:
			return
		}
	}
}

// handleClosed records a close after everything published before it. The
// probe publishes no ConnStats of a flow after its ConnClosed, but on
// another channel: whatever of them is already buffered was published
// before e, and is recorded first.
func (r *recorder) handleClosed(e *ConnClosed) {
	r.drainStats()
	r.recordClosed(e)
}

func (r *recorder) drainStats() {
	for {
		select {
		case e, ok := <-r.stats.C():
			if !ok {
				return
			}
			r.recordStats(&e)
		default:
			return
		}
	}
}

func (r *recorder) recordStats(e *ConnStats) {
	f := r.flow(&e.Conn)
	r.add(&f, &e.Counters)
	r.flows[e.ID] = f
}

func (r *recorder) recordClosed(e *ConnClosed) {
	f := r.flow(&e.Conn)
	r.add(&f, &e.Counters)
	ctx := context.Background()
	// tcp.active gets the series of every connection seen, also one that
	// opened and closed between two collections.
	r.active.note(r, r.setKey(&e.Conn))
	// The duration last: a reader that collects while a close is being
	// recorded and sees its duration sees all the rest of it too.
	r.duration.Record(ctx, e.Duration.Seconds(), f.sets.rec...)
	delete(r.flows, e.ID)
	if r.spans {
		r.span(e)
	}
}

// add records the growth of a flow's cumulative counters since the last
// values seen, and an RTT sample.
func (r *recorder) add(f *flowState, s *Counters) {
	ctx := context.Background()
	if d := grow(&f.sent, s.BytesSent); d > 0 {
		r.bytes.Add(ctx, d, f.sets.tx...)
	}
	if d := grow(&f.received, s.BytesReceived); d > 0 {
		r.bytes.Add(ctx, d, f.sets.rx...)
	}
	if d := grow32(&f.segsOut, s.SegmentsOut); d > 0 {
		r.packets.Add(ctx, d, f.sets.tx...)
	}
	if d := grow32(&f.segsIn, s.SegmentsIn); d > 0 {
		r.packets.Add(ctx, d, f.sets.rx...)
	}
	if d := grow32(&f.retrans, s.Retransmits); d > 0 {
		r.retrans.Add(ctx, d, f.sets.base...)
	}
	if d := grow32(&f.rstSent, s.ResetsSent); d > 0 {
		r.resets.Add(ctx, d, f.sets.tx...)
	}
	if d := grow32(&f.rstRec, s.ResetsReceived); d > 0 {
		r.resets.Add(ctx, d, f.sets.rx...)
	}
	if s.SRTT > 0 {
		r.rtt.Record(ctx, s.SRTT.Seconds(), f.sets.rec...)
	}
}

// grow moves *last up to cur and returns by how much. A value below the
// last one (two sources disagreeing by a FIN) adds nothing and is not
// remembered, so the counter neither goes back nor counts twice.
func grow(last *uint64, cur uint64) int64 {
	if cur <= *last {
		return 0
	}
	d := cur - *last
	*last = cur
	return int64(d)
}

func grow32(last *uint32, cur uint32) int64 {
	if cur <= *last {
		return 0
	}
	d := cur - *last
	*last = cur
	return int64(d)
}

// flow returns the state of c's flow, new if unknown.
func (r *recorder) flow(c *Conn) flowState {
	r.tick++
	f, ok := r.flows[c.ID]
	if !ok {
		if len(r.flows) >= r.max {
			r.forget()
		}
		f.sets = r.attrSets(c)
	}
	f.touched = r.tick
	return f
}

// forget bounds the flow table: it drops the flows untouched for the last
// max/2 events, at least half the table, so its cost is amortised over as
// many insertions. The table only fills when flows never close, which
// means the kernel evicted them too (counted in flowmill.flows.evicted).
func (r *recorder) forget() {
	horizon := r.tick - uint64(r.max/2) - 1
	for id, f := range r.flows {
		if f.touched <= horizon {
			delete(r.flows, id)
		}
	}
}

// setKey returns what c's metric attributes are made of under the
// selected groups.
func (r *recorder) setKey(c *Conn) setKey {
	k := setKey{role: c.Role, v6: c.Remote.Addr().Is6()}
	if r.attrs.Has(probe.AttrPeerAddress) {
		k.peer = c.Remote.Addr()
	}
	if r.attrs.Has(probe.AttrServerPort) {
		switch c.Role {
		case RoleServer:
			k.serverPort = c.Local.Port()
		case RoleClient:
			k.serverPort = c.Remote.Port()
		}
	}
	if r.attrs.Has(probe.AttrExecutable) {
		k.comm = c.Comm
	}
	if r.attrs.Has(probe.AttrPID) {
		k.pid = c.PID
	}
	return k
}

// attributes returns the metric attributes of k, without
// network.io.direction, in a slice of their own.
func (r *recorder) attributes(k setKey) []attribute.KeyValue {
	kv := make([]attribute.KeyValue, 0, 8)
	kv = append(kv, semconv.NetworkTransportTCP, attrRole.String(k.role.String()))
	if k.v6 {
		kv = append(kv, semconv.NetworkTypeIPv6)
	} else {
		kv = append(kv, semconv.NetworkTypeIPv4)
	}
	if k.peer.IsValid() {
		kv = append(kv, semconv.NetworkPeerAddress(k.peer.String()))
	}
	if k.serverPort != 0 {
		if k.role == RoleServer {
			kv = append(kv, semconv.NetworkLocalPort(int(k.serverPort)))
		} else {
			kv = append(kv, semconv.NetworkPeerPort(int(k.serverPort)))
		}
	}
	if r.attrs.Has(probe.AttrExecutable) {
		kv = append(kv, semconv.ProcessExecutableName(k.comm))
	}
	if r.attrs.Has(probe.AttrPID) {
		kv = append(kv, semconv.ProcessPID(int(k.pid)))
	}
	return kv
}

// attrSets returns the metric attributes of c under the selected groups.
func (r *recorder) attrSets(c *Conn) *attrSets {
	k := r.setKey(c)
	if s, ok := r.sets[k]; ok {
		return s
	}
	if len(r.sets) >= maxSets {
		clear(r.sets)
	}
	kv := r.attributes(k)
	// attribute.NewSet sorts its argument in place: each set gets its own
	// slice.
	base := metric.WithAttributeSet(attribute.NewSet(slices.Clone(kv)...))
	s := &attrSets{
		base: []metric.AddOption{base},
		tx:   []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(append(slices.Clone(kv), semconv.NetworkIODirectionTransmit)...))},
		rx:   []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(append(kv, semconv.NetworkIODirectionReceive)...))},
		rec:  []metric.RecordOption{base},
	}
	r.sets[k] = s
	return s
}

// span records a closed connection as a span with the kernel's times.
func (r *recorder) span(e *ConnClosed) {
	kind := trace.SpanKindInternal
	switch e.Role {
	case RoleClient:
		kind = trace.SpanKindClient
	case RoleServer:
		kind = trace.SpanKindServer
	}
	netType := semconv.NetworkTypeIPv4
	if e.Remote.Addr().Is6() {
		netType = semconv.NetworkTypeIPv6
	}
	_, sp := r.tracer.Start(context.Background(), spanName,
		trace.WithTimestamp(e.Time.Add(-e.Duration)),
		trace.WithSpanKind(kind),
		trace.WithAttributes(
			semconv.NetworkTransportTCP,
			netType,
			attrRole.String(e.Role.String()),
			semconv.NetworkLocalAddress(e.Local.Addr().String()),
			semconv.NetworkLocalPort(int(e.Local.Port())),
			semconv.NetworkPeerAddress(e.Remote.Addr().String()),
			semconv.NetworkPeerPort(int(e.Remote.Port())),
			semconv.ProcessPID(int(e.PID)),
			semconv.ProcessExecutableName(e.Comm),
			attribute.Int64("flowmill.tcp.bytes_sent", int64(e.BytesSent)),
			attribute.Int64("flowmill.tcp.bytes_received", int64(e.BytesReceived)),
			attribute.Int64("flowmill.tcp.segments_sent", int64(e.SegmentsOut)),
			attribute.Int64("flowmill.tcp.segments_received", int64(e.SegmentsIn)),
			attribute.Int64("flowmill.tcp.retransmits", int64(e.Retransmits)),
			attribute.Int64("flowmill.tcp.resets_sent", int64(e.ResetsSent)),
			attribute.Int64("flowmill.tcp.resets_received", int64(e.ResetsReceived)),
			attribute.Float64("flowmill.tcp.srtt", e.SRTT.Seconds()),
			attribute.Float64("flowmill.tcp.min_rtt", e.MinRTT.Seconds()),
		))
	sp.End(trace.WithTimestamp(e.Time))
}

var _ probe.Telemetry = (*Probe)(nil)
