//go:build linux

package tcp

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

func sampleEvent() tcpBPFTcpEvent {
	var e tcpBPFTcpEvent
	e.Task.Pid, e.Task.Tid, e.Task.CgroupId = 4242, 4243, 99
	copy(e.Task.Comm[:], []int8{'c', 'u', 'r', 'l'})
	e.Tuple.Family = afInet6
	e.Tuple.Laddr = netip.MustParseAddr("2001:db8::1").As16()
	e.Tuple.Raddr = netip.MustParseAddr("::ffff:10.0.0.2").As16()
	e.Tuple.Lport, e.Tuple.Rport = 40000, 443
	e.FlowId, e.Kind, e.Role = 7, kindClose, uint8(RoleClient)
	e.StartNs, e.TsNs = 1_000_000, 3_500_000
	e.Counts = tcpBPFTcpCounts{BytesSent: 10, BytesReceived: 20, SegsIn: 3, SegsOut: 4, Retrans: 1,
		SrttUs: 120, RttvarUs: 30, MinRttUs: ^uint32(0)}
	e.RstSent, e.RstReceived = 1, 0
	return e
}

func encode(t testing.TB, e *tcpBPFTcpEvent) []byte {
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, e); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func testAttachment(bus *probe.Bus) *attachment {
	return &attachment{
		dec:    decoder{boot: func(ns uint64) time.Time { return time.Unix(1700000000, int64(ns)) }},
		opened: probe.Produce[ConnOpened](bus),
		closed: probe.Produce[ConnClosed](bus),
		stats:  probe.Produce[ConnStats](bus),
		poller: testPoller(),
	}
}

// testPoller is a poller that reports nothing by itself and reads no
// kernel state.
func testPoller() *poller {
	return &poller{
		maxOpen: 1 << 16,
		now:     time.Now,
		flows:   map[uint64]*openFlow{},
		byTuple: map[tuple]uint64{},
		byPeer:  map[netip.AddrPort]tuple{},
		dumped:  map[netip.AddrPort]probe.TCPConnInfo{},
		wake:    make(chan struct{}, 1),
	}
}

func TestDecodeClose(t *testing.T) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	sub, err := probe.Subscribe[ConnClosed](bus, 1)
	if err != nil {
		t.Fatal(err)
	}
	e := sampleEvent()
	a.handle(encode(t, &e))
	got := <-sub.C()
	want := ConnClosed{
		Time: time.Unix(1700000000, 3_500_000),
		Conn: Conn{ID: 7, PID: 4242, TID: 4243, Comm: "curl", CgroupID: 99,
			Local:  netip.MustParseAddrPort("[2001:db8::1]:40000"),
			Remote: netip.MustParseAddrPort("10.0.0.2:443"), Role: RoleClient},
		Counters: Counters{BytesSent: 10, BytesReceived: 20, SegmentsIn: 3, SegmentsOut: 4, Retransmits: 1,
			ResetsSent: 1, SRTT: 120 * time.Microsecond, RTTVar: 30 * time.Microsecond},
		Duration: 2500 * time.Microsecond,
	}
	if got != want {
		t.Errorf("decoded\n%+v\nwant\n%+v", got, want)
	}
}

func TestDecodeRejects(t *testing.T) {
	var d decoder
	e := sampleEvent()
	raw := encode(t, &e)
	if _, err := d.record(raw[:len(raw)-1]); err != errShort {
		t.Errorf("short record: %v", err)
	}
	e.Kind = 9
	if _, err := d.record(encode(t, &e)); err != errKind {
		t.Errorf("bad kind: %v", err)
	}
	e = sampleEvent()
	e.Tuple.Family = 1
	if _, err := d.record(encode(t, &e)); err != errFamily {
		t.Errorf("bad family: %v", err)
	}
}

// Subscribers that do not keep up lose events, counted, and never block.
func TestSlowSubscriberDrops(t *testing.T) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	sub, _ := probe.Subscribe[ConnClosed](bus, 2)
	e := sampleEvent()
	raw := encode(t, &e)
	for range 5 {
		a.handle(raw)
	}
	if sub.Dropped() != 3 || bus.Dropped() != 3 || len(sub.C()) != 2 {
		t.Errorf("dropped %d (bus %d), buffered %d; want 3, 3, 2", sub.Dropped(), bus.Dropped(), len(sub.C()))
	}
	sub.Close()
	sub.Close()
	bus.Close()
}

func FuzzDecode(f *testing.F) {
	e := sampleEvent()
	f.Add(encode(f, &e))
	e.Kind, e.Tuple.Family = kindOpen, afInet
	f.Add(encode(f, &e))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, raw []byte) {
		var d decoder
		d.boot = func(ns uint64) time.Time { return time.Unix(0, int64(ns)) }
		e, err := d.record(raw)
		if err != nil {
			return
		}
		c := d.conn(e)
		if c.Local.Port() != e.Tuple.Lport || c.Remote.Port() != e.Tuple.Rport || c.ID != e.FlowId {
			t.Fatalf("fields lost: %+v from %+v", c, e)
		}
		if e.Tuple.Family == afInet && !c.Local.Addr().Is4() {
			t.Fatalf("IPv4 record decoded as %v", c.Local)
		}
		st := counters(&e.Counts, e.RstSent, e.RstReceived)
		if st.BytesSent != e.Counts.BytesSent || st.SRTT < 0 {
			t.Fatalf("stats %+v from %+v", st, e.Counts)
		}
	})
}

// BenchmarkHandle measures decode and dispatch of ring-buffer records to a
// subscriber that receives every one of them (the benchmark waits for room
// in the channel rather than let events drop). With -cpu 1 the consumer
// shares the one core, so events/s is the whole pipeline's rate on a core.
func BenchmarkHandle(b *testing.B) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	sub, _ := probe.Subscribe[ConnClosed](bus, 4096)
	done := make(chan int)
	go func() {
		n := 0
		for range sub.C() {
			n++
		}
		done <- n
	}()
	e := sampleEvent()
	raw := encode(b, &e)
	b.ReportAllocs()
	for b.Loop() {
		for len(sub.C()) == cap(sub.C()) {
			runtime.Gosched()
		}
		a.handle(raw)
	}
	b.StopTimer()
	bus.Close()
	if n := <-done; n != b.N || sub.Dropped() != 0 {
		b.Fatalf("delivered %d of %d, dropped %d", n, b.N, sub.Dropped())
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds()/1e6, "Mevents/s")
}

// BenchmarkDecode is the decode alone: record bytes to a typed event.
func BenchmarkDecode(b *testing.B) {
	var d decoder
	d.boot = func(ns uint64) time.Time { return time.Unix(0, int64(ns)) }
	e := sampleEvent()
	raw := encode(b, &e)
	b.ReportAllocs()
	var sink ConnClosed
	for b.Loop() {
		ev, _ := d.record(raw)
		sink = ConnClosed{Time: d.boot(ev.TsNs), Conn: d.conn(ev), Counters: counters(&ev.Counts, ev.RstSent, ev.RstReceived)}
	}
	_ = sink
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds()/1e6, "Mevents/s")
}

func TestRecentlyClosed(t *testing.T) {
	var r recentlyClosed
	t0 := time.Unix(1000, 0)
	a := tuple{7, netip.MustParseAddrPort("127.0.0.1:80"), netip.MustParseAddrPort("127.0.0.1:5000")}
	b := tuple{7, netip.MustParseAddrPort("127.0.0.1:81"), netip.MustParseAddrPort("127.0.0.1:5000")}
	r.add(a, probe.TCPConnInfo{Retransmits: 1}, t0)
	r.add(b, probe.TCPConnInfo{Retransmits: 2}, t0.Add(time.Second))
	if i, ok := r.find(7, netip.AddrPort{}, a.remote, t0.Add(2*time.Second)); !ok || i.Retransmits != 2 {
		t.Errorf("by peer: %+v %v, want the newest", i, ok)
	}
	if i, ok := r.find(7, a.local, a.remote, t0.Add(2*time.Second)); !ok || i.Retransmits != 1 {
		t.Errorf("by tuple: %+v %v", i, ok)
	}
	if _, ok := r.find(8, a.local, a.remote, t0.Add(2*time.Second)); ok {
		t.Error("found an entry of another network namespace")
	}
	if _, ok := r.find(7, a.local, a.remote, t0.Add(recentFor+time.Millisecond)); ok {
		t.Error("found an entry older than recentFor")
	}
	for i := range recentMax + 10 {
		r.add(a, probe.TCPConnInfo{}, t0.Add(time.Hour+time.Duration(i)))
	}
	if len(r.entries) != recentMax {
		t.Errorf("%d entries, bound %d", len(r.entries), recentMax)
	}
}

// BenchmarkHandleFunc is decode and dispatch to a function subscriber
// (flowmill.SubscribeFunc): no channel hand-off.
func BenchmarkHandleFunc(b *testing.B) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	var n int
	var bytes uint64
	sub, _ := probe.SubscribeFunc(bus, func(e *ConnClosed) { n++; bytes += e.BytesSent })
	e := sampleEvent()
	raw := encode(b, &e)
	b.ReportAllocs()
	for b.Loop() {
		a.handle(raw)
	}
	b.StopTimer()
	sub.Close()
	if n != b.N {
		b.Fatalf("delivered %d of %d", n, b.N)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds()/1e6, "Mevents/s")
}

// Records that do not decode are dropped and counted in Stats.Malformed;
// events the kernel could not read all of are delivered, saying what is
// missing, and counted in Stats.Incomplete.
func TestMalformedAndIncompleteCounted(t *testing.T) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	closed, _ := probe.Subscribe[ConnClosed](bus, 8)
	good := sampleEvent()
	raw := encode(t, &good)
	badKind, badFamily := good, good
	badKind.Kind = 9
	badFamily.Tuple.Family = 1
	for _, r := range [][]byte{raw[:len(raw)-1], {}, encode(t, &badKind), encode(t, &badFamily)} {
		a.handle(r)
	}
	a.handle(raw)
	if st := a.userStats(); st.Malformed != 4 || st.Incomplete != 0 || len(closed.C()) != 1 {
		t.Fatalf("after 4 malformed records and a good one: %+v, %d delivered", st, len(closed.C()))
	}
	<-closed.C()

	// The kernel could read neither the addresses nor the counters.
	partial := sampleEvent()
	partial.Missing = missingAddresses | missingCounters
	partial.Tuple = tcpBPFTcpTuple{}
	partial.Counts = tcpBPFTcpCounts{}
	a.handle(encode(t, &partial))
	if st := a.userStats(); st.Malformed != 4 || st.Incomplete != 1 || len(closed.C()) != 1 {
		t.Fatalf("after an incomplete record: %+v, %d delivered", st, len(closed.C()))
	}
	e := <-closed.C()
	if e.Missing != MissingAddresses|MissingCounters || e.Local.IsValid() || e.Remote.IsValid() || e.Missing.String() != "addresses|counters" {
		t.Errorf("incomplete event: missing %v, local %v, remote %v", e.Missing, e.Local, e.Remote)
	}
}
