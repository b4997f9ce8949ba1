package syscalls

import (
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/proctree"
)

// Counter slots (bpf/include/flowmill.h, bpf/syscalls.c).
const (
	ctrLost = iota
	ctrFull
	ctrExitedFull
	ctrTrackFull
	nCounters
)

// Attach loads and attaches the probe. It is called by flowmill.Start.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	if p.interval <= 0 || p.maxEntries == 0 || p.maxProcs == 0 {
		return nil, fmt.Errorf("syscalls: WithInterval, WithMaxEntries and WithMaxProcesses must be positive")
	}
	spec, err := loadSyscallsBPF()
	if err != nil {
		return nil, err
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("syscalls: %w", err)
	}
	spec.Maps["counts"].MaxEntries = p.maxEntries
	spec.Maps["tracked"].MaxEntries = p.maxProcs
	spec.Maps["exited"].MaxEntries = p.maxProcs
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("syscalls: %w", err)
	}
	a := newAttachment(probe.Produce[Counts](env.Bus), ncpu)
	if err := bpfload.Load(spec, env, &a.objs, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("syscalls: %w", err)
	}
	tps := []bpfload.RawTracepoint{
		// Two for exits (PT_EXIT_PROGRAMS in bpf/include/proctree.h).
		{Name: "sched_process_exit", Program: a.objs.OnExit},
		{Name: "sched_process_exit", Program: a.objs.OnExitAgain},
		{Name: "sys_enter", Program: a.objs.OnSysEnter},
	}
	if env.Scope.Kind == probe.ScopeProcess {
		if err := a.objs.Tracked.Put(env.Scope.PID, uint8(1)); err != nil {
			a.objs.Close()
			return nil, fmt.Errorf("syscalls: tracking process %d: %w", env.Scope.PID, err)
		}
		// Follow the tree before anything is counted.
		tps = append([]bpfload.RawTracepoint{{Name: "sched_process_fork", Program: a.objs.OnFork}}, tps...)
	}
	a.links, err = bpfload.AttachRawTracepoints(tps...)
	if err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("syscalls: %w", err)
	}
	if env.Scope.Kind == probe.ScopeProcess {
		if err := proctree.Seed(a.objs.Tracked, env.Scope.PID); err != nil {
			a.close()
			return nil, fmt.Errorf("syscalls: %w", err)
		}
	}
	a.start(p.interval)
	p.att.Store(a)
	return a, nil
}

type attachment struct {
	objs  syscallsBPFObjects
	links []link.Link
	agg   *aggregator
	stop  chan struct{}
	done  chan struct{}
}

func (a *attachment) Rings() []probe.Ring { return nil }

func (a *attachment) Stats() (probe.Stats, error) {
	if err := a.agg.lastError(); err != nil {
		return probe.Stats{}, fmt.Errorf("reading the syscall counters: %w", err)
	}
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
	}
	return probe.Stats{Lost: c[ctrLost] + c[ctrFull] + c[ctrExitedFull] + c[ctrTrackFull], Missed: bpfload.Missed(&a.objs.syscallsBPFPrograms)}, nil
}

// Close stops the timer, makes a last read (publishing the final Counts),
// then detaches and unloads everything. Totals stay available.
func (a *attachment) Close() error {
	if a.stop != nil {
		close(a.stop)
		<-a.done
		a.stop = nil
	}
	err := a.agg.finish(&a.objs)
	if cerr := a.close(); err == nil {
		err = cerr
	}
	return err
}

func (a *attachment) close() error {
	err := bpfload.CloseLinks(a.links)
	a.links = nil
	if cerr := a.objs.Close(); err == nil {
		err = cerr
	}
	return err
}

func (a *attachment) start(interval time.Duration) {
	a.stop = make(chan struct{})
	a.done = make(chan struct{})
	go func() {
		defer close(a.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-a.stop:
				return
			case <-t.C:
				a.agg.read(&a.objs)
			}
		}
	}()
}

func (a *attachment) snapshot() ([]Counts, error) {
	return a.agg.snapshot(&a.objs)
}

func (a *attachment) totalCounts() ([]Count, error) {
	return a.agg.totalCounts(&a.objs)
}
