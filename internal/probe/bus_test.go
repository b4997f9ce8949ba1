package probe

import (
	"sync"
	"testing"
)

type ev struct{ n int }

func TestBus(t *testing.T) {
	b := NewBus()
	if _, err := Subscribe[ev](b, 1); err == nil {
		t.Fatal("subscribed to a type nobody produces")
	}
	if _, err := SubscribeFunc(b, func(*ev) {}); err == nil {
		t.Fatal("subscribed a function to a type nobody produces")
	}
	topic := Produce[ev](b)
	if topic.Active() {
		t.Fatal("active without subscribers")
	}
	ch, _ := Subscribe[ev](b, 2)
	var got []int
	fn, _ := SubscribeFunc(b, func(e *ev) { got = append(got, e.n) })
	for i := range 5 {
		topic.Publish(&ev{i})
	}
	if len(got) != 5 || got[4] != 4 {
		t.Errorf("function subscriber got %v", got)
	}
	if ch.Dropped() != 3 || b.Dropped() != 3 || len(ch.C()) != 2 || (<-ch.C()).n != 0 {
		t.Errorf("channel subscriber: dropped %d (bus %d), buffered %d", ch.Dropped(), b.Dropped(), len(ch.C()))
	}
	fn.Close()
	fn.Close()
	topic.Publish(&ev{9})
	if len(got) != 5 {
		t.Errorf("function called after Close: %v", got)
	}
	b.Close()
	var rest []int
	for e := range ch.C() { // buffered events survive the close
		rest = append(rest, e.n)
	}
	if len(rest) != 2 || rest[0] != 1 || rest[1] != 9 {
		t.Errorf("after the bus closed the channel held %v, want [1 9]", rest)
	}
	late, _ := Subscribe[ev](b, 1)
	if _, ok := <-late.C(); ok {
		t.Error("a subscription after Close has an open channel")
	}
}

// Publishing, subscribing and closing from many goroutines at once.
func TestBusConcurrent(t *testing.T) {
	b := NewBus()
	topic := Produce[ev](b)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range 1000 {
				topic.Publish(&ev{i})
			}
		})
		wg.Go(func() {
			for range 100 {
				s, _ := Subscribe[ev](b, 1)
				f, _ := SubscribeFunc(b, func(*ev) {})
				s.Close()
				f.Close()
			}
		})
	}
	wg.Wait()
	b.Close()
}
