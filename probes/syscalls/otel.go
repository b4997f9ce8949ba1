package syscalls

import (
	"context"
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill/internal/probe"
)

// Names of the metric and the invented attribute, as documented in the
// README (no semantic convention names system calls).
const (
	metricSyscalls = "process.syscalls"
	attrName       = attribute.Key("flowmill.syscalls.name")
)

// Telemetry maps the probe's Counts to OpenTelemetry; flowmill.NewExporter
// calls it (see probe.Telemetry).
//
// process.syscalls counts the system calls made by the processes in scope,
// by flowmill.syscalls.name (the call's name on this architecture, at most
// a few hundred values), and by process.pid only with flowmill.AttrPID.
// Counts are cumulative per process: the recorder keeps the last counts of
// each living process and records their growth, so each call is counted
// once; a process leaves the table with its final (Exited) Counts.
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	r := &recorder{
		attrs: env.Attributes,
		max:   int(p.maxProcs),
		last:  make(map[uint32]*procCounts),
		sets:  make(map[setKey][]metric.AddOption),
	}
	var err error
	r.calls, err = env.Meter.Int64Counter(metricSyscalls, metric.WithUnit("{syscall}"),
		metric.WithDescription("System calls made by processes in scope, by name, counted in the kernel and read periodically."))
	if err != nil {
		return nil, fmt.Errorf("syscalls: creating instrument %s: %w", metricSyscalls, err)
	}
	if r.sub, err = probe.Subscribe[Counts](env.Bus, env.Buffer); err != nil {
		return nil, fmt.Errorf("syscalls: %w", err)
	}
	return r, nil
}

type recorder struct {
	attrs probe.Attributes
	calls metric.Int64Counter
	sub   *probe.Sub[Counts]

	// Used by Run's goroutine only.
	last map[uint32]*procCounts // by PID
	max  int
	tick uint64 // Counts handled, the clock of procCounts.touched
	sets map[setKey][]metric.AddOption
}

// procCounts is what the recorder remembers of a living process: the
// cumulative counts already recorded, by system call number.
type procCounts struct {
	n       map[Syscall]uint64
	touched uint64
}

// setKey is what the metric attributes of a count depend on.
type setKey struct {
	nr  Syscall
	pid uint32 // 0 unless AttrPID
}

// maxSets bounds the cache of attribute sets: without AttrPID there is one
// set per system call.
const maxSets = 4096

// Run records Counts until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.release()
	c := r.sub.C()
	for {
		select {
		case <-stop:
			for {
				select {
				case e, ok := <-c:
					if !ok {
						return nil
					}
					r.record(&e)
				default:
					return nil
				}
			}
		case e, ok := <-c:
			if !ok {
				return nil
			}
			r.record(&e)
		}
	}
}

func (r *recorder) release() {
	r.sub.Close()
	clear(r.last)
	clear(r.sets)
}

// record adds the growth of e's counts since the last Counts of the same
// process. A count below the last one means the kernel freed and remade
// the entry (as the probe's totals assume): it is all new.
func (r *recorder) record(e *Counts) {
	r.tick++
	p, ok := r.last[e.PID]
	if !ok {
		if e.Exited && len(e.Syscalls) == 0 {
			return
		}
		if len(r.last) >= r.max {
			r.forget()
		}
		p = &procCounts{n: make(map[Syscall]uint64, len(e.Syscalls))}
		r.last[e.PID] = p
	}
	p.touched = r.tick
	ctx := context.Background()
	for _, c := range e.Syscalls {
		old := p.n[c.Syscall]
		d := c.N
		if c.N >= old {
			d = c.N - old
		}
		p.n[c.Syscall] = c.N
		if d > 0 {
			r.calls.Add(ctx, int64(d), r.set(c.Syscall, e.PID)...)
		}
	}
	if e.Exited {
		delete(r.last, e.PID)
	}
}

// forget bounds the table: it drops the processes whose Counts were not
// seen in the last max/2 events, at least half the table. It fills only
// when final Counts were missed (dropped on a full channel).
func (r *recorder) forget() {
	horizon := r.tick - uint64(r.max/2) - 1
	for pid, p := range r.last {
		if p.touched <= horizon {
			delete(r.last, pid)
		}
	}
}

// set returns the metric attributes of system call nr made by pid.
func (r *recorder) set(nr Syscall, pid uint32) []metric.AddOption {
	k := setKey{nr: nr}
	if r.attrs.Has(probe.AttrPID) {
		k.pid = pid
	}
	if s, ok := r.sets[k]; ok {
		return s
	}
	if len(r.sets) >= maxSets {
		clear(r.sets)
	}
	kv := []attribute.KeyValue{attrName.String(nr.String())}
	if r.attrs.Has(probe.AttrPID) {
		kv = append(kv, semconv.ProcessPID(int(k.pid)))
	}
	s := []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(kv...))}
	r.sets[k] = s
	return s
}

var _ probe.Telemetry = (*Probe)(nil)
