package flowmill

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/log"
	"go.opentelemetry.io/otel/log/global"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
)

// ScopeName is the instrumentation scope of every instrument and span the
// exporter creates, whatever the probe family: SDK views select
// flowmill's instruments with it (see package flowmill/otelviews).
const ScopeName = "github.com/flowmill/flowmill"

// Attributes selects groups of metric attributes; see WithAttributes.
type Attributes = probe.Attributes

// Attribute groups for WithAttributes. A client's ephemeral port is in no
// group: it never becomes a metric attribute.
const (
	// AttrPeerAddress: network.peer.address.
	AttrPeerAddress = probe.AttrPeerAddress
	// AttrServerPort: the server-side port (network.local.port on accepted
	// connections, network.peer.port on outgoing ones).
	AttrServerPort = probe.AttrServerPort
	// AttrExecutable: process.executable.name.
	AttrExecutable = probe.AttrExecutable
	// AttrPID: process.pid; not in DefaultAttributes, since short-lived
	// processes of a host would each make their own time series.
	AttrPID = probe.AttrPID
	// DefaultAttributes is AttrPeerAddress|AttrServerPort|AttrExecutable.
	DefaultAttributes = probe.DefaultAttributes
)

// ExporterOption configures NewExporter.
type ExporterOption func(*exporterConfig)

type exporterConfig struct {
	mp       metric.MeterProvider
	tp       trace.TracerProvider
	lp       log.LoggerProvider
	attrs    Attributes
	explicit bool
	buffer   int
	errs     []error
}

func (c *exporterConfig) fail(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

// WithMeterProvider records metrics with mp instead of the global
// otel.GetMeterProvider(). mp must not be nil.
func WithMeterProvider(mp metric.MeterProvider) ExporterOption {
	return func(c *exporterConfig) {
		if mp == nil {
			c.fail("WithMeterProvider(nil): omit the option to use the global MeterProvider")
		}
		c.mp = mp
	}
}

// WithTracerProvider creates spans with tp instead of the global
// otel.GetTracerProvider(). Spans are made only by families asked to (for
// TCP connections: tcp.WithSpans). tp must not be nil.
func WithTracerProvider(tp trace.TracerProvider) ExporterOption {
	return func(c *exporterConfig) {
		if tp == nil {
			c.fail("WithTracerProvider(nil): omit the option to use the global TracerProvider")
		}
		c.tp = tp
	}
}

// WithLoggerProvider emits log records with lp instead of the global
// go.opentelemetry.io/otel/log/global.GetLoggerProvider(). Records are
// emitted only by families asked to (for process execs and exits:
// process.WithLogRecords). lp must not be nil.
func WithLoggerProvider(lp log.LoggerProvider) ExporterOption {
	return func(c *exporterConfig) {
		if lp == nil {
			c.fail("WithLoggerProvider(nil): omit the option to use the global LoggerProvider")
		}
		c.lp = lp
	}
}

// WithAttributes chooses the metric attribute groups (default
// DefaultAttributes), for instance AttrServerPort|AttrExecutable to drop
// the peer address on a server with many clients, or
// DefaultAttributes|AttrPID to tell processes of the same executable
// apart. network.transport,
// network.type and the connection's role are always present. a may be 0
// (none of the groups), and must not have bits beyond the groups above.
func WithAttributes(a Attributes) ExporterOption {
	return func(c *exporterConfig) {
		if a&^probe.AllAttributes != 0 {
			c.fail("WithAttributes(%#x): unknown attribute groups %#x: combine AttrPeerAddress, AttrServerPort, AttrExecutable and AttrPID", uint32(a), uint32(a&^probe.AllAttributes))
			return
		}
		c.attrs = a
	}
}

// WithExplicitBuckets gives the histograms (RTT, durations) flowmill's
// explicit bucket boundaries as advisory hints, for a MeterProvider that
// aggregates histograms with explicit buckets (the SDK's default). Without
// it, histograms carry no hint and are meant to be aggregated as base-2
// exponential histograms by the views of flowmill/otelviews (the OTel
// equivalent of Prometheus native histograms): without those views the
// SDK falls back to its default boundaries, which do not fit RTTs.
func WithExplicitBuckets() ExporterOption {
	return func(c *exporterConfig) { c.explicit = true }
}

// WithExportBuffer sets the capacity of each of the exporter's
// subscription channels, from 1 to 4194304 (default 4096). Events that find
// a channel full are dropped and counted in Stats.Dropped
// (flowmill.events.dropped).
func WithExportBuffer(n int) ExporterOption {
	return func(c *exporterConfig) {
		if n < 1 || n > maxBuffer {
			c.fail("WithExportBuffer(%d): must be between 1 and %d", n, maxBuffer)
			return
		}
		c.buffer = n
	}
}

// flushTimeout bounds the flush after the session ended on its own.
const flushTimeout = 10 * time.Second

// Exporter records a session's events as OpenTelemetry metrics (and spans
// or log records, where a family is asked for them), and the session's own health as
// observable counters. Create it with NewExporter. It stops when the
// session ends or on Shutdown/Close.
type Exporter struct {
	mp   metric.MeterProvider
	tp   trace.TracerProvider
	lp   log.LoggerProvider
	reg  metric.Registration
	stop chan struct{}
	wg   sync.WaitGroup

	errMu  sync.Mutex
	runErr error

	once    sync.Once
	done    chan struct{}
	downErr error
}

// NewExporter subscribes to the session's events and records them with
// the global MeterProvider and TracerProvider unless options say
// otherwise:
//
//	s, err := flowmill.Start(ctx, flowmill.WithProbes(tcp.New()))
//	...
//	exp, err := flowmill.NewExporter(s)
//	defer exp.Shutdown(context.Background())
//
// Made between New and Session.Start, the exporter records every event
// from the first one. Every family of the session that has an
// OpenTelemetry mapping (tcp, process, syscalls, http and grpc have) maps its
// own events; families without one are left out. The exporter stops when
// the session ends, or on Shutdown or Close. An invalid option is an error
// wrapping ErrInvalidOption.
func NewExporter(s *Session, opts ...ExporterOption) (*Exporter, error) {
	c := exporterConfig{attrs: DefaultAttributes, buffer: 4096}
	for _, o := range opts {
		if o == nil {
			c.fail("an ExporterOption is nil")
			continue
		}
		o(&c)
	}
	if len(c.errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, errors.Join(c.errs...))
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	if c.lp == nil {
		c.lp = global.GetLoggerProvider()
	}
	select {
	case <-s.done:
		return nil, ErrClosed
	default:
	}
	v := version()
	meter := c.mp.Meter(ScopeName, metric.WithInstrumentationVersion(v), metric.WithSchemaURL(semconv.SchemaURL))
	env := &probe.TelemetryEnv{
		Bus:             s.bus,
		Buffer:          c.buffer,
		Meter:           meter,
		Tracer:          c.tp.Tracer(ScopeName, trace.WithInstrumentationVersion(v), trace.WithSchemaURL(semconv.SchemaURL)),
		Logger:          c.lp.Logger(ScopeName, log.WithInstrumentationVersion(v), log.WithSchemaURL(semconv.SchemaURL)),
		Attributes:      c.attrs,
		ExplicitBuckets: c.explicit,
	}
	e := &Exporter{mp: c.mp, tp: c.tp, lp: c.lp, stop: make(chan struct{}), done: make(chan struct{})}

	var recs []probe.Recorder
	giveUp := func(err error) (*Exporter, error) {
		close(e.stop)
		for _, r := range recs {
			err = errors.Join(err, r.Run(e.stop))
		}
		if e.reg != nil {
			err = errors.Join(err, e.reg.Unregister())
		}
		return nil, err
	}
	for _, p := range s.cfg.probes {
		t, ok := p.(probe.Telemetry)
		if !ok {
			continue
		}
		r, err := t.Telemetry(env)
		if err != nil {
			return giveUp(fmt.Errorf("flowmill: exporting probe %s: %w", p.Name(), err))
		}
		recs = append(recs, r)
	}
	if len(recs) == 0 {
		return giveUp(errors.New("flowmill: no probe of the session has an OpenTelemetry mapping: select one that has, such as tcp.New()"))
	}
	if err := e.registerHealth(meter, s); err != nil {
		return giveUp(err)
	}
	for _, r := range recs {
		e.wg.Go(func() {
			if err := r.Run(e.stop); err != nil {
				e.errMu.Lock()
				e.runErr = errors.Join(e.runErr, err)
				e.errMu.Unlock()
			}
		})
	}
	go func() { // stop with the session
		select {
		case <-s.done:
			ctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
			defer cancel()
			e.shutdown(ctx)
		case <-e.stop:
		}
	}()
	return e, nil
}

// registerHealth makes the session's Stats observable counters.
func (e *Exporter) registerHealth(meter metric.Meter, s *Session) error {
	counter := func(name, unit, desc string) (metric.Int64ObservableCounter, error) {
		c, err := meter.Int64ObservableCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			return nil, fmt.Errorf("flowmill: creating instrument %s: %w", name, err)
		}
		return c, nil
	}
	read, err1 := counter("flowmill.events.read", "{event}", "Records read from the kernel ring buffers.")
	lost, err2 := counter("flowmill.events.lost", "{event}", "Records the kernel dropped because a ring buffer was full; raise flowmill.WithRingBufferSize or lower WithMaxLatency.")
	evicted, err3 := counter("flowmill.flows.evicted", "{flow}", "Entries pushed out of bounded kernel maps before they were reported.")
	dropped, err4 := counter("flowmill.events.dropped", "{event}", "Events subscribers (the exporter included) missed because their channel was full.")
	missed, err5 := counter("flowmill.hooks.missed", "{hit}", "Hook hits the kernel skipped because a probe program was already running on the CPU.")
	malformed, err6 := counter("flowmill.events.malformed", "{event}", "Records that could not be decoded and were dropped; a defect, please report it.")
	incomplete, err7 := counter("flowmill.events.incomplete", "{event}", "Events delivered with fields the kernel could not read.")
	unsupported, err8 := counter("flowmill.events.unsupported", "{event}", "Activity in scope that the probes saw but do not instrument (HTTP/2 requests, for instance).")
	pollsFailed, err9 := counter("flowmill.polls.failed", "{poll}", "Periodic reads of kernel state that failed for part of the scope (a network namespace that could not be entered, for instance).")
	if err := errors.Join(err1, err2, err3, err4, err5, err6, err7, err8, err9); err != nil {
		return err
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st, err := s.Stats()
		if err != nil {
			return err
		}
		o.ObserveInt64(read, int64(st.EventsRead))
		o.ObserveInt64(lost, int64(st.EventsLost))
		o.ObserveInt64(evicted, int64(st.Evicted))
		o.ObserveInt64(dropped, int64(st.Dropped))
		o.ObserveInt64(missed, int64(st.Missed))
		o.ObserveInt64(malformed, int64(st.Malformed))
		o.ObserveInt64(incomplete, int64(st.Incomplete))
		o.ObserveInt64(unsupported, int64(st.Unsupported))
		o.ObserveInt64(pollsFailed, int64(st.PollsFailed))
		return nil
	}, read, lost, evicted, dropped, missed, malformed, incomplete, unsupported, pollsFailed)
	if err != nil {
		return fmt.Errorf("flowmill: registering the health callback: %w", err)
	}
	e.reg = reg
	return nil
}

// Shutdown stops the exporter: every event already delivered to it is
// recorded, the health callback is unregistered, and the MeterProvider,
// TracerProvider and LoggerProvider are flushed if they can be (the SDK's
// have ForceFlush).
// It does not close the session nor shut the providers down, which belong
// to the caller. It is idempotent and safe to call from any goroutine;
// every call waits for the same shutdown and returns its error, or ctx's
// error if ctx ends first.
func (e *Exporter) Shutdown(ctx context.Context) error {
	go e.shutdown(ctx)
	select {
	case <-e.done:
		return e.downErr
	case <-ctx.Done():
		return fmt.Errorf("flowmill: exporter shutdown: %w", ctx.Err())
	}
}

// Close is Shutdown without a deadline.
func (e *Exporter) Close() error { return e.Shutdown(context.Background()) }

// Done is closed when the exporter has stopped and flushed, after
// Shutdown or the end of its session.
func (e *Exporter) Done() <-chan struct{} { return e.done }

func (e *Exporter) shutdown(ctx context.Context) {
	e.once.Do(func() {
		close(e.stop)
		e.wg.Wait()
		errs := []error{e.reg.Unregister()}
		e.errMu.Lock()
		errs = append(errs, e.runErr)
		e.errMu.Unlock()
		for _, p := range []any{e.mp, e.tp, e.lp} {
			if f, ok := p.(interface{ ForceFlush(context.Context) error }); ok {
				if err := f.ForceFlush(ctx); err != nil {
					errs = append(errs, fmt.Errorf("flushing %T: %w", p, err))
				}
			}
		}
		if err := errors.Join(errs...); err != nil {
			e.downErr = fmt.Errorf("flowmill: exporter shutdown: %w", err)
		}
		close(e.done)
	})
}

// version is the flowmill module's version in the running binary, for the
// instrumentation scope ("(devel)" when flowmill is the main module).
var version = sync.OnceValue(func() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	if bi.Main.Path == ScopeName {
		return bi.Main.Version
	}
	for _, d := range bi.Deps {
		if d.Path == ScopeName {
			return d.Version
		}
	}
	return ""
})
