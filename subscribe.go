package flowmill

import (
	"fmt"

	"github.com/flowmill/flowmill/internal/probe"
)

// Subscription delivers events of type T. Its channel never blocks the
// session: when it is full, new events are dropped and counted in Dropped.
type Subscription[T any] struct {
	sub *probe.Sub[T]
}

// SubscribeOption configures Subscribe.
type SubscribeOption func(*subConfig)

type subConfig struct {
	buf  int
	errs []error
}

// maxBuffer bounds channel capacities: beyond it a channel of large
// events would take gigabytes.
const maxBuffer = 1 << 22

// WithBuffer sets the channel capacity, from 1 to 4194304 (default 4096).
// A larger buffer absorbs longer pauses of the consumer before events are
// dropped. To handle events without a channel, use SubscribeFunc.
func WithBuffer(n int) SubscribeOption {
	return func(c *subConfig) {
		if n < 1 || n > maxBuffer {
			c.errs = append(c.errs, fmt.Errorf("WithBuffer(%d): must be between 1 and %d (use SubscribeFunc to handle events without a channel)", n, maxBuffer))
			return
		}
		c.buf = n
	}
}

// Subscribe starts delivering the session's events of type T, such as
// tcp.ConnClosed. Made before Session.Start, a subscription sees every
// event from the first one. It fails if no probe of the session produces
// T, if an option is invalid (ErrInvalidOption) or if the session is
// closed (ErrClosed).
func Subscribe[T any](s *Session, opts ...SubscribeOption) (*Subscription[T], error) {
	c := subConfig{buf: 4096}
	for _, o := range opts {
		if o == nil {
			c.errs = append(c.errs, fmt.Errorf("a SubscribeOption is nil"))
			continue
		}
		o(&c)
	}
	if len(c.errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, c.errs[0])
	}
	select {
	case <-s.done:
		return nil, ErrClosed
	default:
	}
	sub, err := probe.Subscribe[T](s.bus, c.buf)
	if err != nil {
		return nil, fmt.Errorf("flowmill: %w", err)
	}
	return &Subscription[T]{sub: sub}, nil
}

// SubscribeFunc calls fn with each of the session's events of type T, on
// the goroutine that publishes it, before that goroutine goes on: no copy,
// no channel hand-off, the cheapest way to consume events. Events read
// from a kernel ring buffer (tcp.ConnOpened, http.ServerRequest, ...) are
// published by the session's reader of that ring; periodic ones
// (tcp.ConnStats, syscalls.Counts) by their family's poller: each event
// type's documentation says which. fn must be quick and must not block,
// call stop, or call back into the session or a probe (Session.Close,
// syscalls.Probe.Snapshot): while it runs, records wait in the kernel, and
// those that find the ring buffer full are lost (counted in
// Stats.EventsLost). *T is valid only during the call. Made before
// Session.Start, it sees every event from the first one. After stop
// returns, fn is not called again; stop is idempotent.
func SubscribeFunc[T any](s *Session, fn func(*T)) (stop func(), err error) {
	if fn == nil {
		return nil, fmt.Errorf("%w: SubscribeFunc: fn is nil", ErrInvalidOption)
	}
	select {
	case <-s.done:
		return nil, ErrClosed
	default:
	}
	sub, err := probe.SubscribeFunc(s.bus, fn)
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
