package process

import (
	"context"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/log"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill/internal/probe"
)

// disabledLogger is a Logger whose provider wants no records.
type disabledLogger struct{ log.Logger }

func (disabledLogger) Enabled(context.Context, log.EnabledParameters) bool { return false }

// memLogs is an in-memory sdklog.Exporter: it keeps a copy of every record.
type memLogs struct {
	mu      sync.Mutex
	recs    []sdklog.Record
	discard bool // for benchmarks: keep nothing
}

func (m *memLogs) Export(_ context.Context, recs []sdklog.Record) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.discard {
		return nil
	}
	for _, r := range recs {
		m.recs = append(m.recs, r.Clone())
	}
	return nil
}

func (m *memLogs) Shutdown(context.Context) error   { return nil }
func (m *memLogs) ForceFlush(context.Context) error { return nil }

func (m *memLogs) records() []sdklog.Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.recs)
}

// recordAttrs returns a record's attributes as a set.
func recordAttrs(r *sdklog.Record) attribute.Set {
	var kv []attribute.KeyValue
	r.WalkAttributes(func(a attribute.KeyValue) bool { kv = append(kv, a); return true })
	return attribute.NewSet(kv...)
}

// harness drives the process mapping with synthetic events on a bus,
// without eBPF.
type harness struct {
	execs  *probe.Topic[Exec]
	exits  *probe.Topic[Exit]
	reader *sdkmetric.ManualReader
	logs   *memLogs
	rec    *recorder
}

func newHarness(t testing.TB, attrs probe.Attributes, opts ...Option) *harness {
	t.Helper()
	bus := probe.NewBus()
	h := &harness{
		execs:  probe.Produce[Exec](bus),
		exits:  probe.Produce[Exit](bus),
		reader: sdkmetric.NewManualReader(),
		logs:   &memLogs{},
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(h.reader))
	lp := sdklog.NewLoggerProvider(sdklog.WithProcessor(sdklog.NewSimpleProcessor(h.logs)))
	t.Cleanup(func() {
		bus.Close()
		_ = mp.Shutdown(context.Background())
		_ = lp.Shutdown(context.Background())
	})
	r, err := New(opts...).Telemetry(&probe.TelemetryEnv{
		Bus: bus, Buffer: 1 << 16, Meter: mp.Meter("test"), Logger: lp.Logger("test"), Attributes: attrs,
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

func (h *harness) sum(t testing.TB, name string) metricdata.Sum[int64] {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := h.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m.Data.(metricdata.Sum[int64])
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return metricdata.Sum[int64]{}
}

func counter(pts ...metricdata.DataPoint[int64]) metricdata.Sum[int64] {
	return metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, IsMonotonic: true, DataPoints: pts}
}

func point(v int64, kv ...attribute.KeyValue) metricdata.DataPoint[int64] {
	return metricdata.DataPoint[int64]{Attributes: attribute.NewSet(kv...), Value: v}
}

var (
	at   = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	shP  = Process{PID: 100, PPID: 1, UID: 1000, GID: 1000, CgroupID: 77, Comm: "sh"}
	truP = Process{PID: 101, PPID: 1, UID: 1000, GID: 1000, CgroupID: 77, Comm: "true"}
)

func TestCountsByExecutableAndExitStatus(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes)
	h.execs.Publish(&Exec{Time: at, Process: shP, TID: 100, Filename: "/bin/sh", Argv: []string{"/bin/sh", "-c", "exit 3"}})
	for i := range 3 {
		p := truP
		p.PID += uint32(i)
		h.execs.Publish(&Exec{Time: at, Process: p, TID: p.PID, Filename: "/bin/true", Argv: []string{"/bin/true"}})
		h.exits.Publish(&Exit{Time: at, Process: p})
	}
	h.exits.Publish(&Exit{Time: at, Process: shP, ExitCode: 3})
	h.exits.Publish(&Exit{Time: at, Process: shP, ExitCode: 3})
	h.exits.Publish(&Exit{Time: at, Process: shP, ExitCode: -1, Signal: syscall.SIGKILL})
	h.exits.Publish(&Exit{Time: at, Process: shP, ExitCode: -1, Signal: syscall.SIGSEGV, CoreDumped: true})
	h.run(t)

	sh, tru := semconv.ProcessExecutableName("sh"), semconv.ProcessExecutableName("true")
	metricdatatest.AssertEqual(t, counter(point(1, sh), point(3, tru)), h.sum(t, metricExec),
		metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, counter(
		point(3, tru, semconv.ProcessExitCode(0)),
		point(2, sh, semconv.ProcessExitCode(3)),
		point(1, sh, attrSignal.String("SIGKILL")),
		point(1, sh, attrSignal.String("SIGSEGV")),
	), h.sum(t, metricExit), metricdatatest.IgnoreTimestamp())
	if n := len(h.logs.records()); n != 0 {
		t.Errorf("%d log records without WithLogRecords, want 0", n)
	}
}

func TestAttributeGroups(t *testing.T) {
	for _, tc := range []struct {
		attrs      probe.Attributes
		exec, exit []attribute.KeyValue
	}{
		{probe.DefaultAttributes,
			[]attribute.KeyValue{semconv.ProcessExecutableName("sh")},
			[]attribute.KeyValue{semconv.ProcessExecutableName("sh"), semconv.ProcessExitCode(3)}},
		{probe.DefaultAttributes | probe.AttrPID,
			[]attribute.KeyValue{semconv.ProcessExecutableName("sh"), semconv.ProcessPID(100)},
			[]attribute.KeyValue{semconv.ProcessExecutableName("sh"), semconv.ProcessPID(100), semconv.ProcessExitCode(3)}},
		{probe.AttrPeerAddress | probe.AttrServerPort, // no process group: no process attributes
			nil,
			[]attribute.KeyValue{semconv.ProcessExitCode(3)}},
	} {
		h := newHarness(t, tc.attrs)
		h.execs.Publish(&Exec{Time: at, Process: shP, Filename: "/bin/sh"})
		h.exits.Publish(&Exit{Time: at, Process: shP, ExitCode: 3})
		h.run(t)
		metricdatatest.AssertEqual(t, counter(point(1, tc.exec...)), h.sum(t, metricExec), metricdatatest.IgnoreTimestamp())
		metricdatatest.AssertEqual(t, counter(point(1, tc.exit...)), h.sum(t, metricExit), metricdatatest.IgnoreTimestamp())
	}
}

func TestLogRecords(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes, WithLogRecords())
	h.execs.Publish(&Exec{Time: at, Process: shP, TID: 100, Filename: "/bin/sh", Argv: []string{"/bin/sh", "-c", "exit 3"}, ArgvTruncated: true})
	h.exits.Publish(&Exit{Time: at.Add(1500 * time.Millisecond), Process: shP, ExitCode: 3, Lifetime: 2 * time.Second})
	h.exits.Publish(&Exit{Time: at, Process: truP, ExitCode: -1, Signal: syscall.SIGSEGV, CoreDumped: true, Lifetime: time.Millisecond})
	h.run(t)

	recs := h.logs.records()
	if len(recs) != 3 {
		t.Fatalf("%d log records, want 3", len(recs))
	}
	for i, want := range []struct {
		event string
		ts    time.Time
		body  string
		attrs []attribute.KeyValue
	}{
		{eventExec, at, "exec /bin/sh", []attribute.KeyValue{
			semconv.ProcessPID(100), semconv.ProcessParentPID(1), semconv.ProcessExecutableName("sh"),
			semconv.ProcessExecutablePath("/bin/sh"), semconv.ProcessCommandArgs("/bin/sh", "-c", "exit 3"),
			semconv.ProcessRealUserID(1000), semconv.ThreadID(100), attrCgroupID.Int64(77), attrArgvTruncated.Bool(true)}},
		{eventExit, at.Add(1500 * time.Millisecond), "exit sh 3", []attribute.KeyValue{
			semconv.ProcessPID(100), semconv.ProcessParentPID(1), semconv.ProcessExecutableName("sh"),
			semconv.ProcessExitCode(3), semconv.ProcessRealUserID(1000),
			semconv.ProcessCreationTime("2025-01-02T03:04:04.500000006Z"), semconv.ProcessExitTime("2025-01-02T03:04:06.500000006Z"),
			attrLifetime.Float64(2), attrCgroupID.Int64(77)}},
		{eventExit, at, "exit true SIGSEGV", []attribute.KeyValue{
			semconv.ProcessPID(101), semconv.ProcessParentPID(1), semconv.ProcessExecutableName("true"),
			attrSignal.String("SIGSEGV"), semconv.ProcessRealUserID(1000),
			semconv.ProcessCreationTime("2025-01-02T03:04:04.999000006Z"), semconv.ProcessExitTime("2025-01-02T03:04:05.000000006Z"),
			attrLifetime.Float64(0.001), attrCgroupID.Int64(77), attrCoreDumped.Bool(true)}},
	} {
		r := &recs[i]
		if r.EventName() != want.event || !r.Timestamp().Equal(want.ts) || r.ObservedTimestamp().IsZero() || r.Body().AsString() != want.body {
			t.Errorf("record %d: event %q at %v (observed %v) body %q, want %q at %v body %q",
				i, r.EventName(), r.Timestamp(), r.ObservedTimestamp(), r.Body().AsString(), want.event, want.ts, want.body)
		}
		if got, w := recordAttrs(r), attribute.NewSet(want.attrs...); !got.Equals(&w) {
			t.Errorf("record %d attributes:\n got %v\nwant %v", i, got.ToSlice(), w.ToSlice())
		}
	}
}

// An exit is recorded after the execs published before it, whatever the
// order in which Run reads its two channels.
func TestExecBeforeExit(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes, WithLogRecords())
	const n = 300
	for i := range uint32(n) {
		p := truP
		p.PID += i
		h.execs.Publish(&Exec{Time: at, Process: p, Filename: "/bin/true"})
		h.exits.Publish(&Exit{Time: at, Process: p})
	}
	stop := make(chan struct{})
	done := make(chan error)
	go func() { done <- h.rec.Run(stop) }()
	time.Sleep(50 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	seen := make(map[int64]bool)
	recs := h.logs.records()
	if len(recs) != 2*n {
		t.Fatalf("%d records, want %d", len(recs), 2*n)
	}
	for _, r := range recs {
		a := recordAttrs(&r)
		pid, _ := a.Value(semconv.ProcessPIDKey)
		switch r.EventName() {
		case eventExec:
			seen[pid.AsInt64()] = true
		case eventExit:
			if !seen[pid.AsInt64()] {
				t.Fatalf("exit of %d recorded before its exec", pid.AsInt64())
			}
		}
	}
}

// Records are not built when the LoggerProvider does not want them.
func TestLogRecordsDisabled(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes, WithLogRecords())
	h.rec.logger = disabledLogger{h.rec.logger}
	h.execs.Publish(&Exec{Time: at, Process: shP, Filename: "/bin/sh"})
	h.run(t)
	if n := len(h.logs.records()); n != 0 {
		t.Errorf("%d records from a disabled logger", n)
	}
	metricdatatest.AssertEqual(t, counter(point(1, semconv.ProcessExecutableName("sh"))), h.sum(t, metricExec),
		metricdatatest.IgnoreTimestamp())
}

func TestAttributeSetCacheIsBounded(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes|probe.AttrPID)
	for i := range uint32(3 * maxSets) {
		p := truP
		p.PID = i
		h.exits.Publish(&Exit{Time: at, Process: p})
	}
	h.run(t)
	if n := len(h.rec.sets); n > maxSets {
		t.Errorf("%d attribute sets cached, want at most %d", n, maxSets)
	}
	// Every exit is counted once, across the SDK's series (and its
	// cardinality-limit overflow series).
	var total int64
	for _, p := range h.sum(t, metricExit).DataPoints {
		total += p.Value
	}
	if total != 3*maxSets {
		t.Errorf("%d exits counted, want %d", total, 3*maxSets)
	}
}

func TestSignalName(t *testing.T) {
	for sig, want := range map[syscall.Signal]string{syscall.SIGKILL: "SIGKILL", syscall.SIGTERM: "SIGTERM", 40: "40"} {
		if got := signalName(sig); got != want {
			t.Errorf("signalName(%d) = %q, want %q", sig, got, want)
		}
	}
}

// BenchmarkRecordExecExit measures recording one exec and one exit into
// the SDK's metrics, the default: no log records.
func BenchmarkRecordExecExit(b *testing.B) {
	h := newHarness(b, probe.DefaultAttributes)
	r := h.rec
	ex := Exec{Time: at, Process: truP, Filename: "/bin/true", Argv: []string{"/bin/true"}}
	ext := Exit{Time: at, Process: truP, Lifetime: time.Millisecond}
	b.ReportAllocs()
	for b.Loop() {
		r.recordExec(&ex)
		r.recordExit(&ext)
	}
}

// BenchmarkRecordExecExitLogRecords is BenchmarkRecordExecExit with
// WithLogRecords, into an SDK LoggerProvider with a simple processor and
// an exporter that discards the records.
func BenchmarkRecordExecExitLogRecords(b *testing.B) {
	h := newHarness(b, probe.DefaultAttributes, WithLogRecords())
	h.logs.discard = true
	r := h.rec
	ex := Exec{Time: at, Process: truP, Filename: "/bin/true", Argv: []string{"/bin/true", "a", "b"}}
	ext := Exit{Time: at, Process: truP, Lifetime: time.Millisecond}
	b.ReportAllocs()
	for b.Loop() {
		r.recordExec(&ex)
		r.recordExit(&ext)
	}
}
