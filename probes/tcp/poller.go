package tcp

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/sockdiag"
	"github.com/flowmill/flowmill/probes"
)

// tuple identifies a socket in one network namespace.
type tuple struct {
	local, remote netip.AddrPort
}

type openFlow struct {
	conn         Conn
	startNS      uint64
	baseAcked    uint64
	baseReceived uint64
	seq          uint64 // when it was opened, in poller.seq units
}

// poller sends ConnStats for open connections. It learns them from the
// ConnOpened/ConnClosed records and reads their counters from the kernel's
// tcp_info with a sock_diag dump: the same numbers ss -ti shows, read with
// no work per packet. Only connections in the session's own network
// namespace can be read this way.
type poller struct {
	netns uint32
	topic *probes.Topic[ConnStats]

	mu    sync.Mutex
	flows map[tuple]openFlow
	seq   uint64

	quit chan struct{}
	done chan struct{}
}

func newPoller(interval time.Duration, topic *probes.Topic[ConnStats]) (*poller, error) {
	ns, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return nil, err
	}
	p := &poller{
		netns: ns,
		topic: topic,
		flows: make(map[tuple]openFlow),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go p.run(interval)
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
	if e.Tuple.Netns != p.netns {
		return
	}
	p.mu.Lock()
	p.seq++
	p.flows[tuple{c.Local, c.Remote}] = openFlow{
		conn:         *c,
		startNS:      e.StartNs,
		baseAcked:    e.Counts.BytesSent,
		baseReceived: e.Counts.BytesReceived,
		seq:          p.seq,
	}
	p.mu.Unlock()
}

func (p *poller) close(c *Conn) {
	p.mu.Lock()
	if f, ok := p.flows[tuple{c.Local, c.Remote}]; ok && f.conn.ID == c.ID {
		delete(p.flows, tuple{c.Local, c.Remote})
	}
	p.mu.Unlock()
}

func (p *poller) stop() {
	close(p.quit)
	<-p.done
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
	if err := sockdiag.Dump(func(s *sockdiag.Socket) {
		if s.Info != nil {
			got = append(got, reading{tuple{s.Local, s.Remote}, s.State, *s.Info})
		}
	}); err != nil {
		return // transient; the next tick tries again
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
		if f.seq <= before && !seen[k] {
			delete(p.flows, k)
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

// countKeys counts the entries of a hash map.
func countKeys(m *ebpf.Map) (int, error) {
	var key, next uint64
	n := 0
	err := m.NextKey(nil, &next)
	for err == nil {
		n++
		key = next
		err = m.NextKey(&key, &next)
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return n, fmt.Errorf("counting flows: %w", err)
	}
	return n, nil
}
