//go:build linux

package syscalls_test

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/syscalls"
)

// TestExporterCountsSyscalls runs the helper under a real session and
// exporter: process.syscalls for its PID holds exactly its final Counts,
// 1000 getpid calls among them.
func TestExporterCountsSyscalls(t *testing.T) {
	bin := buildSysloop(t)
	s := start(t, syscalls.New(syscalls.WithInterval(50*time.Millisecond)))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp), flowmill.WithAttributes(flowmill.DefaultAttributes|flowmill.AttrPID))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })
	// Subscribed after the exporter, the test receives each Counts after
	// the exporter's channel holds it (the bus hands an event to its
	// subscribers in order): once the test has the final Counts, Shutdown
	// records it.
	sub, err := flowmill.Subscribe[syscalls.Counts](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(bin, "1000", "300")
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := cmd.Process.Pid
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	in.Write([]byte("go\n"))
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	var final syscalls.Counts
	timeout := time.After(testutil.Timeout(5 * time.Second))
	for final.PID == 0 {
		select {
		case c := <-sub.Events():
			if c.PID == uint32(pid) && c.Exited {
				final = c
			}
		case <-timeout:
			t.Fatal("no final Counts for the helper")
		}
	}
	if err := exp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := make(map[string]int64)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "process.syscalls" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				if v, _ := dp.Attributes.Value(semconv.ProcessPIDKey); v.AsInt64() == int64(pid) {
					name, _ := dp.Attributes.Value(attribute.Key("flowmill.syscalls.name"))
					got[name.AsString()] += dp.Value
				}
			}
		}
	}
	if got["getpid"] != 1000 || got["exit_group"] != 1 {
		t.Errorf("helper %d: getpid %d, exit_group %d: want 1000 and 1", pid, got["getpid"], got["exit_group"])
	}
	if len(got) != len(final.Syscalls) {
		t.Errorf("%d system calls recorded, want the %d of the final Counts", len(got), len(final.Syscalls))
	}
	for _, c := range final.Syscalls {
		if got[c.Syscall.String()] != int64(c.N) {
			t.Errorf("%s: %d recorded, want %d", c.Syscall, got[c.Syscall.String()], c.N)
		}
	}
}
