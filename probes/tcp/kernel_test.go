package tcp

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes"
)

func attachForTest(t testing.TB, scope probes.Scope) *attachment {
	t.Helper()
	testutil.RequireBPF(t)
	testutil.CheckStart(t, bpfload.Check())
	clock := kclock.New()
	env := &probes.Env{Scope: scope, Bus: probes.NewBus(), RingSize: 1 << 20, WakeupBytes: 64 << 10, BootTime: clock.Time}
	att, err := New(WithStatsInterval(0)).Attach(env)
	testutil.CheckStart(t, err)
	return att.(*attachment)
}

func programs(a *attachment) []*ebpf.Program {
	o := &a.objs
	return []*ebpf.Program{o.OnSetState, o.OnDestroySock, o.OnSendReset, o.OnReceiveReset}
}

// Close leaves nothing behind: every program, map and link the probe
// created is gone from the kernel afterwards.
func TestCloseLeavesNothing(t *testing.T) {
	a := attachForTest(t, probes.Scope{Kind: probes.ScopeHost})
	progs := programIDs(t, a)
	var maps []ebpf.MapID
	for _, m := range []*ebpf.Map{a.objs.Events, a.objs.Flows, a.objs.Listeners, a.objs.Counters, a.objs.Snaps} {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		maps = append(maps, id)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.ProgramsGone(t, progs)
	// Maps go when the programs that use them are freed.
	deadline := time.Now().Add(5 * time.Second)
	for _, id := range maps {
		for {
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				break
			}
			m.Close()
			if time.Now().After(deadline) {
				t.Fatalf("map %d still exists after Close", id)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func programIDs(t testing.TB, a *attachment) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	for _, p := range programs(a) {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids = append(ids, id)
	}
	return ids
}

// BenchmarkKernelCost measures what each program costs per hit in the
// kernel (BPF_ENABLE_STATS: run time and run count), driven by loopback
// connections that each move a little data. b.N is the number of
// connections. "observed": the connections are in the session's scope (two
// flows per connection, each opened, snapshotted and reported); "other":
// they belong to a process outside the scope, the cost every other
// process's connection pays for the filter.
func BenchmarkKernelCost(b *testing.B) {
	b.Run("observed", func(b *testing.B) { kernelCost(b, uint32(unix.Getpid())) })
	b.Run("other", func(b *testing.B) { kernelCost(b, 1) })
}

func kernelCost(b *testing.B, pid uint32) {
	a := attachForTest(b, probes.Scope{Kind: probes.ScopeProcess, PID: pid})
	defer a.Close()
	testutil.EnableRunStats(b)
	ids := programIDs(b, a)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	before := testutil.RunStats(b, ids)
	for b.Loop() {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, c)
		c.Close()
	}
	b.StopTimer()
	time.Sleep(50 * time.Millisecond) // let the last closes run
	after := testutil.RunStats(b, ids)
	var runs, ns uint64
	for name, s := range after {
		r, t := s.RunCount-before[name].RunCount, uint64(s.Runtime-before[name].Runtime)
		runs += r
		ns += t
		if r > 0 {
			b.ReportMetric(float64(t)/float64(r), "ns/hit-"+name)
		}
	}
	b.ReportMetric(float64(runs)/float64(b.N), "hits/conn")
	b.ReportMetric(float64(ns)/float64(b.N), "kernel-ns/conn")
}
