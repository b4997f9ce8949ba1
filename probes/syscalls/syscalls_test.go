//go:build linux

package syscalls_test

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/syscalls"
)

// buildSysloop builds the helper program into a temporary directory.
func buildSysloop(t *testing.T) string {
	t.Helper()
	return testutil.Program(t, testprog.SysLoop)
}

func start(t *testing.T, p *syscalls.Probe, opts ...flowmill.Option) *flowmill.Session {
	t.Helper()
	testutil.RequireBPF(t)
	held := testutil.OwnPrograms(t)
	s, err := flowmill.Start(context.Background(), append(opts, flowmill.WithProbes(p))...)
	testutil.CheckStart(t, err)
	ours := testutil.ProgramsSince(t, held)
	if len(ours) < 2 {
		t.Errorf("the session holds %d programs, want at least 2: %v", len(ours), ours)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second close: %v", err)
		}
		testutil.ProgramsGone(t, ours)
	})
	return s
}

func must(t *testing.T, name string) syscalls.Syscall {
	t.Helper()
	s, ok := syscalls.ByName(name)
	if !ok {
		t.Fatalf("no system call %q in the table", name)
	}
	return s
}

// TestCounts runs a helper that makes 1000 getpid and 300 openat calls
// once told to, and compares its counts before and after, and at its exit.
func TestCounts(t *testing.T) {
	const getpids, openats = 1000, 300
	bin := buildSysloop(t)
	p := syscalls.New(syscalls.WithInterval(50 * time.Millisecond))
	s := start(t, p)
	sub, err := flowmill.Subscribe[syscalls.Counts](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}
	getpid, openat, exitGroup := must(t, "getpid"), must(t, "openat"), must(t, "exit_group")

	cmd := exec.Command(bin, "1000", "300")
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	cmd.Stderr = os.Stderr
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := uint32(cmd.Process.Pid)
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	snap, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(snap, func(c syscalls.Counts) bool { return c.PID == pid })
	if i < 0 {
		t.Fatalf("helper %d not in the snapshot", pid)
	}
	before := snap[i]
	if before.Of(openat) == 0 || before.Exited {
		t.Errorf("helper before its calls: %+v: want its start-up openat calls and Exited unset", before)
	}
	in.Write([]byte("go\n"))
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}

	var final syscalls.Counts
	timeout := time.After(testutil.Timeout(5 * time.Second))
	for final.PID == 0 {
		select {
		case c := <-sub.Events():
			if c.PID == pid && c.Exited {
				final = c
			}
		case <-timeout:
			t.Fatal("no final Counts for the helper")
		}
	}
	if d := final.Of(getpid) - before.Of(getpid); d != getpids {
		t.Errorf("getpid: %d calls counted, want %d", d, getpids)
	}
	if d := final.Of(openat) - before.Of(openat); d != openats {
		t.Errorf("openat: %d calls counted, want %d", d, openats)
	}
	if final.Of(getpid) != getpids {
		t.Errorf("getpid: %d calls in all, want %d (the Go runtime makes none with asyncpreemptoff)", final.Of(getpid), getpids)
	}
	if final.Of(exitGroup) != 1 {
		t.Errorf("exit_group: %d, want 1", final.Of(exitGroup))
	}
	t.Logf("helper %d: %d distinct calls; getpid %d, openat %d (%d at start-up)", pid, len(final.Syscalls), final.Of(getpid), final.Of(openat), before.Of(openat))

	// The helper is gone from the next snapshot, and in the totals.
	snap, err = p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(snap, func(c syscalls.Counts) bool { return c.PID == pid }) {
		t.Errorf("helper %d still in the snapshot after its exit", pid)
	}
	totals, err := p.Totals()
	if err != nil {
		t.Fatal(err)
	}
	prof, unnamed := syscalls.SeccompProfile(totals)
	js, err := json.Marshal(prof)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		DefaultAction string
		Architectures []string
		Syscalls      []struct {
			Names  []string
			Action string
		}
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.DefaultAction != "SCMP_ACT_ERRNO" || !slices.Equal(doc.Architectures, []string{"SCMP_ARCH_X86_64"}) ||
		len(doc.Syscalls) != 1 || doc.Syscalls[0].Action != "SCMP_ACT_ALLOW" {
		t.Fatalf("profile: %s", js)
	}
	for _, n := range []string{"getpid", "openat", "close", "exit_group", "read", "write"} {
		if !slices.Contains(doc.Syscalls[0].Names, n) {
			t.Errorf("profile lacks %s: %s", n, js)
		}
	}
	if len(unnamed) > 0 {
		t.Logf("calls without a name: %v", unnamed)
	}
	if st, err := s.Stats(); err != nil || st.EventsLost != 0 {
		t.Errorf("stats %+v, %v: want no losses", st, err)
	}

	// After the session closed, Totals still answers; Snapshot does not.
	s.Close()
	after, err := p.Totals()
	if err != nil || len(after) < len(totals) {
		t.Errorf("totals after close: %d calls, %v", len(after), err)
	}
	if _, err := p.Snapshot(); err == nil {
		t.Error("snapshot after close: want an error")
	}
}

// TestScope scopes the session to a helper: the test's own calls are not
// counted.
func TestScope(t *testing.T) {
	bin := buildSysloop(t)
	cmd := exec.Command(bin, "5", "0")
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	bufio.NewReader(out).ReadString('\n')
	pid := cmd.Process.Pid

	p := syscalls.New()
	start(t, p, flowmill.WithProcessScope(pid))
	for range 100 {
		syscallGetpid()
	}
	in.Write([]byte("go\n"))
	cmd.Wait()
	totals, err := p.Totals()
	if err != nil {
		t.Fatal(err)
	}
	getpid := must(t, "getpid")
	for _, c := range totals {
		if c.Syscall == getpid && c.N != 5 {
			t.Errorf("getpid counted %d times, want the helper's 5 only", c.N)
		}
	}
}

// A function subscriber may read the kernel itself (Snapshot, Totals):
// Counts are published with no lock held.
func TestSnapshotFromSubscriber(t *testing.T) {
	p := syscalls.New(syscalls.WithInterval(20 * time.Millisecond))
	s := start(t, p)
	got := make(chan error, 1)
	stop, err := flowmill.SubscribeFunc(s, func(*syscalls.Counts) {
		_, err := p.Snapshot()
		if err == nil {
			_, err = p.Totals()
		}
		select {
		case got <- err:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	os.Getpid() // this process's counts change, so the next read publishes them
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Snapshot from a subscriber: %v", err)
		}
	case <-time.After(testutil.Timeout(5 * time.Second)):
		t.Fatal("no Counts, or Snapshot from the subscriber deadlocked")
	}
}
