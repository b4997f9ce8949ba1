//go:build linux

package process_test

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/process"
)

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

// sums returns the data points of the counter name, by attribute set.
func sums(t *testing.T, r *sdkmetric.ManualReader, name string) metricdata.Sum[int64] {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != flowmill.ScopeName {
			continue
		}
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m.Data.(metricdata.Sum[int64])
			}
		}
	}
	return metricdata.Sum[int64]{}
}

// TestExporterCountsChildren runs real processes under a real session and
// exporter: the exec and exit counters hold exactly the test's children,
// by executable and exit code or signal, and each exec and exit is a log
// record with the kernel's details.
func TestExporterCountsChildren(t *testing.T) {
	run(t, "/bin/true") // see TestExecExit
	testutil.RequireBPF(t)
	s, err := flowmill.Start(context.Background(),
		flowmill.WithProbes(process.New(process.WithLogRecords())), flowmill.WithMaxLatency(10*time.Millisecond))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	sink := &logSink{}
	// A batch processor: records reach the sink only when the exporter's
	// Shutdown flushes the provider.
	lp := sdklog.NewLoggerProvider(sdklog.WithProcessor(sdklog.NewBatchProcessor(sink, sdklog.WithExportInterval(time.Hour))))
	t.Cleanup(func() {
		_ = mp.Shutdown(context.Background())
		_ = lp.Shutdown(context.Background())
	})
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp), flowmill.WithLoggerProvider(lp),
		flowmill.WithAttributes(flowmill.DefaultAttributes|flowmill.AttrPID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })

	me := os.Getpid()
	sh := int(run(t, "/bin/sh", "-c", "exit 3"))
	tru := int(run(t, "/bin/true", "a", "b", "c"))
	execs, err := flowmill.Subscribe[process.Exec](s)
	if err != nil {
		t.Fatal(err)
	}
	sleep := exec.Command("/bin/sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it only once its exec completed: Start returns when the exec
	// reaches its point of no return, and a SIGKILL from then on can still
	// make the exec fail (mmap is killable), with no exec to report.
	for e := range execs.Events() {
		if e.PID == uint32(sleep.Process.Pid) {
			break
		}
	}
	execs.Close()
	sleep.Process.Kill()
	sleep.Wait()
	killed := sleep.Process.Pid

	// Wait for the three exits to be recorded, then stop the exporter:
	// everything delivered is recorded and the logs are flushed.
	deadline := time.Now().Add(testutil.Timeout(10 * time.Second))
	for {
		var n int64
		for _, p := range sums(t, reader, "process.exit").DataPoints {
			n += p.Value
		}
		if n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d exits recorded after 10s, want 3", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // anything else would arrive now
	if err := exp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	// The session follows the test's process tree only: its children are
	// all there is.
	name := semconv.ProcessExecutableName
	pid := semconv.ProcessPID
	pt := func(kv ...attribute.KeyValue) metricdata.DataPoint[int64] {
		return metricdata.DataPoint[int64]{Attributes: attribute.NewSet(kv...), Value: 1}
	}
	counter := func(pts ...metricdata.DataPoint[int64]) metricdata.Sum[int64] {
		return metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, IsMonotonic: true, DataPoints: pts}
	}
	metricdatatest.AssertEqual(t, counter(
		pt(name("sh"), pid(sh)), pt(name("true"), pid(tru)), pt(name("sleep"), pid(killed)),
	), sums(t, reader, "process.exec"), metricdatatest.IgnoreTimestamp())
	metricdatatest.AssertEqual(t, counter(
		pt(name("sh"), pid(sh), semconv.ProcessExitCode(3)),
		pt(name("true"), pid(tru), semconv.ProcessExitCode(0)),
		pt(name("sleep"), pid(killed), attribute.String("flowmill.process.signal", "SIGKILL")),
	), sums(t, reader, "process.exit"), metricdatatest.IgnoreTimestamp())

	// One record per exec and exit, in the kernel's order. (The recorder
	// emits an exit after the execs buffered before it, but a later
	// process's exec may be emitted before an earlier one's exit.)
	sink.mu.Lock()
	recs := slices.Clone(sink.recs)
	sink.mu.Unlock()
	slices.SortStableFunc(recs, func(a, b sdklog.Record) int { return a.Timestamp().Compare(b.Timestamp()) })
	var got []string
	for _, r := range recs {
		var p, ppid int64
		var args []string
		var status string
		r.WalkAttributes(func(kv attribute.KeyValue) bool {
			switch kv.Key {
			case semconv.ProcessPIDKey:
				p = kv.Value.AsInt64()
			case semconv.ProcessParentPIDKey:
				ppid = kv.Value.AsInt64()
			case semconv.ProcessCommandArgsKey:
				args = kv.Value.AsStringSlice()
			case semconv.ProcessExitCodeKey:
				status = kv.Value.Emit()
			case "flowmill.process.signal":
				status = kv.Value.AsString()
			}
			return true
		})
		if ppid != int64(me) || r.Timestamp().IsZero() || r.Timestamp().After(time.Now()) {
			t.Errorf("record %s of %d: parent %d (want %d), time %v", r.EventName(), p, ppid, me, r.Timestamp())
		}
		who := map[int64]string{int64(sh): "sh", int64(tru): "true", int64(killed): "sleep"}[p]
		if r.EventName() == "process.exec" {
			got = append(got, "exec "+who+" "+attribute.StringSliceValue(args).Emit())
		} else {
			got = append(got, r.EventName()+" "+who+" "+status)
		}
	}
	want := []string{
		`exec sh ["/bin/sh","-c","exit 3"]`, "process.exit sh 3",
		`exec true ["/bin/true","a","b","c"]`, "process.exit true 0",
		`exec sleep ["/bin/sleep","60"]`, "process.exit sleep SIGKILL",
	}
	if !slices.Equal(got, want) {
		t.Errorf("log records:\n got %q\nwant %q", got, want)
	}
	st, err := s.Stats()
	if err != nil || st.EventsLost != 0 || st.Dropped != 0 {
		t.Errorf("stats %+v, %v: want no losses", st, err)
	}
}
