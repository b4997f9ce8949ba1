package tcp

import (
	"fmt"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/sockdiag"
	"github.com/flowmill/flowmill/probes"
)

// tuple identifies a socket in one network namespace.
type tuple struct {
	netns         uint32
	local, remote netip.AddrPort
}

type openFlow struct {
	conn         Conn
	startNS      uint64
	baseAcked    uint64
	baseReceived uint64
	seq          uint64 // when it was opened, in poller.seq units
}

// poller keeps the open connections, learnt from the ConnOpened/ConnClosed
// records, and, with a stats interval, sends their ConnStats: it reads
// their counters from the kernel's tcp_info with a sock_diag dump per
// network namespace, the same numbers ss -ti shows, with no work per
// packet. It also answers other families' questions about connections of
// the session's own namespace (probes.TCPConns).
type poller struct {
	netns uint32
	topic *probes.Topic[ConnStats]
	sync  func() // catches up with the session's rings; nil in tests

	mu     sync.Mutex
	flows  map[tuple]openFlow
	byPeer map[netip.AddrPort]tuple // the open flows, by remote address
	recent recentlyClosed
	seq    uint64

	dumpMu   sync.Mutex
	dumped   map[netip.AddrPort]probes.TCPConnInfo // the last dump, by remote address
	dumpedAt time.Time

	quit chan struct{}
	done chan struct{}
}

// newPoller starts the poller; interval 0 sends no ConnStats. sync is the
// session's probes.Env.Sync.
func newPoller(interval time.Duration, topic *probes.Topic[ConnStats], sync func()) (*poller, error) {
	ns, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	p := &poller{
		netns:  ns,
		topic:  topic,
		sync:   sync,
		flows:  make(map[tuple]openFlow),
		byPeer: make(map[netip.AddrPort]tuple),
		dumped: make(map[netip.AddrPort]probes.TCPConnInfo),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if interval > 0 {
		go p.run(interval)
	} else {
		close(p.done)
	}
	return p, nil
}

func netnsInode(path string) (uint32, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("reading network namespace: %w", err)
	}
	return uint32(fi.Sys().(*syscall.Stat_t).Ino), nil
}

func (p *poller) open(c *Conn, e *tcpBPFTcpEvent) {
	k := tuple{e.Tuple.Netns, c.Local, c.Remote}
	p.mu.Lock()
	p.seq++
	if k.netns == p.netns {
		p.byPeer[c.Remote] = k
	}
	p.flows[k] = openFlow{
		conn:         *c,
		startNS:      e.StartNs,
		baseAcked:    e.Counts.BytesSent,
		baseReceived: e.Counts.BytesReceived,
		seq:          p.seq,
	}
	p.mu.Unlock()
}

func (p *poller) close(c *Conn, e *tcpBPFTcpEvent, st *Stats, at time.Time) {
	k := tuple{e.Tuple.Netns, c.Local, c.Remote}
	p.mu.Lock()
	if f, ok := p.flows[k]; ok && f.conn.ID == c.ID {
		p.forget(k)
		p.recent.add(k, connInfo(st), at)
	}
	p.mu.Unlock()
}

// forget removes an open flow; p.mu is held.
func (p *poller) forget(k tuple) {
	delete(p.flows, k)
	if p.byPeer[k.remote] == k {
		delete(p.byPeer, k.remote)
	}
}

func (p *poller) stop() {
	close(p.quit)
	<-p.done
}

// TCPConn implements probes.TCPConns: the counters of a connection now, or
// its final ones if it closed within the last recentFor. A zero local
// address matches any connection to remote.
func (p *poller) TCPConn(local, remote netip.AddrPort) (probes.TCPConnInfo, bool) {
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
	return probes.TCPConnInfo{}, false
}

// lookup answers from the sockets the probe knows: the kernel's counters of
// an open one, the final counters of one closed within recentFor.
func (p *poller) lookup(local, remote netip.AddrPort) (probes.TCPConnInfo, bool) {
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
	return p.recent.find(p.netns, local, remote, time.Now())
}

// fromDump finds an established connection by its remote address in a dump
// of the namespace's sockets. Dumps are rate-limited to one per dumpEvery;
// a caller may wait that long.
func (p *poller) fromDump(remote netip.AddrPort) (probes.TCPConnInfo, bool) {
	p.dumpMu.Lock()
	defer p.dumpMu.Unlock()
	if info, ok := p.dumped[remote]; ok {
		return info, true
	}
	// The last dump may predate the connection: take a new one, waiting
	// for the rate limit rather than answer from a stale dump.
	if wait := dumpEvery - time.Since(p.dumpedAt); wait > 0 {
		time.Sleep(wait)
	}
	clear(p.dumped)
	p.dumpedAt = time.Now()
	err := sockdiag.Dump(func(s *sockdiag.Socket) {
		if s.Info != nil && s.State == sockdiag.StateEstablished && len(p.dumped) < maxDumped {
			p.dumped[s.Remote] = infoOf(s.Info)
		}
	})
	if err != nil {
		return probes.TCPConnInfo{}, false
	}
	info, ok := p.dumped[remote]
	return info, ok
}

const (
	dumpEvery = 20 * time.Millisecond
	maxDumped = 1 << 16
)

func infoOf(ti *unix.TCPInfo) probes.TCPConnInfo {
	return probes.TCPConnInfo{
		SRTT:        usec(ti.Rtt),
		RTTVar:      usec(ti.Rttvar),
		MinRTT:      usec(ti.Min_rtt),
		Retransmits: ti.Total_retrans,
		SegmentsOut: ti.Segs_out,
		SegmentsIn:  ti.Segs_in,
	}
}

func connInfo(st *Stats) probes.TCPConnInfo {
	return probes.TCPConnInfo{
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
	info probes.TCPConnInfo
	at   time.Time
}

const (
	recentFor = 10 * time.Second
	recentMax = 4096
)

func (r *recentlyClosed) add(k tuple, info probes.TCPConnInfo, at time.Time) {
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

func (r *recentlyClosed) find(netns uint32, local, remote netip.AddrPort, now time.Time) (probes.TCPConnInfo, bool) {
	r.prune(now)
	for i := len(r.entries) - 1; i >= 0; i-- {
		e := &r.entries[i]
		if e.k.netns == netns && e.k.remote == remote && (!local.IsValid() || e.k.local == local) {
			return e.info, true
		}
	}
	return probes.TCPConnInfo{}, false
}

func (p *poller) run(interval time.Duration) {
	defer close(p.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-p.quit:
			return
		case <-t.C:
			p.report()
		}
	}
}

// namespaces returns, for each network namespace with open flows, a path
// to enter it: "" for the session's own, else /proc/PID/ns/net of a flow's
// owner that is still in it. A namespace none of whose owners can be found
// is left out (its flows are dropped by report as gone).
func (p *poller) namespaces() map[uint32]string {
	p.mu.Lock()
	owners := map[uint32][]uint32{}
	for k, f := range p.flows {
		if k.netns != p.netns && len(owners[k.netns]) < 4 {
			owners[k.netns] = append(owners[k.netns], f.conn.PID)
		}
	}
	p.mu.Unlock()
	out := map[uint32]string{p.netns: ""}
	for netns, pids := range owners {
		for _, pid := range pids {
			path := fmt.Sprintf("/proc/%d/ns/net", pid)
			if ino, err := netnsInode(path); err == nil && ino == netns {
				out[netns] = path
				break
			}
		}
	}
	return out
}

// report reads tcp_info for every socket and publishes the open flows'.
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
	}
	var got []reading // read without the lock: a dump can take a while
	spaces := p.namespaces()
	for netns, path := range spaces {
		err := sockdiag.DumpIn(path, func(s *sockdiag.Socket) {
			if s.Info != nil {
				got = append(got, reading{tuple{netns, s.Local, s.Remote}, s.State, *s.Info})
			}
		})
		if err != nil {
			return // transient; the next tick tries again
		}
	}
	now, mono := time.Now(), kclock.Now()

	p.mu.Lock()
	defer p.mu.Unlock()
	seen := make(map[tuple]bool, len(p.flows))
	for i := range got {
		r := &got[i]
		f, ok := p.flows[r.k]
		if !ok {
			continue
		}
		seen[r.k] = true
		ev := ConnStats{
			Time:     now,
			Conn:     f.conn,
			Stats:    infoStats(&r.info, r.state, &f),
			Duration: time.Duration(mono - f.startNS),
		}
		p.topic.Publish(&ev)
	}
	// A flow opened before the dump and absent from it has gone without a
	// close record (its entry was evicted from the kernel's flow map).
	for k, f := range p.flows {
		if _, read := spaces[k.netns]; read && f.seq <= before && !seen[k] {
			p.forget(k)
		}
	}
}

// infoStats converts tcp_info into Stats counted like the kernel side does:
// from the values at establishment, without the FINs.
func infoStats(ti *unix.TCPInfo, state uint8, f *openFlow) Stats {
	sent := ti.Bytes_acked - f.baseAcked
	if state == sockdiag.StateFinWait2 && sent > 0 { // our FIN was acknowledged
		sent--
	}
	recv := ti.Bytes_received - f.baseReceived
	if (state == sockdiag.StateCloseWait || state == sockdiag.StateLastAck || state == sockdiag.StateClosing) && recv > 0 {
		recv-- // the peer's FIN was received
	}
	return Stats{
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
