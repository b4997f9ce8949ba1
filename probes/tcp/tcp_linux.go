package tcp

import (
	"fmt"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/probes"
)

// Counter slots (bpf/include/flowmill.h, bpf/tcp.c).
const (
	ctrLost = iota
	ctrFlowNew
	ctrFlowDone
	ctrListenerFull
	nCounters
)

// Attach loads and attaches the probe. It is called by flowmill.Start.
func (p *Probe) Attach(env *probes.Env) (probes.Attachment, error) {
	if p.maxFlows == 0 {
		return nil, fmt.Errorf("tcp: WithMaxFlows must be positive")
	}
	spec, err := loadTcpBPF()
	if err != nil {
		return nil, err
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	spec.Maps["flows"].MaxEntries = p.maxFlows
	floor, err := bpfload.EvictionFloor(p.maxFlows)
	if err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	a := &attachment{
		dec:        decoder{boot: env.BootTime},
		opened:     probes.Produce[ConnOpened](env.Bus),
		closed:     probes.Produce[ConnClosed](env.Bus),
		stats:      probes.Produce[ConnStats](env.Bus),
		evictFloor: floor,
	}
	if err := bpfload.Load(spec, env, &a.objs, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	if err := seedListeners(a.objs.Listeners, env.Scope); err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("tcp: finding existing listening sockets: %w", err)
	}
	a.links, err = bpfload.AttachRawTracepoints(
		// Resets and destruction first, so no flow created by
		// inet_sock_set_state misses them.
		bpfload.RawTracepoint{Name: "tcp_send_reset", Program: a.objs.OnSendReset},
		bpfload.RawTracepoint{Name: "tcp_receive_reset", Program: a.objs.OnReceiveReset},
		bpfload.RawTracepoint{Name: "tcp_destroy_sock", Program: a.objs.OnDestroySock},
		bpfload.RawTracepoint{Name: "inet_sock_set_state", Program: a.objs.OnSetState},
	)
	if err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	if a.poller, err = newPoller(p.interval, a.stats, env.Sync); err != nil {
		a.Close()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	probes.Provide[probes.TCPConns](env.Bus, a.poller)
	return a, nil
}

type attachment struct {
	objs   tcpBPFObjects
	links  []link.Link
	dec    decoder
	poller *poller

	opened *probes.Topic[ConnOpened]
	closed *probes.Topic[ConnClosed]
	stats  *probes.Topic[ConnStats]

	statsMu    sync.Mutex
	evicted    uint64 // highest eviction count reported, so it never goes back
	evictFloor int64  // below this many live flows the LRU cannot have evicted
}

func (a *attachment) Rings() []probes.Ring {
	return []probes.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

// handle decodes one record and publishes it. Malformed records cannot come
// from our own programs; they are ignored.
func (a *attachment) handle(raw []byte) {
	e, err := a.dec.record(raw)
	if err != nil {
		return
	}
	switch e.Kind {
	case kindOpen:
		ev := ConnOpened{Time: a.dec.boot(e.TsNs), Conn: a.dec.conn(e)}
		a.poller.open(&ev.Conn, e)
		a.opened.Publish(&ev)
	case kindClose:
		ev := ConnClosed{
			Time:     a.dec.boot(e.TsNs),
			Conn:     a.dec.conn(e),
			Stats:    stats(&e.Counts, e.RstSent, e.RstReceived),
			Duration: time.Duration(e.TsNs - e.StartNs),
		}
		a.poller.close(&ev.Conn, e, &ev.Stats, ev.Time)
		a.closed.Publish(&ev)
	}
}

func (a *attachment) Stats() (probes.Stats, error) {
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probes.Stats{}, err
	}
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	// Every flow inserted is still in the map, removed by our programs, or
	// evicted by the LRU. Counting the map's entries costs a syscall per
	// entry, so it is done only when the map may be full enough to evict
	// (bpfload.EvictionFloor).
	inserted, removed := int64(c[ctrFlowNew]), int64(c[ctrFlowDone])
	if inserted-removed-int64(a.evicted) >= a.evictFloor {
		live, err := bpfload.CountKeys(a.objs.Flows)
		if err != nil {
			return probes.Stats{}, err
		}
		if n := inserted - removed - int64(live); n > int64(a.evicted) {
			a.evicted = uint64(n)
		}
	}
	return probes.Stats{Lost: c[ctrLost] + c[ctrListenerFull], Evicted: a.evicted, Missed: bpfload.Missed(&a.objs.tcpBPFPrograms)}, nil
}

func (a *attachment) Close() error {
	if a.poller != nil { // nil when Attach failed before it started
		a.poller.stop()
	}
	err := bpfload.CloseLinks(a.links)
	if cerr := a.objs.Close(); err == nil {
		err = cerr
	}
	return err
}
