package flowmill_test

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/tcp"
)

func start(t *testing.T, ctx context.Context) *flowmill.Session {
	t.Helper()
	testutil.RequireBPF(t)
	s, err := flowmill.Start(ctx, flowmill.WithProbes(tcp.New()))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

func TestStartWithoutProbes(t *testing.T) {
	if _, err := flowmill.Start(context.Background()); err == nil {
		t.Fatal("Start without probes succeeded")
	}
	if _, err := flowmill.Start(context.Background(), flowmill.WithProbes(tcp.New()), flowmill.WithRingBufferSize(5000)); err == nil {
		t.Fatal("Start with a ring buffer size that is not a power of two succeeded")
	}
}

// Close is idempotent and safe from many goroutines at once; it closes the
// subscriptions' channels.
func TestCloseConcurrent(t *testing.T) {
	s := start(t, context.Background())
	sub, err := flowmill.Subscribe[tcp.ConnClosed](s)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = s.Close() })
	}
	wg.Wait()
	for _, err := range errs {
		if err != errs[0] {
			t.Errorf("Close returned %v and %v", errs[0], err)
		}
	}
	if errs[0] != nil {
		t.Errorf("Close: %v", errs[0])
	}
	if _, ok := <-sub.Events(); ok {
		t.Error("subscription channel still open after Close")
	}
	sub.Close() // after the session: still fine
	if _, err := flowmill.Subscribe[tcp.ConnOpened](s); !errors.Is(err, flowmill.ErrClosed) {
		t.Errorf("Subscribe after Close: %v, want ErrClosed", err)
	}
	if _, err := s.Stats(); err != nil {
		t.Errorf("Stats after Close: %v, want the final counts", err)
	}
}

// The session ends with its context.
func TestContextEndsSession(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s := start(t, ctx)
	cancel()
	select {
	case <-s.Done():
	case <-time.After(testutil.Timeout(5 * time.Second)):
		t.Fatal("session still running after its context was cancelled")
	}
}

// Subscribing to a type no probe of the session produces is an error that
// says what to do.
func TestSubscribeUnproduced(t *testing.T) {
	s := start(t, context.Background())
	type other struct{}
	if _, err := flowmill.Subscribe[other](s); err == nil {
		t.Fatal("Subscribe to an unproduced type succeeded")
	}
	st, err := s.Stats()
	if err != nil || st.EventsLost != 0 {
		t.Fatalf("Stats: %+v, %v", st, err)
	}
}

// Close delivers the events the kernel produced before it was called, even
// when the reader has not been woken for them yet.
func TestCloseDeliversPending(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.Start(context.Background(), flowmill.WithProbes(tcp.New()), flowmill.WithMaxLatency(time.Hour))
	testutil.CheckStart(t, err)
	t.Cleanup(func() { s.Close() })
	closed, err := flowmill.Subscribe[tcp.ConnClosed](s)
	if err != nil {
		t.Fatal(err)
	}
	c, sc := connect(t, listen(t))
	c.Close()
	sc.Close()
	time.Sleep(100 * time.Millisecond) // both sockets destroyed; records wait in the ring
	if len(closed.Events()) != 0 {
		t.Fatal("events delivered before a wake-up or a drain: the test proves nothing")
	}
	s.Close()
	n := 0
	for range closed.Events() {
		n++
	}
	if n != 2 {
		t.Errorf("Close delivered %d close events, want 2", n)
	}
}

// A function subscriber sees the same events as a channel subscriber, and
// none after stop.
func TestSubscribeFunc(t *testing.T) {
	s := start(t, context.Background())
	var mu sync.Mutex
	var ports []int
	stop, err := flowmill.SubscribeFunc(s, func(e *tcp.ConnClosed) {
		mu.Lock()
		ports = append(ports, int(e.Local.Port()))
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	ch, _ := flowmill.Subscribe[tcp.ConnClosed](s)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	c, _ := net.Dial("tcp4", ln.Addr().String())
	c.Close()
	want := c.LocalAddr().(*net.TCPAddr).Port
	for e := range ch.Events() {
		if int(e.Local.Port()) == want {
			break
		}
	}
	stop()
	stop()
	mu.Lock()
	n := len(ports)
	found := slices.Contains(ports, want)
	mu.Unlock()
	if !found {
		t.Fatalf("function subscriber did not see port %d: %v", want, ports)
	}
	c, _ = net.Dial("tcp4", ln.Addr().String())
	c.Close()
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if len(ports) != n {
		t.Errorf("called after stop: %v", ports[n:])
	}
}

// A subscription made between New and Start sees the session's first
// connection, and Stats after Close are the final counts.
func TestSubscribeBeforeStart(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.New(flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(0))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	opened, err := flowmill.Subscribe[tcp.ConnOpened](s)
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t)
	testutil.CheckStart(t, s.Start(t.Context()))
	if err := s.Start(t.Context()); err == nil {
		t.Error("a second Start succeeded")
	}
	c, sc := connect(t, ln)
	sc.Close()
	c.Close()
	select {
	case e := <-opened.Events():
		if e.Local != c.LocalAddr().(*net.TCPAddr).AddrPort() && e.Remote != c.LocalAddr().(*net.TCPAddr).AddrPort() {
			t.Errorf("first event %+v is not the connection from %v", e, c.LocalAddr())
		}
	case <-time.After(testutil.Timeout(5 * time.Second)):
		t.Fatal("no ConnOpened")
	}
	before, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := s.Stats()
	if err != nil {
		t.Fatalf("Stats after Close: %v", err)
	}
	if after.EventsRead < before.EventsRead || after.EventsRead == 0 {
		t.Errorf("EventsRead after Close %d, before %d", after.EventsRead, before.EventsRead)
	}
}

// listen listens on a loopback port until the test ends.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// connect makes one connection to ln and returns both of its ends.
func connect(t *testing.T, ln net.Listener) (client, server net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c, sc
}
