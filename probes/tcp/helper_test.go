//go:build linux

package tcp_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/tcp"
)

// The test binary doubles as a separate client process: with
// FLOWMILL_TCP_HELPER=client it connects to FLOWMILL_ADDR, sends
// FLOWMILL_SEND bytes, reads until EOF, and exits.
func TestMain(m *testing.M) {
	switch os.Getenv("FLOWMILL_TCP_HELPER") {
	case "client-wait":
		// Wait for a line on stdin (the test moves us into a cgroup
		// first), then behave as "client".
		bufio.NewReader(os.Stdin).ReadString('\n')
		fallthrough
	case "client":
		n, _ := strconv.Atoi(os.Getenv("FLOWMILL_SEND"))
		c, err := net.Dial("tcp", os.Getenv("FLOWMILL_ADDR"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if _, err := c.Write(make([]byte, n)); err != nil {
			os.Exit(3)
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
		os.Exit(0)
	case "netns":
		// In a network namespace of our own (the test starts us so):
		// bring up lo, open a connection to ourselves, send
		// FLOWMILL_SEND bytes on it, say "ready" and wait for stdin.
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "ip link set lo up: %v: %s", err, out)
			os.Exit(2)
		}
		n, _ := strconv.Atoi(os.Getenv("FLOWMILL_SEND"))
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		go func() {
			c, err := ln.Accept()
			if err == nil {
				io.Copy(io.Discard, c)
			}
		}()
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		c.Write(make([]byte, n))
		fmt.Println("ready")
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(0)
	case "start":
		// Unprivileged: report whether Start fails with ErrPermission.
		_, err := flowmill.Start(context.Background(), flowmill.WithProbes(tcp.New()))
		fmt.Println(err)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startSession starts a session for the test and closes it in Cleanup.
func startSession(t *testing.T, opts ...flowmill.Option) *flowmill.Session {
	t.Helper()
	testutil.RequireBPF(t)
	s, err := flowmill.Start(context.Background(), opts...)
	testutil.CheckStart(t, err)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// stream is a subscription whose events a test can wait for in any order.
type stream[T any] struct {
	s     *flowmill.Session
	sub   *flowmill.Subscription[T]
	stash []T // read but not yet matched
}

func subscribe[T any](t *testing.T, s *flowmill.Session) *stream[T] {
	t.Helper()
	sub, err := flowmill.Subscribe[T](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	return &stream[T]{s: s, sub: sub}
}

// Events is the subscription's channel, for tests that read it directly.
func (s *stream[T]) Events() <-chan T { return s.sub.Events() }

// waitFor returns the first event, read earlier or now, that matches, or
// fails after a timeout. Events that do not match are kept for later calls.
func waitFor[T any](t *testing.T, s *stream[T], what string, match func(*T) bool) T {
	t.Helper()
	for i := range s.stash {
		if match(&s.stash[i]) {
			e := s.stash[i]
			s.stash = append(s.stash[:i], s.stash[i+1:]...)
			return e
		}
	}
	timeout := time.After(testutil.Timeout(10 * time.Second))
	for {
		select {
		case e, ok := <-s.sub.Events():
			if !ok {
				t.Fatalf("subscription closed while waiting for %s", what)
			}
			if match(&e) {
				return e
			}
			s.stash = append(s.stash, e)
		case <-timeout:
			st, err := s.s.Stats()
			t.Fatalf("timed out waiting for %s (session stats %+v, %v)", what, st, err)
		}
	}
}

// transfer runs one connection to ln: the client sends up bytes and then
// half-closes, the server replies with down bytes and closes. It returns the
// client's and the server's local addresses.
func transfer(t *testing.T, network string, ln net.Listener, up, down int) (client, server net.Addr) {
	t.Helper()
	srvAddr := make(chan net.Addr, 1)
	errc := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		srvAddr <- c.RemoteAddr()
		n, err := io.Copy(io.Discard, c)
		if err == nil && n != int64(up) {
			err = fmt.Errorf("server read %d bytes, want %d", n, up)
		}
		if err == nil {
			_, err = c.Write(make([]byte, down))
		}
		errc <- err
	}()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, up)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != int64(down) {
		t.Fatalf("client read %d bytes (%v), want %d", n, err, down)
	}
	c.Close()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	<-srvAddr
	return c.LocalAddr(), ln.Addr()
}

func listen(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		if network == "tcp6" {
			testutil.Unavailable(t, "no IPv6 loopback: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func port(a net.Addr) uint16 { return uint16(a.(*net.TCPAddr).Port) }

// helperClient runs the test binary as a separate client process.
func helperClient(t *testing.T, addr string, send int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "FLOWMILL_TCP_HELPER=client", "FLOWMILL_ADDR="+addr, "FLOWMILL_SEND="+strconv.Itoa(send))
	cmd.Stderr = os.Stderr
	return cmd
}
