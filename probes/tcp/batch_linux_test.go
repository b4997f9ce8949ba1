//go:build linux

package tcp

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/ringread"
	"github.com/flowmill/flowmill/internal/sockdiag"
	"github.com/flowmill/flowmill/internal/testutil"
)

// TCPConnBatch answers many queries with one dump: open connections by
// both addresses or by the peer alone, with the socket's own counters, a
// connection closed moments ago from its final counters (its records
// caught up with Sync), and nothing for connections that do not exist.
func TestTCPConnBatch(t *testing.T) {
	testutil.RequireBPF(t)
	testutil.CheckStart(t, bpfload.Check())
	var readers []*ringread.Reader
	env := &probe.Env{Scope: probe.Scope{Kind: probe.ScopeProcess, PID: uint32(os.Getpid())}, Bus: probe.NewBus(),
		RingSize: 1 << 20, WakeupBytes: 64 << 10, BootTime: kclock.New().Time,
		Sync: func() {
			for _, rd := range readers {
				rd.Sync()
			}
		}}
	att, err := New(WithStatsInterval(0)).Attach(env)
	testutil.CheckStart(t, err)
	a := att.(*attachment)
	t.Cleanup(func() { a.Close() })
	var read atomic.Uint64
	for _, r := range a.Rings() {
		rd, err := ringread.New(r.Map, 50*time.Millisecond, r.Handle, &read)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { rd.Run(); close(done) }()
		t.Cleanup(func() { rd.Close(); <-done })
		readers = append(readers, rd)
	}
	svc, ok := probe.Lookup[probe.TCPConns](env.Bus)
	if !ok {
		t.Fatal("the TCP probe provides no probe.TCPConns")
	}

	_, c1, s1 := testutil.Transfer(t, 100000)
	_, c2, _ := testutil.Transfer(t, 1000)
	_, c3, s3 := testutil.Transfer(t, 5000)
	addrs := func(c net.Conn) (local, remote netip.AddrPort) {
		return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
	}
	l1, r1 := addrs(c1)
	l2, r2 := addrs(c2)
	l3, r3 := addrs(c3)
	tcpInfo := func(c net.Conn) *unix.TCPInfo {
		raw, _ := c.(*net.TCPConn).SyscallConn()
		var info *unix.TCPInfo
		var err error
		raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO) })
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	for quiet := time.Now().Add(testutil.Timeout(5 * time.Second)); ; time.Sleep(10 * time.Millisecond) {
		if i := tcpInfo(c1); i.Unacked == 0 && i.Notsent_bytes == 0 {
			break
		}
		if time.Now().After(quiet) {
			t.Fatal("the client's bytes were not all acknowledged in time")
		}
	}
	// c3 closes on both sides; wait until the kernel has no tcp_info left
	// for it (TIME_WAIT or gone).
	c3.Close()
	io.Copy(io.Discard, s3)
	s3.Close()
	for gone := time.Now().Add(testutil.Timeout(5 * time.Second)); ; time.Sleep(10 * time.Millisecond) {
		_, e1 := sockdiag.Get(l3, r3)
		srv, e2 := sockdiag.Get(r3, l3) // or else the listener
		if errors.Is(e1, sockdiag.ErrNotFound) && (errors.Is(e2, sockdiag.ErrNotFound) || e2 == nil && srv.Remote != l3) {
			break
		}
		if time.Now().After(gone) {
			t.Fatalf("the closed connection is still in the kernel: %v %v", e1, e2)
		}
	}
	qs := []probe.TCPConnQuery{
		{Local: l1, Remote: r1},
		{Remote: l1}, // the server side, by its peer
		{Local: l2, Remote: r2},
		{Remote: l2},
		{Local: l3, Remote: r3}, // closed
		{Remote: l3},
		{Local: l1, Remote: netip.AddrPortFrom(r1.Addr(), 1)},
		{Remote: netip.MustParseAddrPort("192.0.2.1:9")},
		{},
		{Info: probe.TCPConnInfo{Retransmits: 7}, OK: true}, // stale answers are reset
	}
	info1 := tcpInfo(c1)
	if err := svc.TCPConnBatch(qs); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, true, true, true, true, true, false, false, false, false} {
		if qs[i].OK != want {
			t.Errorf("query %d %v -> %v: found %v, want %v", i, qs[i].Local, qs[i].Remote, qs[i].OK, want)
		}
	}
	if got := qs[0].Info; got.SegmentsOut != info1.Segs_out || got.SRTT != time.Duration(info1.Rtt)*time.Microsecond {
		t.Errorf("c1: batch says %+v; getsockopt says segs_out %d rtt %dus", got, info1.Segs_out, info1.Rtt)
	}
	if si := tcpInfo(s1); qs[1].Info.SegmentsIn != si.Segs_in {
		t.Errorf("c1's server side: batch says segs_in %d; getsockopt %d", qs[1].Info.SegmentsIn, si.Segs_in)
	}
	if qs[4].Info.SegmentsOut == 0 {
		t.Errorf("closed c3: %+v, want its final counters", qs[4].Info)
	}
	if qs[9].Info != (probe.TCPConnInfo{}) {
		t.Errorf("a query without a remote kept its stale answer %+v", qs[9].Info)
	}
	if err := svc.TCPConnBatch(nil); err != nil {
		t.Error(err)
	}
}
