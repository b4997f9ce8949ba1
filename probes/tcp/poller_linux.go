package tcp

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/sockdiag"
)

// tuple identifies a socket in one network namespace.
type tuple struct {
	netns         uint32
	local, remote netip.AddrPort
}

type openFlow struct {
	conn         Conn
	k            tuple // meaningless with MissingAddresses
	startNS      uint64
	baseAcked    uint64
	baseReceived uint64
	seq          uint64 // when it was opened, in poller.seq units
}

// poller keeps the open connections, learnt from the ConnOpened/ConnClosed
// records on the ring's goroutine, and, with a stats interval, sends their
// ConnStats from a goroutine of its own: it reads their counters from the
// kernel's tcp_info with a sock_diag dump per network namespace, the same
// numbers ss -ti shows, with no work per packet. It also answers other
// families' questions about connections of the session's own namespace
// (probe.TCPConns), and tells the exporter which connections are open
// (openConns, for tcp.active).
//
// Its table of open flows is bounded: a flow the kernel evicted from its
// own table sends no close record, so the table is reconciled with the
// kernel's (sweep) when it outgrows it, and when evictions are counted.
type poller struct {
	netns   uint32
	topic   *probe.Topic[ConnStats]
	sync    func()       // catches up with the session's rings; nil in tests
	sweep   func() error // forgets the flows the kernel evicted; nil in tests
	maxOpen int          // the kernel's flow table size

	// Replaced by tests.
	dumpIn func(netns string, fn func(*sockdiag.Socket)) error
	now    func() time.Time

	pollsFailed atomic.Uint64 // namespaces a report could not read

	// pubMu is held while ConnStats are published and while a close is
	// handled, so that no ConnStats of a flow follows its ConnClosed. A
	// ConnStats subscriber must therefore not wait for the ring reader.
	pubMu sync.Mutex

	mu      sync.Mutex
	flows   map[uint64]*openFlow     // by Conn.ID
	byTuple map[tuple]uint64         // the open flows with addresses
	byPeer  map[netip.AddrPort]tuple // the open flows, by remote address
	recent  recentlyClosed
	seq     uint64

	dumpMu   sync.Mutex
	dumped   map[netip.AddrPort]probe.TCPConnInfo // the last dump, by remote address
	dumpedAt time.Time

	wake chan struct{} // a sweep is wanted
	quit chan struct{}
	done chan struct{}
}

// newPoller returns a poller that is not running; interval 0 sends no
// ConnStats. sync is the session's probe.Env.Sync, maxOpen the size of the
// kernel's flow table.
func newPoller(topic *probe.Topic[ConnStats], sync func(), maxOpen int) (*poller, error) {
	ns, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	return &poller{
		netns:   ns,
		topic:   topic,
		sync:    sync,
		maxOpen: maxOpen,
		dumpIn:  sockdiag.DumpIn,
		now:     time.Now,
		flows:   make(map[uint64]*openFlow),
		byTuple: make(map[tuple]uint64),
		byPeer:  make(map[netip.AddrPort]tuple),
		dumped:  make(map[netip.AddrPort]probe.TCPConnInfo),
		wake:    make(chan struct{}, 1),
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
	}, nil
}

// start runs the poller's goroutine: reports every interval (none if 0)
// and sweeps when asked.
func (p *poller) start(interval time.Duration) {
	go p.run(interval)
}

func netnsInode(path string) (uint32, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("reading network namespace: %w", err)
	}
	return uint32(fi.Sys().(*syscall.Stat_t).Ino), nil
}

// open records an established flow; on the ring's goroutine.
func (p *poller) open(c *Conn, e *tcpBPFTcpEvent) {
	f := &openFlow{
		conn:         *c,
		k:            tuple{e.Tuple.Netns, c.Local, c.Remote},
		startNS:      e.StartNs,
		baseAcked:    e.Counts.BytesSent,
		baseReceived: e.Counts.BytesReceived,
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.flows) >= p.maxOpen {
		// More than the kernel can hold: some were evicted there.
		select {
		case p.wake <- struct{}{}:
		default:
		}
		if len(p.flows) >= 2*p.maxOpen {
			p.keepNewest(p.maxOpen) // the sweep has not caught up
		}
	}
	p.seq++
	f.seq = p.seq
	p.flows[c.ID] = f
	if c.Missing&MissingAddresses == 0 {
		p.byTuple[f.k] = c.ID
		if f.k.netns == p.netns {
			p.byPeer[c.Remote] = f.k
		}
	}
}

// closed records the end of a flow; on the ring's goroutine, before its
// ConnClosed is published, with p.pubMu held (see handle).
func (p *poller) closed(e *ConnClosed, netns uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if f, ok := p.flows[e.ID]; ok {
		p.forget(f)
	}
	if e.Missing == 0 {
		p.recent.add(tuple{netns, e.Local, e.Remote}, connInfo(&e.Counters), e.Time)
	}
}

// forget removes an open flow; p.mu is held.
func (p *poller) forget(f *openFlow) {
	delete(p.flows, f.conn.ID)
	if p.byTuple[f.k] == f.conn.ID {
		delete(p.byTuple, f.k)
		if p.byPeer[f.k.remote] == f.k {
			delete(p.byPeer, f.k.remote)
		}
	}
}

// keepNewest forgets all but the n most recently opened flows, the likeliest
// to be still in the kernel's table (its LRU evicts the idle ones first).
// It sorts the table, once per n opens at most. p.mu is held.
func (p *poller) keepNewest(n int) {
	seqs := make([]uint64, 0, len(p.flows))
	for _, f := range p.flows {
		seqs = append(seqs, f.seq)
	}
	slices.Sort(seqs)
	cut := seqs[len(seqs)-n]
	for _, f := range p.flows {
		if f.seq < cut {
			p.forget(f)
		}
	}
}

// mark returns the poller's clock, for reconcile.
func (p *poller) mark() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seq
}

// reconcile forgets the flows opened before mark that the kernel no longer
// has (live reports which it has): their socket closed unseen, after the
// kernel evicted them from its table.
func (p *poller) reconcile(mark uint64, live func(id uint64) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.flows {
		if f.seq <= mark && !live(f.conn.ID) {
			p.forget(f)
		}
	}
}

// eachOpen implements openConns.
func (p *poller) eachOpen(fn func(*Conn)) error {
	if p.sync != nil {
		p.sync()
	}
	if p.sweep != nil {
		if err := p.sweep(); err != nil {
			return err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.flows {
		fn(&f.conn)
	}
	return nil
}

// stop ends the poller's goroutine and forgets every flow: with the
// session over, none is known to be open.
func (p *poller) stop() {
	close(p.quit)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.flows)
	clear(p.byTuple)
	clear(p.byPeer)
}

// TCPConn implements probe.TCPConns: the counters of a connection now, or
// its final ones if it closed within the last recentFor. A zero local
// address matches any connection to remote.
func (p *poller) TCPConn(local, remote netip.AddrPort) (probe.TCPConnInfo, bool) {
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	if info, ok := p.lookup(local, remote); ok {
		return info, true
	}
	// The record of a connection opened or closed moments ago may still be
	// waiting in the ring buffer: catch up, then look again.
	if p.sync != nil {
		p.sync()
		if info, ok := p.lookup(local, remote); ok {
			return info, true
		}
	}
	if !local.IsValid() {
		return p.fromDump(remote) // opened before the session started
	}
	return probe.TCPConnInfo{}, false
}

// TCPConnBatch implements probe.TCPConns: TCPConn for every query, from one
// sock_diag dump of the session's namespace for all of them (which also
// finds connections opened before the session, or so recently that their
// record is still in the ring buffer), without the dump rate limit's wait.
// A query by remote alone takes the connection the probe saw open to it,
// else an established one. Connections not in the dump are looked up among
// those closed within recentFor, after one Sync when some are missing (a
// close record may still be in the ring buffer).
func (p *poller) TCPConnBatch(qs []probe.TCPConnQuery) error {
	unmap := func(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) }
	byRemote := make(map[netip.AddrPort][]int, len(qs))
	for i := range qs {
		q := &qs[i]
		q.Info, q.OK = probe.TCPConnInfo{}, false
		if !q.Remote.IsValid() {
			continue
		}
		q.Local, q.Remote = unmap(q.Local), unmap(q.Remote)
		byRemote[q.Remote] = append(byRemote[q.Remote], i)
	}
	if len(byRemote) == 0 {
		return nil
	}
	want := make([]netip.AddrPort, len(qs)) // the local address sought, if known
	established := make([]bool, len(qs))    // the answer so far is an established socket
	p.mu.Lock()
	for i := range qs {
		if want[i] = qs[i].Local; !want[i].IsValid() {
			want[i] = p.byPeer[qs[i].Remote].local
		}
	}
	p.mu.Unlock()
	err := sockdiag.Dump(func(s *sockdiag.Socket) {
		if s.Info == nil {
			return
		}
		for _, i := range byRemote[s.Remote] {
			est := s.State == sockdiag.StateEstablished
			switch {
			case want[i].IsValid():
				if s.Local != want[i] {
					continue
				}
			case established[i], qs[i].OK && !est:
				continue // the first established socket, else the first
			}
			qs[i].Info, qs[i].OK, established[i] = infoOf(s.Info), true, est
		}
	})
	recent := func() (missing bool) {
		now := time.Now()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, is := range byRemote {
			for _, i := range is {
				if q := &qs[i]; !q.OK {
					q.Info, q.OK = p.recent.find(p.netns, q.Local, q.Remote, now)
					missing = missing || !q.OK
				}
			}
		}
		return missing
	}
	if recent() && p.sync != nil {
		p.sync()
		recent()
	}
	if err != nil {
		return fmt.Errorf("tcp: reading the connections of the session's network namespace: %w", err)
	}
	return nil
}

// lookup answers from the sockets the probe knows: the kernel's counters of
// an open one, the final counters of one closed within recentFor.
func (p *poller) lookup(local, remote netip.AddrPort) (probe.TCPConnInfo, bool) {
	k, ok := tuple{p.netns, local, remote}, true
	if !local.IsValid() {
		p.mu.Lock()
		k, ok = p.byPeer[remote]
		p.mu.Unlock()
	}
	if ok {
		if s, err := sockdiag.Get(k.local, k.remote); err == nil {
			return infoOf(s.Info), true
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.recent.find(p.netns, local, remote, p.now())
}

// fromDump finds an established connection by its remote address in a dump
// of the namespace's sockets no older than dumpMaxAge. Dumps are
// rate-limited to one per dumpEvery; a caller may wait that long.
func (p *poller) fromDump(remote netip.AddrPort) (probe.TCPConnInfo, bool) {
	p.dumpMu.Lock()
	defer p.dumpMu.Unlock()
	age := p.now().Sub(p.dumpedAt)
	if info, ok := p.dumped[remote]; ok && age <= dumpMaxAge {
		return info, true
	}
	// The last dump is stale or may predate the connection: take a new
	// one, waiting for the rate limit rather than answer from the old.
	if wait := dumpEvery - age; wait > 0 {
		time.Sleep(wait)
	}
	clear(p.dumped)
	p.dumpedAt = p.now()
	err := p.dumpIn("", func(s *sockdiag.Socket) {
		if s.Info != nil && s.State == sockdiag.StateEstablished && len(p.dumped) < maxDumped {
			p.dumped[s.Remote] = infoOf(s.Info)
		}
	})
	if err != nil {
		return probe.TCPConnInfo{}, false
	}
	info, ok := p.dumped[remote]
	return info, ok
}

const (
	dumpEvery = 20 * time.Millisecond
	// dumpMaxAge is how long fromDump answers from a dump: the counters
	// it gives are at most that old.
	dumpMaxAge = time.Second
	maxDumped  = 1 << 16
)

func infoOf(ti *unix.TCPInfo) probe.TCPConnInfo {
	return probe.TCPConnInfo{
		SRTT:        usec(ti.Rtt),
		RTTVar:      usec(ti.Rttvar),
		MinRTT:      usec(ti.Min_rtt),
		Retransmits: ti.Total_retrans,
		SegmentsOut: ti.Segs_out,
		SegmentsIn:  ti.Segs_in,
	}
}

func connInfo(st *Counters) probe.TCPConnInfo {
	return probe.TCPConnInfo{
		SRTT: st.SRTT, RTTVar: st.RTTVar, MinRTT: st.MinRTT,
		Retransmits: st.Retransmits, SegmentsOut: st.SegmentsOut, SegmentsIn: st.SegmentsIn,
	}
}

// recentlyClosed remembers the final counters of connections that closed in
// the last recentFor, so that a family asking just after the close (an HTTP
// request answered with Connection: close) still gets them. Bounded.
type recentlyClosed struct {
	entries []closedFlow // oldest first
}

type closedFlow struct {
	k    tuple
	info probe.TCPConnInfo
	at   time.Time
}

const (
	recentFor = 10 * time.Second
	recentMax = 4096
)

func (r *recentlyClosed) add(k tuple, info probe.TCPConnInfo, at time.Time) {
	r.prune(at)
	if len(r.entries) == recentMax {
		r.entries = r.entries[1:]
	}
	r.entries = append(r.entries, closedFlow{k, info, at})
}

func (r *recentlyClosed) prune(now time.Time) {
	i := 0
	for i < len(r.entries) && now.Sub(r.entries[i].at) > recentFor {
		i++
	}
	r.entries = r.entries[i:]
}

func (r *recentlyClosed) find(netns uint32, local, remote netip.AddrPort, now time.Time) (probe.TCPConnInfo, bool) {
	r.prune(now)
	for i := len(r.entries) - 1; i >= 0; i-- {
		e := &r.entries[i]
		if e.k.netns == netns && e.k.remote == remote && (!local.IsValid() || e.k.local == local) {
			return e.info, true
		}
	}
	return probe.TCPConnInfo{}, false
}

func (p *poller) run(interval time.Duration) {
	defer close(p.done)
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-p.quit:
			return
		case <-tick:
			p.report()
		case <-p.wake:
			if p.sweep != nil {
				_ = p.sweep() // if it fails, the table stays bounded (untracked)
			}
		}
	}
}

// namespaces returns, for each network namespace with open flows, a path
// to enter it: "" for the session's own, else /proc/PID/ns/net of a flow's
// owner that is still in it. A namespace none of whose owners can be found
// (they moved, or exited leaving their sockets to others) is left out, and
// counted in missed.
func (p *poller) namespaces() (paths map[uint32]string, missed int) {
	p.mu.Lock()
	owners := map[uint32][]uint32{}
	for k := range p.byTuple {
		if k.netns != p.netns && len(owners[k.netns]) < 4 {
			owners[k.netns] = append(owners[k.netns], p.flows[p.byTuple[k]].conn.PID)
		}
	}
	p.mu.Unlock()
	paths = map[uint32]string{p.netns: ""}
	for netns, pids := range owners {
		for _, pid := range pids {
			path := fmt.Sprintf("/proc/%d/ns/net", pid)
			if ino, err := netnsInode(path); err == nil && ino == netns {
				paths[netns] = path
				break
			}
		}
		if _, ok := paths[netns]; !ok {
			missed++
		}
	}
	return paths, missed
}

// report reads tcp_info for every socket of the namespaces with open flows
// and publishes the open flows' ConnStats. A namespace that cannot be read
// (entering it needs CAP_SYS_ADMIN, opening another user's process's
// /proc/PID/ns/net CAP_SYS_PTRACE; or it vanished) is skipped and counted
// in Stats.PollsFailed: its flows get no ConnStats this round.
func (p *poller) report() {
	p.mu.Lock()
	n, before := len(p.flows), p.seq
	p.mu.Unlock()
	if n == 0 {
		return
	}
	type reading struct {
		k     tuple
		state uint8
		info  unix.TCPInfo
		n     int // bytes of info the kernel filled
	}
	var got []reading // read without the lock: a dump can take a while
	paths, missed := p.namespaces()
	p.pollsFailed.Add(uint64(missed))
	read := make(map[uint32]bool, len(paths))
	for netns, path := range paths {
		mark := len(got)
		err := p.dumpIn(path, func(s *sockdiag.Socket) {
			if s.Info != nil {
				got = append(got, reading{tuple{netns, s.Local, s.Remote}, s.State, *s.Info, s.InfoLen})
			}
		})
		if err != nil {
			got = got[:mark] // what it read before failing is not the whole namespace
			p.pollsFailed.Add(1)
			continue
		}
		read[netns] = true
	}
	now, mono := p.now(), kclock.Now()

	p.mu.Lock()
	events := make([]ConnStats, 0, len(got))
	seen := make(map[uint64]bool, len(p.flows))
	for i := range got {
		r := &got[i]
		id, ok := p.byTuple[r.k]
		if !ok {
			continue
		}
		f := p.flows[id]
		seen[id] = true
		ev := ConnStats{
			Time:     now,
			Conn:     f.conn,
			Counters: infoCounters(&r.info, r.n, r.state, f),
			Duration: time.Duration(mono - f.startNS),
		}
		events = append(events, ev)
	}
	// A flow opened before the dump and absent from it has gone without a
	// close record (its entry was evicted from the kernel's flow table).
	for id, f := range p.flows {
		if f.conn.Missing&MissingAddresses == 0 && read[f.k.netns] && f.seq <= before && !seen[id] {
			p.forget(f)
		}
	}
	p.mu.Unlock()

	// Published without p.mu (a subscriber function may ask TCPConn), but
	// with pubMu, and only for flows still open: a close handled
	// meanwhile has already published its ConnClosed.
	p.pubMu.Lock()
	defer p.pubMu.Unlock()
	for i := range events {
		p.mu.Lock()
		_, open := p.flows[events[i].ID]
		p.mu.Unlock()
		if open {
			p.topic.Publish(&events[i])
		}
	}
}

// infoCounters converts tcp_info (n bytes of it filled) into Counters
// counted like the kernel side does: from the values at establishment,
// without the FINs. A flow whose values at establishment are unknown gets
// none.
//
// The state comes from the dump, which reads it before it locks the socket
// for tcp_info: a FIN can arrive, or ours be acknowledged, in between. Our
// FIN is caught anyway: payload acknowledged can never exceed payload first
// transmitted (tcpi_bytes_sent less tcpi_bytes_retrans, both locked
// readings, none at establishment but TCP Fast Open's), and a FIN, unlike
// payload, is in neither. The peer's FIN, in that window, is not: nothing
// tcp_info reads under the lock tells it apart from a byte of payload.
func infoCounters(ti *unix.TCPInfo, n int, state uint8, f *openFlow) Counters {
	if f.conn.Missing&MissingCounters != 0 {
		return Counters{}
	}
	sent := ti.Bytes_acked - f.baseAcked
	if state == sockdiag.StateFinWait2 && sent > 0 { // our FIN was acknowledged
		sent--
	}
	if n >= int(unsafe.Offsetof(ti.Bytes_retrans)+unsafe.Sizeof(ti.Bytes_retrans)) && ti.Bytes_sent >= ti.Bytes_retrans {
		sent = min(sent, ti.Bytes_sent-ti.Bytes_retrans)
	}
	recv := ti.Bytes_received - f.baseReceived
	if (state == sockdiag.StateCloseWait || state == sockdiag.StateLastAck || state == sockdiag.StateClosing) && recv > 0 {
		recv-- // the peer's FIN was received
	}
	return Counters{
		BytesSent:     sent,
		BytesReceived: recv,
		SegmentsOut:   ti.Segs_out,
		SegmentsIn:    ti.Segs_in,
		Retransmits:   ti.Total_retrans,
		SRTT:          usec(ti.Rtt),
		RTTVar:        usec(ti.Rttvar),
		MinRTT:        usec(ti.Min_rtt),
	}
}
