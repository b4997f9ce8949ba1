// Package testutil holds helpers shared by flowmill's tests.
package testutil

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testprog"
)

// Required reports whether privileged tests must run (FLOWMILL_REQUIRE_BPF=1,
// set in CI): then a test that cannot run fails instead of skipping.
func Required() bool { return os.Getenv("FLOWMILL_REQUIRE_BPF") == "1" }

// RequireBPF skips t, with the reason, when the process is not root; with
// FLOWMILL_REQUIRE_BPF=1 it fails t instead.
func RequireBPF(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root to load eBPF programs (run the tests with sudo)")
	}
}

// Unavailable skips t with reason, or fails it when FLOWMILL_REQUIRE_BPF=1.
func Unavailable(t testing.TB, reason string, args ...any) {
	t.Helper()
	if Required() {
		t.Fatalf("FLOWMILL_REQUIRE_BPF=1 but the test cannot run: "+reason, args...)
	}
	t.Skipf("skipped: "+reason, args...)
}

// CheckStart handles an error from starting a session or attaching a probe:
// a missing privilege or kernel feature skips (or fails, see Unavailable);
// any other error fails the test.
func CheckStart(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	for _, e := range []error{probe.ErrPermission, probe.ErrNoBTF, probe.ErrNotSupported, probe.ErrMissingHook} {
		if errors.Is(err, e) {
			Unavailable(t, "%v", err)
		}
	}
	t.Fatalf("start: %v", err)
}

// Program returns the path of test program p (see testprog), built into a
// directory removed in t.Cleanup.
func Program(t testing.TB, p testprog.Program) string {
	t.Helper()
	bin, err := testprog.Build(p, t.TempDir())
	if err != nil {
		t.Fatalf("building a test program: %v", err)
	}
	return bin
}

// Need skips (or fails) t when a command the test drives is not installed.
func Need(t testing.TB, lookPath func(string) (string, error), cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if _, err := lookPath(c); err != nil {
			Unavailable(t, "needs %s on PATH (.ci/run installs it)", c)
		}
	}
}

// Transfer sends n bytes over a fresh IPv4 loopback connection between a
// client and a server of the calling process, and returns the server's
// port and both connections, still open. Everything is closed in
// t.Cleanup.
func Transfer(t testing.TB, n int) (port int, client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	client, err = net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, ok := <-accepted
	if !ok {
		t.Fatal("accepting the loopback connection failed")
	}
	t.Cleanup(func() { server.Close() })
	errc := make(chan error, 1)
	go func() { _, err := client.Write(make([]byte, n)); errc <- err }()
	if _, err := io.ReadFull(server, make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return ln.Addr().(*net.TCPAddr).Port, client, server
}

// StartExample builds the example program p (see testprog), starts it with
// args and the extra environment env, and waits until a line of its
// standard error matches ready; it returns the submatches. The process is
// interrupted (and killed after 10s) in t.Cleanup; stop it earlier with
// Example.Stop.
func StartExample(t testing.TB, p testprog.Program, ready *regexp.Regexp, env []string, args ...string) (*Example, []string) {
	t.Helper()
	bin := Program(t, p)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e := &Example{cmd: cmd, exited: make(chan struct{})}
	t.Cleanup(func() { e.Stop() })
	found := make(chan []string, 1)
	go func(out chan<- []string) {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if out != nil {
				if m := ready.FindStringSubmatch(sc.Text()); m != nil {
					out <- m
					out = nil
				}
			}
			e.mu.Lock()
			e.log = append(e.log, sc.Text())
			e.mu.Unlock()
		}
		e.err = cmd.Wait()
		close(e.exited)
	}(found)
	select {
	case m := <-found:
		return e, m
	case <-e.exited:
		select {
		case m := <-found:
			return e, m
		default:
		}
		t.Fatalf("the example exited before it was ready: %v\n%s", e.err, e.Log())
	case <-time.After(30 * time.Second):
		t.Fatalf("the example was not ready within 30s:\n%s", e.Log())
	}
	return nil, nil
}

// Example is a running example program.
type Example struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // of Wait, once exited is closed

	mu  sync.Mutex
	log []string
}

// Stop interrupts the example, waits for it to exit (killing it after
// 10s) and returns its exit error. It is idempotent.
func (e *Example) Stop() error {
	_ = e.cmd.Process.Signal(os.Interrupt)
	select {
	case <-e.exited:
	case <-time.After(10 * time.Second):
		_ = e.cmd.Process.Kill()
		<-e.exited
	}
	return e.err
}

// Log is what the example wrote on standard error so far.
func (e *Example) Log() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.log, "\n")
}

// Timeout scales a test's deadline d by $FLOWMILL_TEST_TIMEOUT_SCALE
// (default 1): the kernel matrix runs the tests under emulation, many
// times slower (as Go's own tests use GO_TEST_TIMEOUT_SCALE on slow
// builders). Only deadlines scale; the windows in which nothing more may
// arrive do not need to.
func Timeout(d time.Duration) time.Duration {
	if s, err := strconv.ParseFloat(os.Getenv("FLOWMILL_TEST_TIMEOUT_SCALE"), 64); err == nil && s > 1 {
		return time.Duration(float64(d) * s)
	}
	return d
}
