package tcp

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/probe"
)

// Counter slots (bpf/include/flowmill.h, bpf/tcp.c).
const (
	ctrLost = iota
	ctrFlowNew
	ctrFlowDone
	ctrListenerLost
	ctrListenerUnresolved
	ctrFlowFull
	nCounters
)

// Attach loads and attaches the probe. It is called by flowmill.Start.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
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
		opened:     probe.Produce[ConnOpened](env.Bus),
		closed:     probe.Produce[ConnClosed](env.Bus),
		stats:      probe.Produce[ConnStats](env.Bus),
		evictFloor: floor,
	}
	if err := bpfload.Load(spec, env, &a.objs, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	a.links, err = bpfload.AttachRawTracepoints(
		// Resets and destruction first, so no flow created by
		// inet_sock_set_state misses them.
		bpfload.RawTracepoint{Name: "tcp_send_reset", Program: a.objs.OnSendReset},
		bpfload.RawTracepoint{Name: "tcp_receive_reset", Program: a.objs.OnReceiveReset},
		// Destruction and transitions twice (FM_TWICE in
		// bpf/include/flowmill.h): a hit the kernel skips in one is
		// seen by the other.
		bpfload.RawTracepoint{Name: "tcp_destroy_sock", Program: a.objs.OnDestroySock},
		bpfload.RawTracepoint{Name: "tcp_destroy_sock", Program: a.objs.OnDestroySockAgain},
		bpfload.RawTracepoint{Name: "inet_sock_set_state", Program: a.objs.OnSetState},
		bpfload.RawTracepoint{Name: "inet_sock_set_state", Program: a.objs.OnSetStateAgain},
	)
	if err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	// Listeners from before the hooks: after attaching, so that none
	// starts unseen in between.
	unread, full, err := seedListeners(a.objs.SeededListeners, env.Scope)
	if err != nil {
		a.Close()
		return nil, fmt.Errorf("tcp: finding existing listening sockets: %w", err)
	}
	a.seedLost = full
	if a.poller, err = newPoller(a.stats, env.Sync, int(p.maxFlows)); err != nil {
		a.Close()
		return nil, fmt.Errorf("tcp: %w", err)
	}
	a.poller.pollsFailed.Add(unread)
	a.poller.sweep = a.sweep
	a.poller.start(p.interval)
	probe.Provide[probe.TCPConns](env.Bus, a.poller)
	probe.Provide[openConns](env.Bus, a.poller)
	return a, nil
}

type attachment struct {
	objs   tcpBPFObjects
	links  []link.Link
	dec    decoder
	poller *poller

	opened *probe.Topic[ConnOpened]
	closed *probe.Topic[ConnClosed]
	stats  *probe.Topic[ConnStats]

	closing  atomic.Bool // Close has begun: the kernel's maps go away
	seedLost uint64      // listeners from before Attach not recorded: map full

	// Counted by handle, on the ring's goroutine.
	malformed  atomic.Uint64 // records that did not decode
	incomplete atomic.Uint64 // events published with parts missing

	statsMu    sync.Mutex
	evicted    uint64   // highest eviction count reported, so it never goes back
	evictFloor int64    // below this many live flows the LRU cannot have evicted
	live       []uint64 // scratch for sweep: the IDs in the kernel's table
	recount    bool     // the last sweep may have undercounted evictions
	sweptNew   uint64   // flows inserted before the last sweep
	sweptLive  int64    // flows the last sweep found in the table
}

// Rings returns the probe's one ring buffer.
func (a *attachment) Rings() []probe.Ring {
	return []probe.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

// handle decodes one record and publishes it. A record that does not
// decode (none of our programs writes one) is dropped and counted in
// Stats.Malformed; an event with parts missing is counted in
// Stats.Incomplete.
func (a *attachment) handle(raw []byte) {
	e, err := a.dec.record(raw)
	if err != nil {
		a.malformed.Add(1)
		return
	}
	if e.Missing != 0 {
		a.incomplete.Add(1)
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
			Counters: counters(&e.Counts, e.RstSent, e.RstReceived),
			Duration: time.Duration(e.TsNs - e.StartNs),
		}
		// No ConnStats of the flow is published after this (see
		// poller.pubMu).
		a.poller.pubMu.Lock()
		a.poller.closed(&ev, e.Tuple.Netns)
		a.poller.pubMu.Unlock()
		a.closed.Publish(&ev)
	}
}

// Stats reads the probe's loss counters: the kernel's and those of handle
// and the poller.
func (a *attachment) Stats() (probe.Stats, error) {
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
	}
	// Every flow inserted is still in the kernel's table, removed by our
	// programs, or evicted by its LRU. Walking the table is done only
	// when it may have evicted since the last walk: when it may have held
	// enough flows since then (bpfload.EvictionFloor: those it held then
	// and those inserted since), or when the last walk may have
	// undercounted. Whether it may is not told by how many it holds now:
	// flows it evicted a moment ago may all have closed since.
	a.statsMu.Lock()
	inserted := int64(c[ctrFlowNew] - a.sweptNew)
	walk := a.recount || (inserted > 0 && a.sweptLive+inserted >= a.evictFloor)
	a.statsMu.Unlock()
	if walk {
		if err := a.sweep(); err != nil {
			return probe.Stats{}, err
		}
	}
	st := a.userStats()
	st.Lost = c[ctrLost] + c[ctrListenerLost] + a.seedLost
	st.Unsupported = c[ctrListenerUnresolved]
	a.statsMu.Lock()
	st.Evicted = a.evicted + c[ctrFlowFull] // a flow the full table refused is one it evicted
	a.statsMu.Unlock()
	st.Missed = bpfload.Missed(&a.objs.tcpBPFPrograms)
	return st, nil
}

// sweep walks the kernel's flow table (in batches: a few system calls): it
// counts the flows its LRU evicted (those inserted, neither removed by our
// programs nor still there), and makes the poller forget the open flows
// that are no longer there: evicted, their close is never reported.
func (a *attachment) sweep() error {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	if a.closing.Load() {
		return nil // the session is over: nothing is open
	}
	// Insertions counted before the walk, removals after: a flow that
	// comes or goes during the walk is not taken for an eviction.
	before, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return err
	}
	mark := a.poller.mark() // flows opened later may be missing from the walk
	live := a.live[:0]
	err = bpfload.Walk(a.objs.Flows, func(_ []uint64, flows []tcpBPFFlow) error {
		for i := range flows {
			live = append(live, flows[i].Id)
		}
		return nil
	})
	a.live = live
	if err != nil {
		return err
	}
	after, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return err
	}
	if n := int64(before[ctrFlowNew]) - int64(after[ctrFlowDone]) - int64(len(live)); n > int64(a.evicted) {
		a.evicted = uint64(n)
	}
	// A flow inserted or removed during the walk may have been seen in
	// the table and counted again: the count is then a lower bound, and
	// the next Stats walks again even below the floor, until one walk
	// sees the table still.
	a.recount = before[ctrFlowNew] != after[ctrFlowNew] || before[ctrFlowDone] != after[ctrFlowDone]
	a.sweptNew, a.sweptLive = before[ctrFlowNew], int64(len(live))
	slices.Sort(live)
	a.poller.reconcile(mark, func(id uint64) bool {
		_, found := slices.BinarySearch(live, id)
		return found
	})
	return nil
}

// userStats is what user space counted.
func (a *attachment) userStats() probe.Stats {
	return probe.Stats{
		Malformed:   a.malformed.Load(),
		Incomplete:  a.incomplete.Load(),
		PollsFailed: a.poller.pollsFailed.Load(),
	}
}

// Close stops the poller and detaches and unloads everything.
func (a *attachment) Close() error {
	a.statsMu.Lock()
	a.closing.Store(true) // no sweep from now on
	a.statsMu.Unlock()
	if a.poller != nil { // nil when Attach failed before it started
		a.poller.stop()
	}
	err := bpfload.CloseLinks(a.links)
	if cerr := a.objs.Close(); err == nil {
		err = cerr
	}
	return err
}
