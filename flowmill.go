package flowmill

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/ringread"
	"github.com/flowmill/flowmill/probes"
)

// Errors returned by Start, wrapped with what is missing and what to do.
// Test for them with errors.Is.
var (
	// ErrPermission: the process may not load eBPF programs (not root, or
	// missing CAP_BPF and CAP_PERFMON).
	ErrPermission = probes.ErrPermission
	// ErrNoBTF: the kernel has no BTF (/sys/kernel/btf/vmlinux).
	ErrNoBTF = probes.ErrNoBTF
	// ErrMissingHook: a tracepoint or function a probe needs is missing.
	ErrMissingHook = probes.ErrMissingHook
	// ErrNotSupported: the kernel lacks a feature a probe needs.
	ErrNotSupported = probes.ErrNotSupported
	// ErrClosed: the session is closed.
	ErrClosed = errors.New("flowmill: session closed")
)

// Option configures Start.
type Option func(*config)

type config struct {
	probes      []probes.Probe
	scope       probes.Scope
	ringSize    uint32
	wakeupBytes uint64
	drain       time.Duration
}

// WithProbes selects the probe families to attach, e.g.
// WithProbes(tcp.New()).
func WithProbes(p ...probes.Probe) Option {
	return func(c *config) { c.probes = append(c.probes, p...) }
}

// WithHostScope observes every process on the host instead of only the
// calling process.
func WithHostScope() Option {
	return func(c *config) { c.scope = probes.Scope{Kind: probes.ScopeHost} }
}

// WithProcessScope observes the process pid (all its threads) instead of
// the calling process.
func WithProcessScope(pid int) Option {
	return func(c *config) { c.scope = probes.Scope{Kind: probes.ScopeProcess, PID: uint32(pid)} }
}

// WithCgroupScope observes the processes in a cgroup v2 directory (for
// example /sys/fs/cgroup/system.slice/nginx.service, or under
// /sys/fs/cgroup/unified on hybrid systems) and its descendants.
func WithCgroupScope(path string) Option {
	return func(c *config) { c.scope = probes.Scope{Kind: probes.ScopeCgroup, CgroupPath: path} }
}

// WithRingBufferSize sets the size in bytes of each probe's kernel ring
// buffer (default 1 MiB). It must be a power of two and a multiple of the
// page size.
func WithRingBufferSize(bytes int) Option {
	return func(c *config) { c.ringSize = uint32(bytes) }
}

// WithMaxLatency bounds how long an event may wait in the kernel ring buffer
// before it is read (default 50ms). The kernel wakes the reader early when
// 64 KiB are waiting; below that, events are collected on this timer, which
// is far cheaper than a wake-up per event.
func WithMaxLatency(d time.Duration) Option {
	return func(c *config) { c.drain = d }
}

// Session is a set of attached probes. Close it to detach them.
type Session struct {
	bus     *probes.Bus
	probes  []probes.Probe // the selected families, for the exporter
	atts    []attached
	readers []*ringread.Reader
	running atomic.Pointer[[]*ringread.Reader] // readers, once all run
	wg      sync.WaitGroup
	read    atomic.Uint64

	closeOnce sync.Once
	closeErr  error
	done      chan struct{}
	stop      func() bool // unregisters the context watch

	errMu   sync.Mutex
	readErr error
}

type attached struct {
	name string
	att  probes.Attachment
}

// Start checks the kernel and privileges, loads and attaches the selected
// probes, and starts reading their events. By default the session observes
// the calling process only; see WithHostScope and WithCgroupScope.
//
// The session ends when Close is called or ctx is done.
func Start(ctx context.Context, opts ...Option) (*Session, error) {
	c := config{
		scope:       probes.Scope{Kind: probes.ScopeProcess, PID: uint32(os.Getpid())},
		ringSize:    1 << 20,
		wakeupBytes: 64 << 10,
		drain:       50 * time.Millisecond,
	}
	for _, o := range opts {
		o(&c)
	}
	if len(c.probes) == 0 {
		return nil, errors.New("flowmill: no probes selected: pass flowmill.WithProbes(tcp.New(), ...)")
	}
	if c.ringSize == 0 || c.ringSize&(c.ringSize-1) != 0 || c.ringSize%uint32(os.Getpagesize()) != 0 {
		return nil, fmt.Errorf("flowmill: ring buffer size %d is not a power of two multiple of the page size", c.ringSize)
	}
	if c.wakeupBytes > uint64(c.ringSize)/2 {
		c.wakeupBytes = uint64(c.ringSize) / 2
	}
	if err := bpfload.Check(); err != nil {
		return nil, fmt.Errorf("flowmill: %w", err)
	}
	clock := kclock.New()
	s := &Session{bus: probes.NewBus(), done: make(chan struct{}), probes: c.probes}
	env := &probes.Env{
		Scope:       c.scope,
		Bus:         s.bus,
		RingSize:    c.ringSize,
		WakeupBytes: c.wakeupBytes,
		BootTime:    clock.Time,
		Sync:        s.sync,
	}
	for _, p := range c.probes {
		a, err := p.Attach(env)
		if err != nil {
			s.teardown()
			return nil, fmt.Errorf("flowmill: probe %s: %w", p.Name(), err)
		}
		s.atts = append(s.atts, attached{p.Name(), a})
		for _, r := range a.Rings() {
			rd, err := ringread.New(r.Map, c.drain, r.Handle, &s.read)
			if err != nil {
				s.teardown()
				return nil, fmt.Errorf("flowmill: probe %s: %w", p.Name(), err)
			}
			s.readers = append(s.readers, rd)
		}
	}
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
	return s, nil
}

// sync implements probes.Env.Sync.
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
// channels. It is idempotent and safe to call from any goroutine; every call
// returns the same error.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
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
	for _, a := range s.atts {
		if err := a.att.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing probe %s: %w", a.name, err))
		}
	}
	s.bus.Close()
	s.errMu.Lock()
	errs = append(errs, s.readErr)
	s.errMu.Unlock()
	return errors.Join(errs...)
}

// Stats counts what the session read and everything it lost. Every loss is
// one of these counters; none is silent.
type Stats struct {
	// EventsRead is records read from the kernel ring buffers.
	EventsRead uint64
	// EventsLost is records the kernel dropped because a ring buffer was
	// full. Raise WithRingBufferSize or lower WithMaxLatency if it grows.
	EventsLost uint64
	// Evicted is entries pushed out of bounded kernel maps (in-flight
	// flows, for instance) before they could be reported.
	Evicted uint64
	// Dropped is events subscribers missed because their channel was full
	// (the sum of every Subscription.Dropped, past and present).
	Dropped uint64
	// Missed is hook hits the kernel skipped because one of the probes'
	// programs was already running on that CPU (probes.Stats.Missed). On
	// kernels that preempt eBPF programs (7.x by default) it grows under
	// load; the kernel does not say whether a skipped hit was in scope,
	// so it is not part of EventsLost. Linux 5.12 and later.
	Missed uint64
}

// Stats reads the session's counters.
func (s *Session) Stats() (Stats, error) {
	st := Stats{EventsRead: s.read.Load(), Dropped: s.bus.Dropped()}
	select {
	case <-s.done:
		return st, ErrClosed
	default:
	}
	for _, a := range s.atts {
		ps, err := a.att.Stats()
		if err != nil {
			return st, fmt.Errorf("flowmill: stats of probe %s: %w", a.name, err)
		}
		st.EventsLost += ps.Lost
		st.Evicted += ps.Evicted
		st.Missed += ps.Missed
	}
	return st, nil
}

// Subscription delivers events of type T. Its channel never blocks the
// session: when it is full, new events are dropped and counted in Dropped.
type Subscription[T any] struct {
	sub *probes.Sub[T]
}

// SubscribeOption configures Subscribe.
type SubscribeOption func(*subConfig)

type subConfig struct{ buf int }

// WithBuffer sets the channel capacity (default 4096). A larger buffer
// absorbs longer pauses of the consumer before events are dropped.
func WithBuffer(n int) SubscribeOption { return func(c *subConfig) { c.buf = n } }

// Subscribe starts delivering the session's events of type T, such as
// tcp.ConnClosed. It fails if no probe of the session produces T or the
// session is closed.
func Subscribe[T any](s *Session, opts ...SubscribeOption) (*Subscription[T], error) {
	c := subConfig{buf: 4096}
	for _, o := range opts {
		o(&c)
	}
	select {
	case <-s.done:
		return nil, ErrClosed
	default:
	}
	sub, err := probes.Subscribe[T](s.bus, c.buf)
	if err != nil {
		return nil, fmt.Errorf("flowmill: %w", err)
	}
	return &Subscription[T]{sub: sub}, nil
}

// SubscribeFunc calls fn with each of the session's events of type T, on
// the goroutine that reads the kernel's ring buffer, before it reads the
// next record: no copy, no channel hand-off, the cheapest way to consume
// events. fn must be quick and must not block or call stop: while it runs,
// records wait in the kernel, and those that find the ring buffer full are
// lost (counted in Stats.EventsLost). *T is valid only during the call.
// After stop returns, fn is not called again; stop is idempotent.
func SubscribeFunc[T any](s *Session, fn func(*T)) (stop func(), err error) {
	select {
	case <-s.done:
		return nil, ErrClosed
	default:
	}
	sub, err := probes.SubscribeFunc(s.bus, fn)
	if err != nil {
		return nil, fmt.Errorf("flowmill: %w", err)
	}
	return sub.Close, nil
}

// Events is the subscription's channel. It is closed by Close or when the
// session ends.
func (s *Subscription[T]) Events() <-chan T { return s.sub.C() }

// Dropped counts the events this subscription missed because its channel
// was full.
func (s *Subscription[T]) Dropped() uint64 { return s.sub.Dropped() }

// Close ends the subscription and closes its channel. It is idempotent.
func (s *Subscription[T]) Close() { s.sub.Close() }
