package syscalls

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/sdk/metric/metricdata/metricdatatest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill/internal/probe"
)

// harness drives the syscalls mapping with synthetic Counts, without eBPF.
type harness struct {
	counts *probe.Topic[Counts]
	reader *sdkmetric.ManualReader
	rec    *recorder
}

func newHarness(t testing.TB, attrs probe.Attributes, opts ...Option) *harness {
	t.Helper()
	bus := probe.NewBus()
	h := &harness{counts: probe.Produce[Counts](bus), reader: sdkmetric.NewManualReader()}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(h.reader))
	t.Cleanup(func() {
		bus.Close()
		_ = mp.Shutdown(context.Background())
	})
	r, err := New(opts...).Telemetry(&probe.TelemetryEnv{Bus: bus, Buffer: 1 << 16, Meter: mp.Meter("test"), Attributes: attrs})
	if err != nil {
		t.Fatal(err)
	}
	h.rec = r.(*recorder)
	return h
}

func (h *harness) run(t testing.TB) metricdata.Sum[int64] {
	t.Helper()
	stop := make(chan struct{})
	close(stop)
	if err := h.rec.Run(stop); err != nil {
		t.Fatal(err)
	}
	var rm metricdata.ResourceMetrics
	if err := h.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == metricSyscalls {
				return m.Data.(metricdata.Sum[int64])
			}
		}
	}
	return metricdata.Sum[int64]{}
}

func point(v int64, kv ...attribute.KeyValue) metricdata.DataPoint[int64] {
	return metricdata.DataPoint[int64]{Attributes: attribute.NewSet(kv...), Value: v}
}

func counter(pts ...metricdata.DataPoint[int64]) metricdata.Sum[int64] {
	return metricdata.Sum[int64]{Temporality: metricdata.CumulativeTemporality, IsMonotonic: true, DataPoints: pts}
}

func syscallNamed(t testing.TB, name string) Syscall {
	s, ok := ByName(name)
	if !ok {
		t.Fatalf("no system call %q", name)
	}
	return s
}

func TestDeltasOfCumulativeCounts(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes)
	getpid, read := syscallNamed(t, "getpid"), syscallNamed(t, "read")
	h.counts.Publish(&Counts{PID: 7, Syscalls: []Count{{getpid, 10}, {read, 3}}})
	h.counts.Publish(&Counts{PID: 8, Syscalls: []Count{{getpid, 5}}})
	h.counts.Publish(&Counts{PID: 7, Syscalls: []Count{{getpid, 25}, {read, 3}}})
	// The kernel freed read's entry and made it again: 2 new calls.
	h.counts.Publish(&Counts{PID: 7, Exited: true, Syscalls: []Count{{getpid, 30}, {read, 2}}})
	// The same PID, reused by a new process after the final Counts.
	h.counts.Publish(&Counts{PID: 7, Syscalls: []Count{{getpid, 4}}})
	got := h.run(t)
	metricdatatest.AssertEqual(t, counter(
		point(30+5+4, attrName.String("getpid")),
		point(3+2, attrName.String("read")),
	), got, metricdatatest.IgnoreTimestamp())
	if _, ok := h.rec.last[7]; ok {
		t.Error("the exited process is still remembered")
	}
}

func TestPIDAttribute(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes|probe.AttrPID)
	getpid := syscallNamed(t, "getpid")
	h.counts.Publish(&Counts{PID: 7, Syscalls: []Count{{getpid, 10}}})
	h.counts.Publish(&Counts{PID: 8, Exited: true, Syscalls: []Count{{getpid, 5}}})
	metricdatatest.AssertEqual(t, counter(
		point(10, attrName.String("getpid"), semconv.ProcessPID(7)),
		point(5, attrName.String("getpid"), semconv.ProcessPID(8)),
	), h.run(t), metricdatatest.IgnoreTimestamp())
}

func TestProcessTableIsBounded(t *testing.T) {
	h := newHarness(t, probe.DefaultAttributes, WithMaxProcesses(8))
	getpid := syscallNamed(t, "getpid")
	for pid := range uint32(1000) {
		h.counts.Publish(&Counts{PID: pid + 1, Syscalls: []Count{{getpid, 1}}})
	}
	metricdatatest.AssertEqual(t, counter(point(1000, attrName.String("getpid"))), h.run(t), metricdatatest.IgnoreTimestamp())
	if n := len(h.rec.last); n > 8 {
		t.Errorf("%d processes remembered, want at most 8", n)
	}
}

// BenchmarkRecordCounts measures one periodic Counts of a process that
// made 40 distinct system calls, 10 of which grew.
func BenchmarkRecordCounts(b *testing.B) {
	h := newHarness(b, probe.DefaultAttributes)
	e := Counts{PID: 7}
	for nr := range Syscall(40) {
		e.Syscalls = append(e.Syscalls, Count{Syscall: nr, N: 1})
	}
	h.rec.record(&e)
	b.ReportAllocs()
	for b.Loop() {
		for i := range 10 {
			e.Syscalls[i].N++
		}
		h.rec.record(&e)
	}
}
