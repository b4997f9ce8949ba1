//go:build linux

package process_test

import (
	"context"
	"os/exec"
	"testing"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/process"
)

// BenchmarkKernel measures the kernel-side cost of each program per hit
// (the kernel's own run-time statistics) while b.N processes run
// /bin/true, in the default scope (the benchmark's process tree) and in
// host scope. Hits by other processes on the host are included: in the
// default scope most of them stop at the scope check.
func BenchmarkKernel(b *testing.B) {
	for _, bc := range []struct {
		name string
		opts []flowmill.Option
	}{{"tree", nil}, {"host", []flowmill.Option{flowmill.WithHostScope()}}} {
		b.Run(bc.name, func(b *testing.B) {
			testutil.RequireBPF(b)
			testutil.EnableRunStats(b)
			held := testutil.OwnPrograms(b)
			s, err := flowmill.Start(context.Background(), append(bc.opts, flowmill.WithProbes(process.New()))...)
			testutil.CheckStart(b, err)
			b.Cleanup(func() { s.Close() })
			ours := testutil.ProgramsSince(b, held)
			sub, _ := flowmill.Subscribe[process.Exec](s) // decode execs too
			go func() {
				for range sub.Events() {
				}
			}()
			start := testutil.RunStats(b, ours)
			for b.Loop() {
				if err := exec.Command("/bin/true").Run(); err != nil {
					b.Fatal(err)
				}
			}
			end := testutil.RunStats(b, ours)
			for name, st := range end {
				n := st.RunCount - start[name].RunCount
				if n > 0 {
					b.ReportMetric(float64(st.Runtime-start[name].Runtime)/float64(n), name+"-ns/hit")
				}
			}
		})
	}
}
