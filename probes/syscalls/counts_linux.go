package syscalls

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/cilium/ebpf"

	"github.com/flowmill/flowmill/internal/probe"
)

// ncalls bounds the numbers counted (SC_NR_MAX in bpf/syscalls.c).
const ncalls = 1024

// batchSize is the number of map entries read per system call. Hash maps
// fail a batch smaller than one of their buckets; this is far larger.
const batchSize = 1024

// aggregator turns the kernel's cumulative per-CPU counters into per
// process Counts and running totals. Its methods are safe for concurrent
// use: the timer, Snapshot, Totals and Close may run at once. Counts are
// published by the timer's goroutine (and the last read, at Close) with no
// lock held, so a function subscriber may call Snapshot or Totals.
type aggregator struct {
	topic *probe.Topic[Counts]
	ncpu  int

	mu     sync.Mutex
	procs  map[uint32]*proc
	totals [ncalls]uint64
	closed bool
	err    error    // of the last read
	exited []Counts // final Counts of processes that died, to publish

	// reused buffers
	keys []syscallsBPFScKey
	vals []uint64
	dead []uint32
}

// proc is what the kernel counted last for one process.
type proc struct {
	n       map[Syscall]uint64
	changed bool
}

func newAttachment(topic *probe.Topic[Counts], ncpu int) *attachment {
	return &attachment{agg: &aggregator{
		topic: topic,
		ncpu:  ncpu,
		procs: make(map[uint32]*proc),
		keys:  make([]syscallsBPFScKey, batchSize),
		vals:  make([]uint64, batchSize*ncpu),
	}}
}

// read reads the kernel and publishes what changed since the last
// publication; the error is kept for Stats. Only the timer's goroutine and
// finish, which runs after it stopped, call it.
func (g *aggregator) read(objs *syscallsBPFObjects) {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return
	}
	g.err = g.readLocked(objs)
	out := g.collectLocked(time.Now())
	g.mu.Unlock()
	for i := range out {
		g.topic.Publish(&out[i])
	}
}

// collectLocked returns what is to be published: the final Counts of
// processes that exited and the Counts of those whose counters changed.
func (g *aggregator) collectLocked(now time.Time) []Counts {
	out := g.exited
	g.exited = nil
	for pid, p := range g.procs {
		if p.changed {
			p.changed = false
			if g.topic.Active() {
				out = append(out, counts(now, pid, p, false))
			}
		}
	}
	return out
}

func (g *aggregator) lastError() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.err
}

// readLocked does one read. Processes are noted dead before their counters
// are read, so what is read for them is final. It publishes nothing: the
// changes wait for collectLocked.
func (g *aggregator) readLocked(objs *syscallsBPFObjects) error {
	dead, err := g.drainExited(objs.Exited)
	if err != nil {
		return err
	}
	now := time.Now()
	var cursor ebpf.MapBatchCursor
	for {
		n, err := objs.Counts.BatchLookup(&cursor, g.keys, g.vals, nil)
		for i := range n {
			var sum uint64
			for _, v := range g.vals[i*g.ncpu : (i+1)*g.ncpu] {
				sum += v
			}
			g.update(g.keys[i], sum)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("reading the counts map: %w", err)
		}
	}
	var gone []syscallsBPFScKey
	for _, pid := range dead {
		p := g.procs[pid]
		if p == nil {
			continue
		}
		if g.topic.Active() {
			g.exited = append(g.exited, counts(now, pid, p, true))
		}
		for nr := range p.n {
			gone = append(gone, syscallsBPFScKey{Tgid: pid, Nr: uint32(nr)})
		}
		delete(g.procs, pid)
	}
	if len(gone) > 0 {
		if _, err := objs.Counts.BatchDelete(gone, nil); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("freeing the counts of processes that exited: %w", err)
		}
	}
	return nil
}

// drainExited returns the processes that died since the last read and
// removes them from the kernel's list.
func (g *aggregator) drainExited(m *ebpf.Map) ([]uint32, error) {
	g.dead = g.dead[:0]
	var pid uint32
	var ts uint64
	it := m.Iterate()
	for it.Next(&pid, &ts) {
		g.dead = append(g.dead, pid)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading the exited map: %w", err)
	}
	for _, pid := range g.dead {
		if err := m.Delete(pid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, fmt.Errorf("clearing the exited map: %w", err)
		}
	}
	return g.dead, nil
}

func (g *aggregator) update(k syscallsBPFScKey, n uint64) {
	if k.Nr >= ncalls {
		return
	}
	p := g.procs[k.Tgid]
	if p == nil {
		p = &proc{n: make(map[Syscall]uint64)}
		g.procs[k.Tgid] = p
	}
	nr := Syscall(k.Nr)
	old := p.n[nr]
	if n == old {
		return
	}
	if n > old {
		g.totals[nr] += n - old
	} else {
		g.totals[nr] += n // the entry was freed and made again
	}
	p.n[nr] = n
	p.changed = true
}

func counts(now time.Time, pid uint32, p *proc, exited bool) Counts {
	c := Counts{Time: now, PID: pid, Exited: exited, Syscalls: make([]Count, 0, len(p.n))}
	for nr, n := range p.n {
		c.Syscalls = append(c.Syscalls, Count{Syscall: nr, N: n})
	}
	sort.Slice(c.Syscalls, func(i, j int) bool { return c.Syscalls[i].Syscall < c.Syscalls[j].Syscall })
	return c
}

func (g *aggregator) snapshot(objs *syscallsBPFObjects) ([]Counts, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrNotAttached
	}
	if err := g.readLocked(objs); err != nil {
		return nil, err
	}
	now := time.Now()
	out := make([]Counts, 0, len(g.procs))
	for pid, p := range g.procs {
		out = append(out, counts(now, pid, p, false))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out, nil
}

func (g *aggregator) totalCounts(objs *syscallsBPFObjects) ([]Count, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed {
		if err := g.readLocked(objs); err != nil {
			return nil, err
		}
	}
	var out []Count
	for nr, n := range g.totals {
		if n > 0 {
			out = append(out, Count{Syscall: Syscall(nr), N: n})
		}
	}
	return out, nil
}

// finish makes the last read and publishes it; afterwards only the totals
// are served. It runs after the timer stopped.
func (g *aggregator) finish(objs *syscallsBPFObjects) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	err := g.readLocked(objs)
	g.closed = true
	out := g.collectLocked(time.Now())
	g.mu.Unlock()
	for i := range out {
		g.topic.Publish(&out[i])
	}
	return err
}
