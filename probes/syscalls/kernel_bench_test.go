//go:build linux

package syscalls_test

import (
	"context"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/syscalls"
)

// BenchmarkKernel measures the kernel-side cost of on_sys_enter per hit
// (the kernel's own run-time statistics) while the benchmark calls getpid,
// in the default scope (the benchmark's process tree) and in host scope.
// "none" is the same loop without the probe: the raw system call cost.
// Hits by other processes on the host are included: in the default scope
// they stop at the scope check.
func BenchmarkKernel(b *testing.B) {
	b.Run("none", func(b *testing.B) {
		for b.Loop() {
			syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0)
		}
	})
	for _, bc := range []struct {
		name string
		opts []flowmill.Option
	}{{"tree", nil}, {"host", []flowmill.Option{flowmill.WithHostScope()}}} {
		b.Run(bc.name, func(b *testing.B) {
			testutil.RequireBPF(b)
			testutil.EnableRunStats(b)
			held := testutil.OwnPrograms(b)
			s, err := flowmill.Start(context.Background(), append(bc.opts, flowmill.WithProbes(syscalls.New()))...)
			testutil.CheckStart(b, err)
			b.Cleanup(func() { s.Close() })
			ours := testutil.ProgramsSince(b, held)
			start := testutil.RunStats(b, ours)
			for b.Loop() {
				syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0)
			}
			end := testutil.RunStats(b, ours)
			st := end["on_sys_enter"]
			n := st.RunCount - start["on_sys_enter"].RunCount
			b.ReportMetric(float64(st.Runtime-start["on_sys_enter"].Runtime)/float64(n), "on_sys_enter-ns/hit")
			b.ReportMetric(float64(n)/float64(b.N), "hits/op")
		})
	}
}

// BenchmarkGetpid is the added cost per system call as a user pays it: a
// getpid loop with no probe, with the floor of this hook (an empty program
// on sys_enter: what enabling the tracepoint costs every call, whatever the
// program does), and with the probe in the benchmark's process tree and in
// host scope. Run-time statistics stay off: they add to what they measure.
// Compare with -count and benchstat; the ratios, not the figures, carry
// from machine to machine.
func BenchmarkGetpid(b *testing.B) {
	loop := func(b *testing.B) {
		for b.Loop() {
			syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0)
		}
	}
	b.Run("none", loop)
	b.Run("floor", func(b *testing.B) {
		testutil.RequireBPF(b)
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         ebpf.RawTracepoint,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
			License:      "GPL",
		})
		if err != nil {
			testutil.Unavailable(b, "loading an empty raw tracepoint program: %v", err)
		}
		b.Cleanup(func() { prog.Close() })
		l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: "sys_enter", Program: prog})
		if err != nil {
			testutil.Unavailable(b, "attaching to sys_enter: %v", err)
		}
		b.Cleanup(func() { l.Close() })
		loop(b)
	})
	for _, bc := range []struct {
		name string
		opts []flowmill.Option
	}{{"tree", nil}, {"host", []flowmill.Option{flowmill.WithHostScope()}}} {
		b.Run(bc.name, func(b *testing.B) {
			testutil.RequireBPF(b)
			s, err := flowmill.Start(context.Background(), append(bc.opts, flowmill.WithProbes(syscalls.New()))...)
			testutil.CheckStart(b, err)
			b.Cleanup(func() { s.Close() })
			loop(b)
		})
	}
}
