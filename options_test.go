package flowmill_test

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/probes/grpc"
	"github.com/flowmill/flowmill/probes/http"
	"github.com/flowmill/flowmill/probes/process"
	"github.com/flowmill/flowmill/probes/sql"
	"github.com/flowmill/flowmill/probes/syscalls"
	"github.com/flowmill/flowmill/probes/tcp"
)

// Every option's bad values are an error from New that wraps
// ErrInvalidOption and names the option; none panics, none is silently
// replaced. New touches no kernel state, so this runs unprivileged.
func TestInvalidOptions(t *testing.T) {
	var nilTCP *tcp.Probe
	same := tcp.New()
	for _, tc := range []struct {
		name string
		opts []flowmill.Option
		want string // in the error
	}{
		{"no probes", nil, "WithProbes"},
		{"nil option", []flowmill.Option{flowmill.WithProbes(tcp.New()), nil}, "nil"},
		{"nil probe", []flowmill.Option{flowmill.WithProbes(nil)}, "nil"},
		{"typed nil probe", []flowmill.Option{flowmill.WithProbes(nilTCP)}, "nil"},
		{"probe twice", []flowmill.Option{flowmill.WithProbes(same, same)}, "twice"},
		{"family twice", []flowmill.Option{flowmill.WithProbes(tcp.New(), tcp.New())}, "twice"},
		{"pid 0", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithProcessScope(0)}, "WithProcessScope(0)"},
		{"pid -5", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithProcessScope(-5)}, "WithProcessScope(-5)"},
		{"empty cgroup", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithCgroupScope("")}, "WithCgroupScope"},
		{"two scopes", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithHostScope(), flowmill.WithProcessScope(1)}, "scope"},
		{"ring 0", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithRingBufferSize(0)}, "WithRingBufferSize(0)"},
		{"ring -4096", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithRingBufferSize(-4096)}, "WithRingBufferSize"},
		{"ring 5000", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithRingBufferSize(5000)}, "WithRingBufferSize(5000)"},
		{"ring 8 GiB", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithRingBufferSize(8 << 30)}, "WithRingBufferSize"},
		{"latency 0", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithMaxLatency(0)}, "WithMaxLatency(0s)"},
		{"latency -1s", []flowmill.Option{flowmill.WithProbes(tcp.New()), flowmill.WithMaxLatency(-time.Second)}, "WithMaxLatency(-1s)"},
		{"tcp interval -1s", []flowmill.Option{flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(-time.Second)))}, "tcp.WithStatsInterval(-1s)"},
		{"tcp interval 1ns", []flowmill.Option{flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(1)))}, "tcp.WithStatsInterval(1ns)"},
		{"tcp flows 0", []flowmill.Option{flowmill.WithProbes(tcp.New(tcp.WithMaxFlows(0)))}, "tcp.WithMaxFlows(0)"},
		{"tcp flows -1", []flowmill.Option{flowmill.WithProbes(tcp.New(tcp.WithMaxFlows(-1)))}, "tcp.WithMaxFlows(-1)"},
		{"tcp flows 2^40", []flowmill.Option{flowmill.WithProbes(tcp.New(tcp.WithMaxFlows(1 << 40)))}, "tcp.WithMaxFlows"},
		{"tcp nil option", []flowmill.Option{flowmill.WithProbes(tcp.New(nil))}, "tcp.New"},
		{"process max 0", []flowmill.Option{flowmill.WithProbes(process.New(process.WithMaxProcesses(0)))}, "process.WithMaxProcesses(0)"},
		{"process nil option", []flowmill.Option{flowmill.WithProbes(process.New(nil))}, "process.New"},
		{"syscalls interval 0", []flowmill.Option{flowmill.WithProbes(syscalls.New(syscalls.WithInterval(0)))}, "syscalls.WithInterval(0s)"},
		{"syscalls entries -1", []flowmill.Option{flowmill.WithProbes(syscalls.New(syscalls.WithMaxEntries(-1)))}, "syscalls.WithMaxEntries(-1)"},
		{"syscalls procs 0", []flowmill.Option{flowmill.WithProbes(syscalls.New(syscalls.WithMaxProcesses(0)))}, "syscalls.WithMaxProcesses(0)"},
		{"http in flight 0", []flowmill.Option{flowmill.WithProbes(http.New(http.WithMaxInFlight(0)))}, "http.WithMaxInFlight(0)"},
		{"http stale 0", []flowmill.Option{flowmill.WithProbes(http.New(http.WithStaleAfter(0)))}, "http.WithStaleAfter(0s)"},
		{"grpc in flight 0", []flowmill.Option{flowmill.WithProbes(grpc.New(grpc.WithMaxInFlight(0)))}, "grpc.WithMaxInFlight(0)"},
		{"grpc stale 0", []flowmill.Option{flowmill.WithProbes(grpc.New(grpc.WithStaleAfter(0)))}, "grpc.WithStaleAfter(0s)"},
		{"grpc nil option", []flowmill.Option{flowmill.WithProbes(grpc.New(nil))}, "grpc.New"},
		{"http stale -1m", []flowmill.Option{flowmill.WithProbes(http.New(http.WithStaleAfter(-time.Minute)))}, "http.WithStaleAfter(-1m0s)"},
		{"http sampling -0.5", []flowmill.Option{flowmill.WithProbes(http.New(http.WithSampling(-0.5)))}, "http.WithSampling(-0.5)"},
		{"http sampling 2", []flowmill.Option{flowmill.WithProbes(http.New(http.WithSampling(2)))}, "http.WithSampling(2)"},
		{"http sampling NaN", []flowmill.Option{flowmill.WithProbes(http.New(http.WithSampling(math.NaN())))}, "http.WithSampling(NaN)"},
		{"sql in flight 0", []flowmill.Option{flowmill.WithProbes(sql.New(sql.WithMaxInFlight(0)))}, "sql.WithMaxInFlight(0)"},
		{"sql stale 0", []flowmill.Option{flowmill.WithProbes(sql.New(sql.WithStaleAfter(0)))}, "sql.WithStaleAfter(0s)"},
		{"sql nil option", []flowmill.Option{flowmill.WithProbes(sql.New(nil))}, "sql.New"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := flowmill.New(tc.opts...)
			if err == nil {
				s.Close()
				t.Fatal("New accepted it")
			}
			if !errors.Is(err, flowmill.ErrInvalidOption) {
				t.Errorf("error %q does not wrap ErrInvalidOption", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
			// Start reports the same, before touching the kernel.
			if _, err := flowmill.Start(t.Context(), tc.opts...); !errors.Is(err, flowmill.ErrInvalidOption) {
				t.Errorf("Start: %v, want ErrInvalidOption", err)
			}
		})
	}
}

// Good values of the same options are accepted.
func TestValidOptions(t *testing.T) {
	s, err := flowmill.New(
		flowmill.WithProbes(
			tcp.New(tcp.WithStatsInterval(0), tcp.WithMaxFlows(1), tcp.WithSpans()),
			process.New(process.WithMaxProcesses(1<<22), process.WithLogRecords()),
			syscalls.New(syscalls.WithInterval(10*time.Millisecond), syscalls.WithMaxEntries(1), syscalls.WithMaxProcesses(1)),
			http.New(http.WithMaxInFlight(1), http.WithStaleAfter(time.Second), http.WithSampling(0)),
			grpc.New(grpc.WithMaxInFlight(1), grpc.WithStaleAfter(time.Second)),
		),
		flowmill.WithCgroupScope("/sys/fs/cgroup"),
		flowmill.WithRingBufferSize(4096),
		flowmill.WithMaxLatency(time.Millisecond),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close before Start: %v", err)
	}
}

func TestInvalidSubscribeAndExporterOptions(t *testing.T) {
	s, err := flowmill.New(flowmill.WithProbes(tcp.New()))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, n := range []int{-1, 0, 1<<22 + 1, 1 << 40} {
		if _, err := flowmill.Subscribe[tcp.ConnClosed](s, flowmill.WithBuffer(n)); !errors.Is(err, flowmill.ErrInvalidOption) || !strings.Contains(err.Error(), "WithBuffer") {
			t.Errorf("WithBuffer(%d): %v, want ErrInvalidOption naming WithBuffer", n, err)
		}
		if _, err := flowmill.NewExporter(s, flowmill.WithExportBuffer(n)); !errors.Is(err, flowmill.ErrInvalidOption) || !strings.Contains(err.Error(), "WithExportBuffer") {
			t.Errorf("WithExportBuffer(%d): %v, want ErrInvalidOption naming WithExportBuffer", n, err)
		}
	}
	if _, err := flowmill.Subscribe[tcp.ConnClosed](s, nil); !errors.Is(err, flowmill.ErrInvalidOption) {
		t.Errorf("a nil SubscribeOption: %v, want ErrInvalidOption", err)
	}
	if _, err := flowmill.SubscribeFunc[tcp.ConnClosed](s, nil); !errors.Is(err, flowmill.ErrInvalidOption) {
		t.Errorf("SubscribeFunc(nil): %v, want ErrInvalidOption", err)
	}
	for name, o := range map[string]flowmill.ExporterOption{
		"WithMeterProvider":  flowmill.WithMeterProvider(nil),
		"WithTracerProvider": flowmill.WithTracerProvider(nil),
		"WithLoggerProvider": flowmill.WithLoggerProvider(nil),
		"WithAttributes":     flowmill.WithAttributes(1 << 20),
		"nil":                nil,
	} {
		if _, err := flowmill.NewExporter(s, o); !errors.Is(err, flowmill.ErrInvalidOption) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v, want ErrInvalidOption naming it", name, err)
		}
	}
	if _, err := flowmill.Subscribe[tcp.ConnClosed](s, flowmill.WithBuffer(1)); err != nil {
		t.Errorf("WithBuffer(1): %v", err)
	}
}

// A session that was never started closes cleanly, and then refuses to
// start.
func TestLifecycleWithoutStart(t *testing.T) {
	s, err := flowmill.New(flowmill.WithProbes(tcp.New()))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := flowmill.Subscribe[tcp.ConnClosed](s)
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Stats()
	if err != nil || st != (flowmill.Stats{}) {
		t.Errorf("Stats before Start: %+v, %v; want zero, nil", st, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-sub.Events(); ok {
		t.Error("subscription open after Close")
	}
	if err := s.Start(t.Context()); !errors.Is(err, flowmill.ErrClosed) {
		t.Errorf("Start after Close: %v, want ErrClosed", err)
	}
	if _, err := flowmill.Subscribe[tcp.ConnClosed](s); !errors.Is(err, flowmill.ErrClosed) {
		t.Errorf("Subscribe after Close: %v, want ErrClosed", err)
	}
}
