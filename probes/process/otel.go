package process

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/log"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/probe"
)

// WithLogRecords makes the exporter (flowmill.NewExporter) emit one
// OpenTelemetry log record per Exec and per Exit, through the exporter's
// LoggerProvider (flowmill.WithLoggerProvider, default the global one).
// Each record is an event (its EventName is process.exec or process.exit)
// timestamped with the kernel's time, with the event's details as
// attributes: PIDs, the executable's path and the arguments for an exec,
// the exit code or signal and the lifetime for an exit. Off by default:
// metrics count execs and exits without them.
//
// Arguments may hold secrets (passwords, tokens on a command line): the
// records carry them as the kernel saw them.
func WithLogRecords() Option {
	return func(p *Probe) { p.logs = true }
}

// Names of the metrics, events and invented attributes, as documented in
// the README. Where a semantic convention exists it is used instead.
const (
	metricExec = "process.exec"
	metricExit = "process.exit"
	eventExec  = "process.exec"
	eventExit  = "process.exit"

	attrSignal        = attribute.Key("flowmill.process.signal")
	attrCoreDumped    = attribute.Key("flowmill.process.core_dumped")
	attrArgvTruncated = attribute.Key("flowmill.process.argv_truncated")
	attrCgroupID      = attribute.Key("flowmill.process.cgroup_id")
	attrLifetime      = attribute.Key("flowmill.process.lifetime")
)

// Telemetry maps the probe's events to OpenTelemetry; flowmill.NewExporter
// calls it (see probe.Telemetry).
//
// Metrics: process.exec counts execs by process.executable.name, and
// process.exit counts exits by process.exit.code, or by
// flowmill.process.signal for a process killed by a signal, and by
// process.executable.name. The executable name is the kernel's comm: the
// base name of the executable, truncated to 15 bytes, as the tcp family
// reports it. process.pid is added only with flowmill.AttrPID. With
// WithLogRecords, each exec and exit is also a log record. Fork events are
// not subscribed to, so the probe does not decode them for the exporter.
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	r := &recorder{
		logs:   p.logs,
		logger: env.Logger,
		attrs:  env.Attributes,
		sets:   make(map[setKey][]metric.AddOption),
	}
	if err := r.instruments(env.Meter); err != nil {
		return nil, fmt.Errorf("process: %w", err)
	}
	var err error
	if r.execSub, err = probe.Subscribe[Exec](env.Bus, env.Buffer); err != nil {
		return nil, fmt.Errorf("process: %w", err)
	}
	if r.exitSub, err = probe.Subscribe[Exit](env.Bus, env.Buffer); err != nil {
		r.execSub.Close()
		return nil, fmt.Errorf("process: %w", err)
	}
	return r, nil
}

type recorder struct {
	logs   bool
	logger log.Logger
	attrs  probe.Attributes

	execs, exits metric.Int64Counter

	execSub *probe.Sub[Exec]
	exitSub *probe.Sub[Exit]

	// Used by Run's goroutine only: the metric attributes of each
	// distinct key, as ready option slices (passing one option to a
	// variadic parameter would allocate its slice on every measurement).
	sets map[setKey][]metric.AddOption
}

// setKey is what the selected metric attributes of an event depend on;
// fields of groups that are not selected stay zero, so events share sets.
type setKey struct {
	exit   bool
	comm   string
	pid    uint32
	code   int // exit code; -1 when killed by a signal
	signal syscall.Signal
}

// maxSets bounds the cache of attribute sets. Without AttrPID there are at
// most executables × (256 codes + signals) keys; with it, one per process.
const maxSets = 4096

func (r *recorder) instruments(m metric.Meter) error {
	var err1, err2 error
	r.execs, err1 = m.Int64Counter(metricExec, metric.WithUnit("{exec}"),
		metric.WithDescription("Successful execs (execve, execveat) by processes in scope, by the executable they started."))
	r.exits, err2 = m.Int64Counter(metricExit, metric.WithUnit("{process}"),
		metric.WithDescription("Processes in scope that ended, by exit code, or by the signal that killed them."))
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("creating instruments: %w", err)
	}
	return nil
}

// Run records events until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.release()
	execs, exits := r.execSub.C(), r.exitSub.C()
	for execs != nil || exits != nil {
		select {
		case <-stop:
			r.drain()
			return nil
		case e, ok := <-execs:
			if !ok {
				execs = nil
				continue
			}
			r.recordExec(&e)
		case e, ok := <-exits:
			if !ok {
				exits = nil
				continue
			}
			r.handleExit(&e)
		}
	}
	return nil
}

func (r *recorder) release() {
	r.execSub.Close()
	r.exitSub.Close()
	clear(r.sets)
}

// drain records what the channels hold.
func (r *recorder) drain() {
	r.drainExecs()
	for {
		select {
		case e, ok := <-r.exitSub.C():
			if !ok {
				return
			}
			r.handleExit(&e)
		default:
			return
		}
	}
}

// handleExit records an exit after the execs published before it: the
// probe publishes a process's execs before its exit, on another channel,
// so whatever is buffered there is older and is recorded first (log
// records then arrive in the order the kernel saw the events).
func (r *recorder) handleExit(e *Exit) {
	r.drainExecs()
	r.recordExit(e)
}

func (r *recorder) drainExecs() {
	for {
		select {
		case e, ok := <-r.execSub.C():
			if !ok {
				return
			}
			r.recordExec(&e)
		default:
			return
		}
	}
}

func (r *recorder) recordExec(e *Exec) {
	k := setKey{}
	r.pick(&k, &e.Process)
	ctx := context.Background()
	r.execs.Add(ctx, 1, r.set(k)...)
	if r.logs && r.logger.Enabled(ctx, log.EnabledParameters{Severity: log.SeverityInfo, EventName: eventExec}) {
		r.logger.Emit(ctx, execLogRecord(e))
	}
}

func (r *recorder) recordExit(e *Exit) {
	k := setKey{exit: true, code: e.ExitCode, signal: e.Signal}
	r.pick(&k, &e.Process)
	ctx := context.Background()
	r.exits.Add(ctx, 1, r.set(k)...)
	if r.logs && r.logger.Enabled(ctx, log.EnabledParameters{Severity: log.SeverityInfo, EventName: eventExit}) {
		r.logger.Emit(ctx, exitLogRecord(e))
	}
}

// pick fills the fields of k that the selected attribute groups use.
func (r *recorder) pick(k *setKey, p *Process) {
	if r.attrs.Has(probe.AttrExecutable) {
		k.comm = p.Comm
	}
	if r.attrs.Has(probe.AttrPID) {
		k.pid = p.PID
	}
}

// set returns the metric attributes of k.
func (r *recorder) set(k setKey) []metric.AddOption {
	if s, ok := r.sets[k]; ok {
		return s
	}
	if len(r.sets) >= maxSets {
		clear(r.sets)
	}
	kv := make([]attribute.KeyValue, 0, 3)
	if r.attrs.Has(probe.AttrExecutable) {
		kv = append(kv, semconv.ProcessExecutableName(k.comm))
	}
	if r.attrs.Has(probe.AttrPID) {
		kv = append(kv, semconv.ProcessPID(int(k.pid)))
	}
	if k.exit {
		kv = append(kv, exitStatus(k.code, k.signal))
	}
	s := []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(kv...))}
	r.sets[k] = s
	return s
}

// exitStatus is process.exit.code for a process that exited, and
// flowmill.process.signal for one a signal killed (its exit code, -1, is
// no exit status).
func exitStatus(code int, sig syscall.Signal) attribute.KeyValue {
	if sig != 0 {
		return attrSignal.String(signalName(sig))
	}
	return semconv.ProcessExitCode(code)
}

// signalName is the signal's constant name ("SIGKILL"), or its number for
// a real-time or unknown signal.
func signalName(sig syscall.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return n
	}
	return strconv.Itoa(int(sig))
}

// execLogRecord is the log record of an exec.
func execLogRecord(e *Exec) log.Record {
	var rec log.Record
	rec.SetEventName(eventExec)
	rec.SetTimestamp(e.Time)
	rec.SetObservedTimestamp(time.Now())
	rec.SetSeverity(log.SeverityInfo)
	rec.SetBody(attribute.StringValue("exec " + e.Filename))
	rec.AddAttributes(
		semconv.ProcessPID(int(e.PID)),
		semconv.ProcessParentPID(int(e.PPID)),
		semconv.ProcessExecutableName(e.Comm),
		semconv.ProcessExecutablePath(e.Filename),
		semconv.ProcessCommandArgs(e.Argv...),
		semconv.ProcessRealUserID(int(e.UID)),
		semconv.ThreadID(int(e.TID)),
		attrCgroupID.Int64(int64(e.CgroupID)),
	)
	if e.ArgvTruncated {
		rec.AddAttributes(attrArgvTruncated.Bool(true))
	}
	return rec
}

// exitLogRecord is the log record of an exit.
func exitLogRecord(e *Exit) log.Record {
	var rec log.Record
	rec.SetEventName(eventExit)
	rec.SetTimestamp(e.Time)
	rec.SetObservedTimestamp(time.Now())
	rec.SetSeverity(log.SeverityInfo)
	body := "exit " + e.Comm + " " + strconv.Itoa(e.ExitCode)
	if e.Signal != 0 {
		body = "exit " + e.Comm + " " + signalName(e.Signal)
	}
	rec.SetBody(attribute.StringValue(body))
	rec.AddAttributes(
		semconv.ProcessPID(int(e.PID)),
		semconv.ProcessParentPID(int(e.PPID)),
		semconv.ProcessExecutableName(e.Comm),
		exitStatus(e.ExitCode, e.Signal),
		semconv.ProcessRealUserID(int(e.UID)),
		semconv.ProcessCreationTime(e.Time.Add(-e.Lifetime).UTC().Format(time.RFC3339Nano)),
		semconv.ProcessExitTime(e.Time.UTC().Format(time.RFC3339Nano)),
		attrLifetime.Float64(e.Lifetime.Seconds()),
		attrCgroupID.Int64(int64(e.CgroupID)),
	)
	if e.CoreDumped {
		rec.AddAttributes(attrCoreDumped.Bool(true))
	}
	return rec
}

var _ probe.Telemetry = (*Probe)(nil)
