package probe

import (
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
)

// Bus routes typed events from probes to subscribers. There is one topic per
// event type.
type Bus struct {
	mu       sync.Mutex
	topics   map[reflect.Type]topic
	services map[reflect.Type]any // see Provide
	closed   bool
	drops    atomic.Uint64
}

type topic interface{ close() }

// NewBus returns an empty bus.
func NewBus() *Bus { return &Bus{topics: make(map[reflect.Type]topic)} }

func topicOf[T any](b *Bus, create bool) *Topic[T] {
	b.mu.Lock()
	defer b.mu.Unlock()
	key := reflect.TypeFor[T]()
	if t, ok := b.topics[key]; ok {
		return t.(*Topic[T])
	}
	if !create {
		return nil
	}
	t := &Topic[T]{closed: b.closed, drops: &b.drops}
	b.topics[key] = t
	return t
}

// Produce declares that the caller publishes events of type T and returns
// their topic.
func Produce[T any](b *Bus) *Topic[T] {
	t := topicOf[T](b, true)
	t.produced.Store(true)
	return t
}

// Subscribe adds a subscriber with a channel buffer of size buf to the topic
// of T. It fails when no attached probe produces T.
func Subscribe[T any](b *Bus, buf int) (*Sub[T], error) {
	t, err := produced[T](b)
	if err != nil {
		return nil, err
	}
	return t.subscribe(&Sub[T]{c: make(chan T, buf)}), nil
}

func produced[T any](b *Bus) (*Topic[T], error) {
	t := topicOf[T](b, false)
	if t == nil || !t.produced.Load() {
		return nil, fmt.Errorf("no probe in this session produces %v: add its family with flowmill.WithProbes", reflect.TypeFor[T]())
	}
	return t, nil
}

// SubscribeFunc adds a subscriber that is handed each event of type T by a
// call of fn, on the publisher's goroutine, with the topic locked: fn must
// be quick, must not block, must not keep v after it returns, and must not
// close its own subscription. After Close returns, fn is not called again.
// It fails when no attached probe produces T.
func SubscribeFunc[T any](b *Bus, fn func(v *T)) (*Sub[T], error) {
	t, err := produced[T](b)
	if err != nil {
		return nil, err
	}
	return t.subscribe(&Sub[T]{fn: fn}), nil
}

// Dropped counts the events all subscribers of this bus missed, including
// subscribers that have since closed.
func (b *Bus) Dropped() uint64 { return b.drops.Load() }

// Close closes every topic: subscribers' channels are closed.
func (b *Bus) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for _, t := range b.topics {
		t.close()
	}
}

// Topic fans events of one type out to subscribers. Publishing never blocks:
// a subscriber whose buffer is full misses the event, and the miss is
// counted on that subscriber.
type Topic[T any] struct {
	produced atomic.Bool
	n        atomic.Int32 // len(subs), read without the lock
	mu       sync.Mutex
	subs     []*Sub[T]
	closed   bool
	drops    *atomic.Uint64 // the bus's total
	scratch  T              // what function subscribers are handed; guarded by mu
}

// Active reports whether anyone subscribes; producers may skip decoding
// when nobody does.
func (t *Topic[T]) Active() bool { return t.n.Load() > 0 }

// Publish hands v to every subscriber without blocking.
func (t *Topic[T]) Publish(v *T) {
	if t.n.Load() == 0 {
		return
	}
	t.mu.Lock()
	for _, s := range t.subs {
		if s.fn != nil {
			// A copy in the topic, so that v does not escape (and
			// the publisher's event needs no allocation).
			t.scratch = *v
			s.fn(&t.scratch)
			continue
		}
		select {
		case s.c <- *v:
		default:
			s.dropped.Add(1)
			t.drops.Add(1)
		}
	}
	t.mu.Unlock()
}

func (t *Topic[T]) subscribe(s *Sub[T]) *Sub[T] {
	s.t = t
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		s.end()
		return s
	}
	t.subs = append(t.subs, s)
	t.n.Store(int32(len(t.subs)))
	return s
}

func (t *Topic[T]) remove(s *Sub[T]) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s.done {
		return
	}
	for i, x := range t.subs {
		if x == s {
			t.subs = append(t.subs[:i:i], t.subs[i+1:]...)
			break
		}
	}
	t.n.Store(int32(len(t.subs)))
	s.end()
}

func (t *Topic[T]) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for _, s := range t.subs {
		s.end()
	}
	t.subs = nil
	t.n.Store(0)
}

// Sub is one subscriber of a topic: a channel, or a function.
type Sub[T any] struct {
	c       chan T
	fn      func(*T)
	t       *Topic[T]
	dropped atomic.Uint64
	done    bool // guarded by t.mu
}

// end marks s unsubscribed and closes its channel; t.mu is held.
func (s *Sub[T]) end() {
	s.done = true
	if s.c != nil {
		close(s.c)
	}
}

// C is the subscriber's channel; it is closed by Close or when the session
// ends. It is nil for a function subscriber.
func (s *Sub[T]) C() <-chan T { return s.c }

// Dropped counts events this subscriber missed because its buffer was full.
func (s *Sub[T]) Dropped() uint64 { return s.dropped.Load() }

// Close unsubscribes and closes the channel. It is idempotent.
func (s *Sub[T]) Close() { s.t.remove(s) }
