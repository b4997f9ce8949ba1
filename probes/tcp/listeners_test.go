//go:build linux

package tcp_test

import (
	"bufio"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/tcp"
)

// listenerProc is a listening process (testprog.TCPListener).
type listenerProc struct {
	cmd    *exec.Cmd
	addr   netip.AddrPort
	send   func(line string)
	closed chan struct{} // closed when it reports its listener closed
}

// acceptance is a connection a listenerProc accepted.
type acceptance struct {
	pid    int
	remote netip.AddrPort
}

// startListener starts a listening process on addr and returns once it
// listens; the connections it accepts are sent on accepted. It is stopped in
// t.Cleanup.
func startListener(t *testing.T, bin, addr string, reuseport bool, accepted chan<- acceptance) *listenerProc {
	t.Helper()
	args := []string{"-addr", addr}
	if reuseport {
		args = append(args, "-reuseport")
	}
	cmd := exec.Command(bin, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close() // it exits at the end of its input
		if err := cmd.Wait(); err != nil {
			t.Errorf("listener %d: %v: %s", cmd.Process.Pid, err, stderr.String())
		}
	})
	l := &listenerProc{cmd: cmd, closed: make(chan struct{})}
	l.send = func(line string) {
		if _, err := stdin.Write([]byte(line + "\n")); err != nil {
			t.Errorf("listener %d: %v", cmd.Process.Pid, err)
		}
	}
	sc := bufio.NewScanner(stdout)
	if !sc.Scan() {
		t.Fatalf("listener on %s did not start: %s", addr, stderr.String())
	}
	a, ok := strings.CutPrefix(sc.Text(), "listening ")
	if l.addr, err = netip.ParseAddrPort(a); !ok || err != nil {
		t.Fatalf("listener on %s said %q", addr, sc.Text())
	}
	go func() {
		for sc.Scan() {
			if r, ok := strings.CutPrefix(sc.Text(), "accepted "); ok {
				accepted <- acceptance{cmd.Process.Pid, netip.MustParseAddrPort(r)}
			} else if sc.Text() == "closed" {
				close(l.closed)
			}
		}
	}()
	return l
}

// close closes the process's listening socket; the process stays.
func (l *listenerProc) close(t *testing.T) {
	t.Helper()
	l.send("close")
	select {
	case <-l.closed:
	case <-time.After(testutil.Timeout(10 * time.Second)):
		t.Fatalf("listener %d did not close", l.cmd.Process.Pid)
	}
}

// Listening sockets that share a port, at different addresses or in a
// SO_REUSEPORT group, in different processes: every accepted connection
// belongs to the process whose socket accepted it, also after one of them
// closed. One listener of the group listens before the session starts
// (found through /proc), the others after.
func TestListenerAttribution(t *testing.T) {
	testutil.RequireBPF(t)
	bin := testutil.Program(t, testprog.TCPListener)
	accepted := make(chan acceptance, 64)
	early := startListener(t, bin, "127.0.0.1:0", true, accepted)
	s := startSession(t, flowmill.WithHostScope(), flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(0))))
	opened := subscribe[tcp.ConnOpened](t, s)

	// connect makes n connections to addr and checks that the server side
	// of each is attributed to the process that accepted it, one of want.
	// It returns how many each accepted.
	connect := func(t *testing.T, addr netip.AddrPort, n int, want ...*listenerProc) map[int]int {
		t.Helper()
		pids := map[int]bool{}
		for _, l := range want {
			pids[l.cmd.Process.Pid] = true
		}
		byPID := map[int]int{}
		for range n {
			c, err := net.Dial("tcp4", addr.String())
			if err != nil {
				t.Fatal(err)
			}
			local := c.LocalAddr().(*net.TCPAddr).AddrPort()
			var a acceptance
			select {
			case a = <-accepted:
			case <-time.After(testutil.Timeout(10 * time.Second)):
				t.Fatalf("no listener accepted the connection from %v to %v", local, addr)
			}
			if a.remote != local || !pids[a.pid] {
				t.Fatalf("process %d accepted %v; want %v accepted by one of %v", a.pid, a.remote, local, pids)
			}
			// Other processes' connections (host scope) may come from the
			// same port, to other servers.
			e := waitFor(t, opened, "the accepted side of "+local.String(), func(e *tcp.ConnOpened) bool {
				return e.Role == tcp.RoleServer && e.Remote == local && e.Local == addr
			})
			if int(e.PID) != a.pid {
				t.Errorf("connection %v -> %v accepted by process %d: reported for process %d (%s) on %v", local, addr, a.pid, e.PID, e.Comm, e.Local)
			}
			byPID[a.pid]++
			c.Close()
		}
		return byPID
	}

	t.Run("addresses", func(t *testing.T) {
		one := startListener(t, bin, "127.0.0.1:0", false, accepted)
		port := one.addr.Port()
		two := startListener(t, bin, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port).String(), false, accepted)
		for range 2 {
			connect(t, one.addr, 3, one)
			connect(t, two.addr, 3, two)
		}
		one.close(t)
		connect(t, two.addr, 3, two)
	})

	t.Run("reuseport", func(t *testing.T) {
		late := startListener(t, bin, early.addr.String(), true, accepted)
		n := connect(t, early.addr, 16, early, late)
		t.Logf("accepted by process: %v", n)
		late.close(t)
		if n := connect(t, early.addr, 4, early); n[early.cmd.Process.Pid] != 4 {
			t.Errorf("after the other closed, the listener of process %d accepted %v", early.cmd.Process.Pid, n)
		}
	})
}
