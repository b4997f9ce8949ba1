package flowmill

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/ringread"
)

// Errors returned by Start, wrapped with what is missing and what to do.
// Test for them with errors.Is.
var (
	// ErrPermission: the process may not load eBPF programs (not root, or
	// missing CAP_BPF and CAP_PERFMON).
	ErrPermission = probe.ErrPermission
	// ErrNoBTF: the kernel has no BTF (/sys/kernel/btf/vmlinux).
	ErrNoBTF = probe.ErrNoBTF
	// ErrMissingHook: a tracepoint or function a probe needs is missing.
	ErrMissingHook = probe.ErrMissingHook
	// ErrNotSupported: the kernel lacks a feature a probe needs.
	ErrNotSupported = probe.ErrNotSupported
	// ErrClosed: the session is closed.
	ErrClosed = errors.New("flowmill: session closed")
	// ErrInvalidOption: an option of the session, of a subscription, of
	// the exporter or of a probe family has a value it does not accept;
	// the error says which and what to pass.
	ErrInvalidOption = errors.New("flowmill: invalid option")
)

// Probe is a probe family, configured by its package's New (tcp.New(),
// process.New(), ...) and selected with WithProbes. Its methods take the
// session's internal machinery: only this module's families implement it.
type Probe = probe.Probe

// Option configures a session (New, Start).
type Option func(*config)

type config struct {
	probes      []Probe
	scope       probe.Scope
	scopes      int // scope options given
	ringSize    int
	wakeupBytes uint64
	drain       time.Duration
	errs        []error
}

func (c *config) fail(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

// WithProbes selects the probe families to attach, e.g.
// WithProbes(tcp.New(), process.New()). Each family may be selected once.
func WithProbes(p ...Probe) Option {
	return func(c *config) { c.probes = append(c.probes, p...) }
}

// WithHostScope observes every process on the host instead of only the
// calling process.
func WithHostScope() Option {
	return func(c *config) {
		c.scopes++
		c.scope = probe.Scope{Kind: probe.ScopeHost}
	}
}

// WithProcessScope observes the process pid (all its threads) instead of
// the calling process.
func WithProcessScope(pid int) Option {
	return func(c *config) {
		c.scopes++
		if pid <= 0 || pid > 1<<22 {
			c.fail("WithProcessScope(%d): not a process ID: pass a PID from os.Getpid or /proc", pid)
			return
		}
		c.scope = probe.Scope{Kind: probe.ScopeProcess, PID: uint32(pid)}
	}
}

// WithCgroupScope observes the processes in a cgroup v2 directory (for
// example /sys/fs/cgroup/system.slice/nginx.service, or under
// /sys/fs/cgroup/unified on hybrid systems) and its descendants.
func WithCgroupScope(path string) Option {
	return func(c *config) {
		c.scopes++
		if path == "" {
			c.fail("WithCgroupScope(\"\"): pass a cgroup v2 directory such as /sys/fs/cgroup/system.slice/x.service")
			return
		}
		c.scope = probe.Scope{Kind: probe.ScopeCgroup, CgroupPath: path}
	}
}

// WithRingBufferSize sets the size in bytes of each probe's kernel ring
// buffer (default 1 MiB). It must be a power of two, a multiple of the
// page size, and at most 1 GiB.
func WithRingBufferSize(bytes int) Option {
	return func(c *config) { c.ringSize = bytes }
}

// WithMaxLatency bounds how long an event may wait in the kernel ring buffer
// before it is read (default 50ms, at least 1ms). The kernel wakes the
// reader early when 64 KiB are waiting; below that, events are collected on
// this timer, which is far cheaper than a wake-up per event.
func WithMaxLatency(d time.Duration) Option {
	return func(c *config) {
		if d < time.Millisecond || d > 24*time.Hour {
			c.fail("WithMaxLatency(%v): must be between 1ms and 24h", d)
			return
		}
		c.drain = d
	}
}

// Session is a set of probes: made with New (or Start), started with
// Start, ended with Close.
type Session struct {
	cfg   config
	bus   *probe.Bus
	clock kclock.Clock
	read  atomic.Uint64

	mu      sync.Mutex // serialises Start and Close
	started bool
	wg      sync.WaitGroup
	running atomic.Pointer[[]*ringread.Reader] // the readers, once all run
	readers []*ringread.Reader

	// statsMu keeps the attachments open while Stats reads them.
	statsMu sync.RWMutex
	atts    []attached
	final   *Stats // the counters when the session closed

	closeOnce sync.Once
	closeErr  error
	done      chan struct{}
	stop      func() bool // unregisters the context watch

	errMu   sync.Mutex
	readErr error
}

type attached struct {
	name string
	att  probe.Attachment
}

// New checks the options and prepares a session without touching the
// kernel. Subscriptions (Subscribe, SubscribeFunc) and an exporter
// (NewExporter) made before Session.Start see every event from the first
// one. An invalid option is an error wrapping ErrInvalidOption.
func New(opts ...Option) (*Session, error) {
	c := config{
		scope:       probe.Scope{Kind: probe.ScopeProcess, PID: uint32(os.Getpid())},
		ringSize:    1 << 20,
		wakeupBytes: 64 << 10,
		drain:       50 * time.Millisecond,
	}
	for _, o := range opts {
		if o == nil {
			c.fail("an Option is nil")
			continue
		}
		o(&c)
	}
	if len(c.probes) == 0 {
		c.fail("no probes selected: pass flowmill.WithProbes(tcp.New(), ...)")
	}
	if c.scopes > 1 {
		c.fail("%d scope options: pass at most one of WithHostScope, WithProcessScope and WithCgroupScope", c.scopes)
	}
	if n := c.ringSize; n < os.Getpagesize() || n > 1<<30 || n&(n-1) != 0 {
		c.fail("WithRingBufferSize(%d): must be a power of two between the page size (%d) and 1 GiB", n, os.Getpagesize())
	}
	if c.wakeupBytes > uint64(c.ringSize)/2 {
		c.wakeupBytes = uint64(c.ringSize) / 2
	}
	bus := probe.NewBus()
	seen := make(map[string]bool)
	for i, p := range c.probes {
		if p == nil || (reflect.ValueOf(p).Kind() == reflect.Pointer && reflect.ValueOf(p).IsNil()) {
			c.fail("WithProbes: probe %d is nil: pass a family's New(), such as tcp.New()", i)
			continue
		}
		if seen[p.Name()] {
			c.fail("WithProbes: the %s family is selected twice: pass it once, with all its options", p.Name())
			continue
		}
		seen[p.Name()] = true
		if err := p.Prepare(bus); err != nil {
			c.errs = append(c.errs, err)
		}
	}
	if len(c.errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, errors.Join(c.errs...))
	}
	return &Session{cfg: c, bus: bus, done: make(chan struct{})}, nil
}

// Start is New followed by Session.Start: it checks the options, the
// kernel and the privileges, loads and attaches the selected probes, and
// starts reading their events. By default the session observes the calling
// process only; see WithHostScope and WithCgroupScope.
//
// The session ends when Close is called or ctx is done.
func Start(ctx context.Context, opts ...Option) (*Session, error) {
	s, err := New(opts...)
	if err != nil {
		return nil, err
	}
	if err := s.Start(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Start checks the kernel and privileges, loads and attaches the session's
// probes, and starts reading their events; it can be called once. On error
// nothing stays attached, and the session can only be closed. The session
// ends when Close is called or ctx is done.
func (s *Session) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		return ErrClosed
	default:
	}
	if s.started {
		return errors.New("flowmill: session already started")
	}
	s.started = true
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("flowmill: %w", err)
	}
	if err := bpfload.Check(); err != nil {
		return fmt.Errorf("flowmill: %w", err)
	}
	s.clock = kclock.New()
	env := &probe.Env{
		Scope:       s.cfg.scope,
		Bus:         s.bus,
		RingSize:    uint32(s.cfg.ringSize),
		WakeupBytes: s.cfg.wakeupBytes,
		BootTime:    s.clock.Time,
		Sync:        s.sync,
	}
	var atts []attached
	fail := func(name string, err error) error {
		for _, rd := range s.readers {
			rd.Close()
		}
		s.readers = nil
		for _, a := range atts {
			a.att.Close()
		}
		return fmt.Errorf("flowmill: probe %s: %w", name, err)
	}
	for _, p := range s.cfg.probes {
		a, err := p.Attach(env)
		if err != nil {
			return fail(p.Name(), err)
		}
		atts = append(atts, attached{p.Name(), a})
		for _, r := range a.Rings() {
			rd, err := ringread.New(r.Map, s.cfg.drain, r.Handle, &s.read)
			if err != nil {
				return fail(p.Name(), err)
			}
			s.readers = append(s.readers, rd)
		}
	}
	s.statsMu.Lock()
	s.atts = atts
	s.statsMu.Unlock()
	for _, rd := range s.readers {
		s.wg.Go(func() {
			if err := rd.Run(); err != nil {
				s.errMu.Lock()
				s.readErr = errors.Join(s.readErr, err)
				s.errMu.Unlock()
			}
		})
	}
	s.running.Store(&s.readers)
	s.stop = context.AfterFunc(ctx, func() { s.Close() })
	return nil
}

// sync implements probe.Env.Sync.
func (s *Session) sync() {
	readers := s.running.Load()
	if readers == nil {
		return
	}
	for _, rd := range *readers {
		rd.Sync()
	}
}

// Close reads the events the kernel has already produced and delivers them,
// then detaches and unloads every probe and closes all subscriptions'
// channels. It is idempotent and safe to call from any goroutine, before
// or after Start; every call returns the same error.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.stop != nil {
			s.stop()
		}
		s.closeErr = s.teardown()
		close(s.done)
	})
	return s.closeErr
}

// Done is closed when the session has been closed.
func (s *Session) Done() <-chan struct{} { return s.done }

// teardown runs with s.mu held.
func (s *Session) teardown() error {
	var errs []error
	// Deliver what the kernel produced before Close, then stop.
	for _, rd := range s.readers {
		errs = append(errs, rd.Stop())
	}
	s.wg.Wait()
	for _, rd := range s.readers {
		errs = append(errs, rd.Close())
	}
	final, err := s.live()
	errs = append(errs, err)
	s.statsMu.Lock()
	for _, a := range s.atts {
		if err := a.att.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing probe %s: %w", a.name, err))
		}
	}
	s.atts = nil
	s.final = &final
	s.statsMu.Unlock()
	s.bus.Close()
	s.errMu.Lock()
	errs = append(errs, s.readErr)
	s.errMu.Unlock()
	return errors.Join(errs...)
}
