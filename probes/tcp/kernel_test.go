//go:build linux

package tcp

import (
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/ringread"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes"
)

func attachForTest(t testing.TB, scope probes.Scope) *attachment {
	a, _ := attachWithBus(t, scope)
	return a
}

func attachWithBus(t testing.TB, scope probes.Scope) (*attachment, *probes.Bus) {
	t.Helper()
	testutil.RequireBPF(t)
	testutil.CheckStart(t, bpfload.Check())
	clock := kclock.New()
	env := &probes.Env{Scope: scope, Bus: probes.NewBus(), RingSize: 1 << 20, WakeupBytes: 64 << 10, BootTime: clock.Time}
	att, err := New(WithStatsInterval(0)).Attach(env)
	testutil.CheckStart(t, err)
	return att.(*attachment), env.Bus
}

// The probe offers other families a connection's current counters, and
// they are the socket's own.
func TestTCPConnsService(t *testing.T) {
	a, bus := attachWithBus(t, probes.Scope{Kind: probes.ScopeProcess, PID: uint32(unix.Getpid())})
	defer a.Close()
	var read atomic.Uint64
	for _, r := range a.Rings() {
		rd, err := ringread.New(r.Map, 10*time.Millisecond, r.Handle, &read)
		if err != nil {
			t.Fatal(err)
		}
		go rd.Run()
		defer rd.Close()
	}
	svc, ok := probes.Lookup[probes.TCPConns](bus)
	if !ok {
		t.Fatal("the TCP probe provides no probes.TCPConns")
	}
	ln, err := net.Listen("tcp", ":0") // dual stack: the accepted side is IPv6, v4-mapped
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	c, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 100000))
	// Compare once the client side is quiet: everything sent and acked, so
	// no segment or RTT sample changes what either reader sees.
	raw, _ := c.(*net.TCPConn).SyscallConn()
	tcpInfo := func() *unix.TCPInfo {
		var info *unix.TCPInfo
		raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO) })
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	for quiet := time.Now().Add(testutil.Timeout(5 * time.Second)); ; time.Sleep(10 * time.Millisecond) {
		if i := tcpInfo(); i.Unacked == 0 && i.Notsent_bytes == 0 {
			break
		}
		if time.Now().After(quiet) {
			t.Fatal("the client's 100000 bytes were not all acknowledged in time")
		}
	}
	local, remote := c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
	mine, ok := svc.TCPConn(local, remote)
	if !ok {
		t.Fatalf("client side %v -> %v not found", local, remote)
	}
	if _, ok := svc.TCPConn(remote, local); !ok {
		t.Fatalf("server side %v -> %v not found", remote, local)
	}
	// By the peer alone, as an HTTP server knows it: the probe must have
	// seen the connection open (its records are read on a timer).
	deadline := time.Now().Add(testutil.Timeout(2 * time.Second))
	for {
		if _, ok := svc.TCPConn(netip.AddrPort{}, local); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server side not found by its peer %v", local)
		}
		time.Sleep(20 * time.Millisecond)
	}
	info := tcpInfo()
	if mine.SegmentsOut != info.Segs_out || mine.SRTT != time.Duration(info.Rtt)*time.Microsecond {
		t.Errorf("service says %+v; getsockopt says segs_out %d rtt %dus", mine, info.Segs_out, info.Rtt)
	}
	if _, ok := svc.TCPConn(local, netip.AddrPortFrom(remote.Addr(), 1)); ok {
		t.Error("found a connection that does not exist")
	}
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
	deadline := time.Now().Add(testutil.Timeout(5 * time.Second))
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
// process's connection pays for the filter. Each run also attaches an
// empty program to the same tracepoints ("ns/hit-empty"): the floor on
// this machine, measured alongside.
func BenchmarkKernelCost(b *testing.B) {
	b.Run("observed", func(b *testing.B) { kernelCost(b, uint32(unix.Getpid())) })
	b.Run("other", func(b *testing.B) { kernelCost(b, 1) })
}

func kernelCost(b *testing.B, pid uint32) {
	a := attachForTest(b, probes.Scope{Kind: probes.ScopeProcess, PID: pid})
	defer a.Close()
	testutil.EnableRunStats(b)
	ids := programIDs(b, a)
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "empty",
		Type:         ebpf.RawTracepoint,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	links, err := bpfload.AttachRawTracepoints(
		bpfload.RawTracepoint{Name: "inet_sock_set_state", Program: empty},
		bpfload.RawTracepoint{Name: "tcp_destroy_sock", Program: empty})
	if err != nil {
		b.Fatal(err)
	}
	defer bpfload.CloseLinks(links)
	info, _ := empty.Info()
	emptyID, _ := info.ID()
	ids = append(ids, emptyID)
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
	e := after["empty"]
	runs -= e.RunCount - before["empty"].RunCount
	ns -= uint64(e.Runtime - before["empty"].Runtime)
	b.ReportMetric(float64(runs)/float64(b.N), "hits/conn")
	b.ReportMetric(float64(ns)/float64(b.N), "kernel-ns/conn")
}
