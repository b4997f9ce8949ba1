//go:build linux

package tcp

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/sockdiag"
)

// openTestFlow records an established flow with the poller, as the ring's
// goroutine does.
func openTestFlow(p *poller, id uint64, netns uint32, pid uint32, local, remote string) Conn {
	c := Conn{ID: id, PID: pid, Role: RoleClient, Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote)}
	var e tcpBPFTcpEvent
	e.Tuple.Netns = netns
	p.open(&c, &e)
	return c
}

// A network namespace whose sockets cannot be read (setns refused, the
// namespace gone) is skipped and counted in PollsFailed: the other
// namespaces still get their ConnStats, and its flows are kept.
func TestReportSkipsFailedNamespace(t *testing.T) {
	self, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	bus := probe.NewBus()
	p := testPoller()
	p.topic = probe.Produce[ConnStats](bus)
	p.netns = self + 1 // the session's namespace, read without entering it
	// Another namespace: this process's own, entered through its
	// /proc/PID/ns/net, which the stub refuses.
	pid := uint32(os.Getpid())
	mine := openTestFlow(p, 1, p.netns, pid, "10.0.0.1:1000", "10.0.0.2:80")
	theirs := openTestFlow(p, 2, self, pid, "10.1.0.1:1000", "10.1.0.2:80")
	// A namespace whose owner is gone: no way to enter it.
	openTestFlow(p, 3, self+2, 1<<22+1, "10.2.0.1:1000", "10.2.0.2:80")
	refuse := true
	p.dumpIn = func(path string, fn func(*sockdiag.Socket)) error {
		info := unix.TCPInfo{Bytes_acked: 101, Segs_out: 7}
		if path == "" {
			fn(&sockdiag.Socket{Local: mine.Local, Remote: mine.Remote, State: sockdiag.StateEstablished, Info: &info})
			return nil
		}
		fn(&sockdiag.Socket{Local: theirs.Local, Remote: theirs.Remote, State: sockdiag.StateEstablished, Info: &info})
		if refuse {
			return errors.New("sockdiag: entering " + path + ": operation not permitted")
		}
		return nil
	}
	// A subscriber function that asks the poller about a connection, as
	// the HTTP family does: ConnStats are published without its lock.
	var got []ConnStats
	sub, err := probe.SubscribeFunc(bus, func(e *ConnStats) {
		p.TCPConn(netip.AddrPort{}, netip.MustParseAddrPort("192.0.2.1:9"))
		got = append(got, *e)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	reported := make(chan struct{})
	go func() { p.report(); close(reported) }()
	select {
	case <-reported:
	case <-time.After(10 * time.Second):
		t.Fatal("report did not return: the subscriber's question deadlocked it")
	}
	if len(got) != 1 || got[0].ID != mine.ID || got[0].BytesSent != 101 {
		t.Errorf("ConnStats %+v, want one, of flow %d", got, mine.ID)
	}
	if n := p.pollsFailed.Load(); n != 2 {
		t.Errorf("PollsFailed = %d, want 2 (one refused, one gone)", n)
	}
	if len(p.flows) != 3 {
		t.Errorf("%d flows left, want all 3: those unread are not gone", len(p.flows))
	}

	refuse = false
	got = nil
	p.report()
	if len(got) != 2 || p.pollsFailed.Load() != 3 {
		t.Errorf("second round: %d ConnStats, PollsFailed %d; want 2 and 3", len(got), p.pollsFailed.Load())
	}
}

// fromDump answers from a dump no older than dumpMaxAge, and takes a new
// one after that.
func TestFromDumpBoundedAge(t *testing.T) {
	p := testPoller()
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	peer := netip.MustParseAddrPort("10.0.0.2:80")
	dumps := 0
	p.dumpIn = func(path string, fn func(*sockdiag.Socket)) error {
		dumps++
		info := unix.TCPInfo{Rtt: uint32(1000 * dumps)}
		fn(&sockdiag.Socket{Local: netip.MustParseAddrPort("10.0.0.1:5000"), Remote: peer, State: sockdiag.StateEstablished, Info: &info})
		return nil
	}
	for _, step := range []struct {
		after time.Duration
		dumps int
	}{{0, 1}, {dumpMaxAge / 2, 1}, {dumpMaxAge, 2}, {10 * dumpMaxAge, 3}} {
		now = now.Add(step.after)
		info, ok := p.fromDump(peer)
		if !ok || dumps != step.dumps || info.SRTT != time.Duration(dumps)*time.Millisecond {
			t.Errorf("%v later: %+v %v after %d dumps; want the counters of dump %d", step.after, info, ok, dumps, step.dumps)
		}
	}
}

// The table of open flows is bounded: past the kernel's table size it asks
// for a sweep, and at twice that it keeps only the newest flows.
func TestOpenFlowsBounded(t *testing.T) {
	p := testPoller()
	p.maxOpen = 4
	for id := range uint64(10) {
		openTestFlow(p, id+1, 1, 1, netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(1000+id)).String(), "10.0.0.2:80")
	}
	if len(p.flows) != 6 || p.flows[4] != nil || p.flows[5] == nil || len(p.wake) != 1 {
		t.Errorf("%d flows (flow 4: %v, 5: %v), sweep asked %d; want flows 5 to 10, a sweep", len(p.flows), p.flows[4], p.flows[5], len(p.wake))
	}
	mark := p.mark()
	p.maxOpen = 100
	openTestFlow(p, 99, 1, 1, "10.0.0.1:999", "10.0.0.2:80") // after the walk began: kept
	p.reconcile(mark, func(id uint64) bool { return id == 5 })
	if len(p.flows) != 2 || p.flows[5] == nil || p.flows[99] == nil {
		t.Errorf("after a sweep that found flow 1: %d flows left", len(p.flows))
	}
}

// infoCounters leaves the FINs out whatever state the dump read: the
// state is read before tcp_info, and a FIN can come in between.
func TestInfoCountersWithoutFIN(t *testing.T) {
	full := int(unsafe.Sizeof(unix.TCPInfo{}))
	f := &openFlow{baseAcked: 1, baseReceived: 0}
	for _, tc := range []struct {
		name     string
		n        int
		state    uint8
		ti       unix.TCPInfo
		sent     uint64
		received uint64
	}{
		{"open", full, sockdiag.StateEstablished, unix.TCPInfo{Bytes_acked: 101, Bytes_sent: 150, Bytes_received: 7}, 100, 7},
		{"our FIN acknowledged", full, sockdiag.StateFinWait2, unix.TCPInfo{Bytes_acked: 102, Bytes_sent: 100, Bytes_received: 7}, 100, 7},
		{"our FIN acknowledged after the state was read", full, sockdiag.StateFinWait1, unix.TCPInfo{Bytes_acked: 102, Bytes_sent: 110, Bytes_retrans: 10}, 100, 0},
		{"kernel without tcpi_bytes_sent", int(unsafe.Offsetof(unix.TCPInfo{}.Bytes_sent)), sockdiag.StateEstablished, unix.TCPInfo{Bytes_acked: 101}, 100, 0},
		{"peer's FIN", full, sockdiag.StateCloseWait, unix.TCPInfo{Bytes_acked: 1, Bytes_received: 8}, 0, 7},
	} {
		got := infoCounters(&tc.ti, tc.n, tc.state, f)
		if got.BytesSent != tc.sent || got.BytesReceived != tc.received {
			t.Errorf("%s: sent %d, received %d; want %d, %d", tc.name, got.BytesSent, got.BytesReceived, tc.sent, tc.received)
		}
	}
}
