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
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/ringread"
	"github.com/flowmill/flowmill/internal/testutil"
)

func attachForTest(t testing.TB, scope probe.Scope) *attachment {
	a, _ := attachWithBus(t, scope)
	return a
}

func attachWithBus(t testing.TB, scope probe.Scope) (*attachment, *probe.Bus) {
	t.Helper()
	testutil.RequireBPF(t)
	testutil.CheckStart(t, bpfload.Check())
	clock := kclock.New()
	env := &probe.Env{Scope: scope, Bus: probe.NewBus(), RingSize: 1 << 20, WakeupBytes: 64 << 10, BootTime: clock.Time}
	att, err := New(WithStatsInterval(0)).Attach(env)
	testutil.CheckStart(t, err)
	return att.(*attachment), env.Bus
}

// The probe offers other families a connection's current counters, and
// they are the socket's own.
func TestTCPConnsService(t *testing.T) {
	a, bus := attachWithBus(t, probe.Scope{Kind: probe.ScopeProcess, PID: uint32(unix.Getpid())})
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
	svc, ok := probe.Lookup[probe.TCPConns](bus)
	if !ok {
		t.Fatal("the TCP probe provides no probe.TCPConns")
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
	// The accepted socket led back to its listener, on this kernel too.
	if st, err := a.Stats(); err != nil || st.Unsupported != 0 {
		t.Errorf("Stats %+v (%v): an accepted socket's listener was not found", st, err)
	}
}

func programs(a *attachment) []*ebpf.Program {
	o := &a.objs
	return []*ebpf.Program{o.OnSetState, o.OnSetStateAgain, o.OnDestroySock, o.OnDestroySockAgain, o.OnSendReset, o.OnReceiveReset}
}

// Close leaves nothing behind: every program, map and link the probe
// created is gone from the kernel afterwards.
func TestCloseLeavesNothing(t *testing.T) {
	a := attachForTest(t, probe.Scope{Kind: probe.ScopeHost})
	progs := programIDs(t, a)
	var maps []ebpf.MapID
	for _, m := range []*ebpf.Map{a.objs.Events, a.objs.Flows, a.objs.Listeners, a.objs.SeededListeners, a.objs.Counters, a.objs.Snaps} {
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
	a := attachForTest(b, probe.Scope{Kind: probe.ScopeProcess, PID: pid})
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

// A flow whose socket cannot be read is still reported, open and close,
// saying that its addresses and counters are missing, and both events are
// counted in Stats.Incomplete. The programs run (BPF_PROG_TEST_RUN) on a
// flow whose socket pointer is a user-space address, where every probe
// read fails.
func TestIncompleteSnapshot(t *testing.T) {
	a, bus := attachWithBus(t, probe.Scope{Kind: probe.ScopeProcess, PID: uint32(unix.Getpid())})
	defer a.Close()
	opened, _ := probe.Subscribe[ConnOpened](bus, 1024)
	closed, _ := probe.Subscribe[ConnClosed](bus, 1024)
	const (
		sk          = 0x1000 // not kernel memory
		id          = 0xf10f
		synSent     = 2
		established = 1
		closeState  = 7
	)
	flow := tcpBPFFlow{Id: id, Role: uint8(RoleClient), States: 1 << synSent}
	flow.Task.Pid = uint32(unix.Getpid())
	if err := a.objs.Flows.Put(uint64(sk), &flow); err != nil {
		t.Fatal(err)
	}
	run := func(p *ebpf.Program, args ...uint64) {
		t.Helper()
		if _, err := p.Run(&ebpf.RunOptions{Context: args}); err != nil {
			t.Fatalf("running %v: %v", p, err)
		}
	}
	run(a.objs.OnSetState, sk, synSent, established)
	run(a.objs.OnSetState, sk, established, closeState)
	run(a.objs.OnDestroySock, sk)
	if b, _ := a.objs.Flows.LookupBytes(uint64(sk)); b != nil {
		t.Error("the flow is still in the kernel's table after its socket was destroyed")
	}

	rd, err := ringbuf.NewReader(a.objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var o *ConnOpened
	var c *ConnClosed
	rd.SetDeadline(time.Now().Add(testutil.Timeout(5 * time.Second)))
	for o == nil || c == nil {
		rec, err := rd.Read()
		if err != nil {
			t.Fatalf("reading the flow's events: %v (open %v, close %v)", err, o, c)
		}
		a.handle(rec.RawSample)
		for len(opened.C()) > 0 {
			if e := <-opened.C(); e.ID == id {
				o = &e
			}
		}
		for len(closed.C()) > 0 {
			if e := <-closed.C(); e.ID == id {
				c = &e
			}
		}
	}
	want := MissingAddresses | MissingCounters
	if o.Missing != want || c.Missing != want || o.Local.IsValid() || c.Remote.IsValid() {
		t.Errorf("open missing %v (local %v), close missing %v (remote %v); want %v", o.Missing, o.Local, c.Missing, c.Remote, want)
	}
	if c.Counters != (Counters{}) || c.Duration <= 0 {
		t.Errorf("close of an unreadable socket: counters %+v, duration %v", c.Counters, c.Duration)
	}
	st, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Incomplete != 2 || st.Malformed != 0 {
		t.Errorf("Stats %+v: want 2 incomplete events, none malformed", st)
	}
}

// A hit the kernel skips (Stats.Missed: on 7.x a task preempted inside a
// program makes the next on that CPU skip it) loses nothing at
// inet_sock_set_state and tcp_destroy_sock, whose two programs each do the
// work the other did not, once; and a flow whose destroy was skipped by
// both is closed, its counters missing, when a new socket begins at its
// address, rather than taken over by it. Programs run on a flow of a user-space socket address
// (BPF_PROG_TEST_RUN), as in TestIncompleteSnapshot.
func TestSkippedHits(t *testing.T) {
	a, bus := attachWithBus(t, probe.Scope{Kind: probe.ScopeProcess, PID: uint32(unix.Getpid())})
	defer a.Close()
	closed, _ := probe.Subscribe[ConnClosed](bus, 1024)
	opened, _ := probe.Subscribe[ConnOpened](bus, 1024)
	const synSent, established, closeState = 2, 1, 7
	run := func(p *ebpf.Program, args ...uint64) {
		t.Helper()
		if _, err := p.Run(&ebpf.RunOptions{Context: args}); err != nil {
			t.Fatalf("running %v: %v", p, err)
		}
	}
	// connecting puts the flow the SYN_SENT transition would have (a
	// user-space address fails the checks that insert one).
	connecting := func(sk, id uint64) {
		t.Helper()
		flow := tcpBPFFlow{Id: id, Role: uint8(RoleClient), States: 1 << synSent}
		flow.Task.Pid = uint32(unix.Getpid())
		if err := a.objs.Flows.Put(sk, &flow); err != nil {
			t.Fatal(err)
		}
	}
	open := func(sk, id uint64) {
		t.Helper()
		connecting(sk, id)
		run(a.objs.OnSetState, sk, synSent, established)
		run(a.objs.OnSetStateAgain, sk, synSent, established)
	}
	rd, err := ringbuf.NewReader(a.objs.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	// events reads the ring until it is empty and returns the opens and
	// closes by flow ID.
	events := func() (map[uint64]int, map[uint64][]ConnClosed) {
		t.Helper()
		opens, got := make(map[uint64]int), make(map[uint64][]ConnClosed)
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		for {
			rec, err := rd.Read()
			if err != nil {
				return opens, got
			}
			a.handle(rec.RawSample)
			for len(closed.C()) > 0 {
				e := <-closed.C()
				got[e.ID] = append(got[e.ID], e)
			}
			for len(opened.C()) > 0 {
				opens[(<-opened.C()).ID]++
			}
		}
	}

	// Both programs run, as for every hit: one close.
	open(0x1000, 1)
	run(a.objs.OnDestroySock, 0x1000)
	run(a.objs.OnDestroySockAgain, 0x1000)
	// The first skipped: the second closes.
	open(0x2000, 2)
	run(a.objs.OnDestroySockAgain, 0x2000)
	// Both skipped, then a new socket connects at the same address.
	open(0x3000, 3)
	run(a.objs.OnSetState, 0x3000, closeState, synSent)
	run(a.objs.OnSetStateAgain, 0x3000, closeState, synSent)
	// A transition's first program skipped: the second does its work,
	// once; both ran: once.
	connecting(0x4000, 4)
	run(a.objs.OnSetStateAgain, 0x4000, synSent, established)
	run(a.objs.OnSetState, 0x4000, established, closeState)
	run(a.objs.OnSetStateAgain, 0x4000, established, closeState)
	run(a.objs.OnDestroySock, 0x4000)
	// The second run of the SYN_SENT that inserted a flow leaves it be.
	connecting(0x5000, 5)
	run(a.objs.OnSetStateAgain, 0x5000, closeState, synSent)
	var f tcpBPFFlow
	if err := a.objs.Flows.Lookup(uint64(0x5000), &f); err != nil || f.Id != 5 {
		t.Errorf("a flow just inserted: %+v, %v after the transition's second run", f, err)
	}
	a.objs.Flows.Delete(uint64(0x5000))
	opens, got := events()
	for id := uint64(1); id <= 4; id++ {
		if len(got[id]) != 1 || opens[id] != 1 {
			t.Errorf("flow %d: %d opens and %d closes, want 1 and 1: %+v", id, opens[id], len(got[id]), got[id])
		}
	}
	if c := got[3]; len(c) == 1 && c[0].Missing&MissingCounters == 0 {
		t.Errorf("the close of a flow whose destroy was skipped: missing %v, want its counters missing", c[0].Missing)
	}
	for _, sk := range []uint64{0x1000, 0x2000, 0x3000, 0x4000} {
		if err := a.objs.Flows.Lookup(sk, &f); err == nil && f.Id <= 4 {
			t.Errorf("socket %#x: the table still holds flow %d", sk, f.Id)
		}
	}
}
