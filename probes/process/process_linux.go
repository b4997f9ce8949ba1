package process

import (
	"fmt"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/proctree"
)

// Counter slots (bpf/include/flowmill.h, bpf/process.c).
const (
	ctrLost = iota
	ctrTrackFull
	nCounters
)

// Attach loads and attaches the probe. It is called by flowmill.Start.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	if p.maxProcs == 0 {
		return nil, fmt.Errorf("process: WithMaxProcesses must be positive")
	}
	spec, err := loadProcessBPF()
	if err != nil {
		return nil, err
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("process: %w", err)
	}
	spec.Maps["tracked"].MaxEntries = p.maxProcs
	a := &attachment{
		dec:   decoder{boot: env.BootTime},
		execs: probe.Produce[Exec](env.Bus),
		exits: probe.Produce[Exit](env.Bus),
		forks: probe.Produce[Fork](env.Bus),
	}
	if err := bpfload.Load(spec, env, &a.objs, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("process: %w", err)
	}
	if env.Scope.Kind == probe.ScopeProcess {
		if err := a.objs.Tracked.Put(env.Scope.PID, uint8(1)); err != nil {
			a.objs.Close()
			return nil, fmt.Errorf("process: tracking process %d: %w", env.Scope.PID, err)
		}
	}
	a.links, err = bpfload.AttachRawTracepoints(
		// Fork first, so that the tree is followed before anything else
		// is reported.
		bpfload.RawTracepoint{Name: "sched_process_fork", Program: a.objs.OnFork},
		// Two programs for exits (PT_EXIT_PROGRAMS in
		// bpf/include/proctree.h): a thread the kernel skips in one
		// is seen by the other.
		bpfload.RawTracepoint{Name: "sched_process_exit", Program: a.objs.OnExit},
		bpfload.RawTracepoint{Name: "sched_process_exit", Program: a.objs.OnExitAgain},
		bpfload.RawTracepoint{Name: "sched_process_exec", Program: a.objs.OnExec},
	)
	if err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("process: %w", err)
	}
	if env.Scope.Kind == probe.ScopeProcess {
		if err := proctree.Seed(a.objs.Tracked, env.Scope.PID); err != nil {
			a.Close()
			return nil, fmt.Errorf("process: %w", err)
		}
	}
	return a, nil
}

type attachment struct {
	objs  processBPFObjects
	links []link.Link
	dec   decoder

	execs *probe.Topic[Exec]
	exits *probe.Topic[Exit]
	forks *probe.Topic[Fork]

	exited    recentExits
	malformed atomic.Uint64 // records that could not be decoded
}

// recentExits remembers the last processes whose exit was published, so
// that each process has one Exit. The kernel already lets one of the
// threads of an exit_group report (pt_claim_exit in bpf/include/proctree.h),
// but on emulated 5.10, 6.1 and 7.3 kernels a second thread of the same
// exit_group still reported, 16 ms after the first; the cause was not found,
// so user space holds the invariant too. Only the reader goroutine uses it.
type recentExits struct {
	seen map[exitKey]struct{}
	ring [1024]exitKey
	next int
}

type exitKey struct {
	pid   uint32
	start int64 // the process's start (Unix ns): PIDs are reused
}

// add reports whether k is new, and remembers it.
func (r *recentExits) add(k exitKey) bool {
	if _, dup := r.seen[k]; dup {
		return false
	}
	if r.seen == nil {
		r.seen = make(map[exitKey]struct{}, len(r.ring))
	}
	delete(r.seen, r.ring[r.next])
	r.ring[r.next] = k
	r.next = (r.next + 1) % len(r.ring)
	r.seen[k] = struct{}{}
	return true
}

func (a *attachment) Rings() []probe.Ring {
	return []probe.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

// handle decodes one record and publishes it. Records nobody subscribes to
// are not decoded. A record that cannot be decoded (our programs never
// write one) is counted in Stats.Malformed and dropped.
func (a *attachment) handle(raw []byte) {
	kind, err := a.dec.kind(raw)
	if err != nil {
		a.malformed.Add(1)
		return
	}
	switch kind {
	case kindExec:
		if !a.execs.Active() {
			return
		}
		var ev Exec
		if a.dec.decodeExec(raw, &ev) != nil {
			a.malformed.Add(1)
			return
		}
		a.execs.Publish(&ev)
	case kindExit:
		if !a.exits.Active() {
			return
		}
		var ev Exit
		a.dec.decodeExit(&ev)
		if a.exited.add(exitKey{ev.PID, ev.Time.Add(-ev.Lifetime).UnixNano()}) {
			a.exits.Publish(&ev)
		}
	case kindFork:
		if !a.forks.Active() {
			return
		}
		var ev Fork
		a.dec.decodeFork(&ev)
		a.forks.Publish(&ev)
	default:
		a.malformed.Add(1)
	}
}

func (a *attachment) Stats() (probe.Stats, error) {
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
	}
	return probe.Stats{
		Lost:      c[ctrLost] + c[ctrTrackFull],
		Missed:    bpfload.Missed(&a.objs.processBPFPrograms),
		Malformed: a.malformed.Load(),
	}, nil
}

func (a *attachment) Close() error {
	err := bpfload.CloseLinks(a.links)
	a.links = nil
	if cerr := a.objs.Close(); err == nil {
		err = cerr
	}
	return err
}
