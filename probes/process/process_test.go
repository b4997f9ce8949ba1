//go:build linux

package process_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/process"
)

// session starts a session with the process probe and subscriptions to
// Exec, Exit and Fork; everything is closed at the end of the test, and
// the test checks that the probe's programs are gone.
type session struct {
	s     *flowmill.Session
	execs *flowmill.Subscription[process.Exec]
	exits *flowmill.Subscription[process.Exit]
	forks *flowmill.Subscription[process.Fork]
}

func start(t *testing.T, opts ...flowmill.Option) *session {
	t.Helper()
	testutil.RequireBPF(t)
	held := testutil.OwnPrograms(t)
	opts = append(opts, flowmill.WithProbes(process.New()), flowmill.WithMaxLatency(10*time.Millisecond))
	s, err := flowmill.Start(context.Background(), opts...)
	testutil.CheckStart(t, err)
	ours := testutil.ProgramsSince(t, held)
	if len(ours) != 4 {
		t.Errorf("the session holds %d programs, want 4: %v", len(ours), ours)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := s.Close(); err != nil { // idempotent
			t.Errorf("second close: %v", err)
		}
		testutil.ProgramsGone(t, ours)
	})
	ss := &session{s: s}
	ss.execs, err = flowmill.Subscribe[process.Exec](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}
	ss.exits, err = flowmill.Subscribe[process.Exit](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}
	ss.forks, err = flowmill.Subscribe[process.Fork](s, flowmill.WithBuffer(1<<16))
	if err != nil {
		t.Fatal(err)
	}
	return ss
}

// run runs a command to completion and returns its PID.
func run(t *testing.T, name string, args ...string) uint32 {
	t.Helper()
	cmd := exec.Command(name, args...)
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("%s: %v", name, err)
	}
	return uint32(cmd.Process.Pid)
}

// collect gathers events until the exits of all pids are seen, then for a
// short grace period in which nothing else may arrive.
func (s *session) collect(t *testing.T, pids ...uint32) ([]process.Exec, []process.Exit, []process.Fork) {
	t.Helper()
	var execs []process.Exec
	var exits []process.Exit
	var forks []process.Fork
	want := make(map[uint32]bool)
	for _, p := range pids {
		want[p] = true
	}
	deadline := time.After(testutil.Timeout(10 * time.Second))
	var grace <-chan time.Time
	for {
		select {
		case e := <-s.execs.Events():
			execs = append(execs, e)
		case e := <-s.exits.Events():
			exits = append(exits, e)
			delete(want, e.PID)
			if len(want) == 0 && grace == nil {
				grace = time.After(200 * time.Millisecond)
			}
		case e := <-s.forks.Events():
			forks = append(forks, e)
		case <-grace:
			return execs, exits, forks
		case <-deadline:
			st, err := s.s.Stats()
			t.Fatalf("timed out waiting for the exits of %v (stats %+v, %v); got execs %+v exits %+v", want, st, err, execs, exits)
		}
	}
}

func TestExecExit(t *testing.T) {
	// The first process a Go program starts is preceded by a probe of
	// clone(CLONE_PIDFD) in a child that exits at once: let that happen
	// before the session starts.
	run(t, "/bin/true")
	s := start(t)
	me := uint32(os.Getpid())
	started := time.Now()
	sh := run(t, "/bin/sh", "-c", "exit 3")
	tru := run(t, "/bin/true", "a", "b", "c")
	execs, exits, forks := s.collect(t, sh, tru)

	if len(execs) != 2 {
		t.Fatalf("want exactly 2 execs, got %d: %+v", len(execs), execs)
	}
	checkExec(t, execs[0], sh, me, "/bin/sh", []string{"/bin/sh", "-c", "exit 3"}, "sh", started)
	checkExec(t, execs[1], tru, me, "/bin/true", []string{"/bin/true", "a", "b", "c"}, "true", started)

	if len(exits) != 2 {
		t.Fatalf("want exactly 2 exits, got %d: %+v", len(exits), exits)
	}
	checkExit(t, exits[0], sh, me, 3)
	checkExit(t, exits[1], tru, me, 0)

	if len(forks) != 2 || forks[0].ChildPID != sh || forks[1].ChildPID != tru || forks[0].PID != me || forks[1].PID != me {
		t.Errorf("want forks of %d and %d by %d, got %+v", sh, tru, me, forks)
	}
	st, err := s.s.Stats()
	if err != nil || st.EventsLost != 0 || st.Dropped != 0 {
		t.Errorf("stats %+v, %v: want no losses", st, err)
	}
}

func checkExec(t *testing.T, e process.Exec, pid, ppid uint32, file string, argv []string, comm string, after time.Time) {
	t.Helper()
	if e.PID != pid || e.TID != pid || e.PPID != ppid || e.Filename != file || !slices.Equal(e.Argv, argv) || e.ArgvTruncated || e.Comm != comm {
		t.Errorf("exec: got %+v, want pid %d ppid %d %s %q comm %s", e, pid, ppid, file, argv, comm)
	}
	if e.UID != uint32(os.Getuid()) || e.GID != uint32(os.Getgid()) || e.CgroupID == 0 {
		t.Errorf("exec: uid/gid/cgroup %d/%d/%d", e.UID, e.GID, e.CgroupID)
	}
	if e.Time.Before(after.Add(-time.Millisecond)) || e.Time.After(time.Now()) {
		t.Errorf("exec: time %v not within the test (started %v)", e.Time, after)
	}
}

func checkExit(t *testing.T, e process.Exit, pid, ppid uint32, code int) {
	t.Helper()
	if e.PID != pid || e.PPID != ppid || e.ExitCode != code || e.Signal != 0 || e.CoreDumped {
		t.Errorf("exit: got %+v, want pid %d ppid %d code %d", e, pid, ppid, code)
	}
	if e.Lifetime <= 0 || e.Lifetime > 5*time.Second {
		t.Errorf("exit: lifetime %v", e.Lifetime)
	}
}

func TestSignal(t *testing.T) {
	s := start(t)
	cmd := exec.Command("/bin/sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := uint32(cmd.Process.Pid)
	time.Sleep(50 * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	_, exits, _ := s.collect(t, pid)
	if len(exits) != 1 || exits[0].ExitCode != -1 || exits[0].Signal != 9 || exits[0].Lifetime < 50*time.Millisecond {
		t.Errorf("want one exit by SIGKILL after >= 50ms, got %+v", exits)
	}
}

// TestScope runs a shell as the scope process: its descendants (a grand
// child through a subshell) are reported, the test's own child is not.
func TestScope(t *testing.T) {
	testutil.RequireBPF(t)
	sh := exec.Command("/bin/sh", "-c", `read x; (/bin/true inner); exit 5`)
	in, err := sh.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sh.Process.Kill(); sh.Wait() })
	shPID := uint32(sh.Process.Pid)

	s := start(t, flowmill.WithProcessScope(int(shPID)))
	outside := run(t, "/bin/true", "outside")
	io.WriteString(in, "go\n")
	sh.Wait()
	execs, exits, forks := s.collect(t, shPID)

	var got []string
	for _, e := range execs {
		if e.PID == outside {
			t.Errorf("exec of a process outside the scope reported: %+v", e)
		}
		got = append(got, strings.Join(e.Argv, " "))
	}
	if !slices.Equal(got, []string{"/bin/true inner"}) {
		t.Errorf("execs: got %q, want only the descendant's", got)
	}
	// The subshell and true; dash may exec true in the subshell, so
	// there are one or two exits besides the scope shell's.
	var codes []string
	for _, e := range exits {
		if e.PID == outside {
			t.Errorf("exit of a process outside the scope reported: %+v", e)
		}
		codes = append(codes, fmt.Sprintf("%d:%d", e.PID, e.ExitCode))
	}
	if last := exits[len(exits)-1]; last.PID != shPID || last.ExitCode != 5 {
		t.Errorf("exits %v: want the scope shell's last, with code 5", codes)
	}
	if len(forks) == 0 || forks[0].PID != shPID {
		t.Errorf("forks %+v: want the shell's subshell", forks)
	}
}

// TestChurn runs thousands of short processes: every exec and exit is
// reported, or the losses are counted.
func TestChurn(t *testing.T) {
	s := start(t)
	n := 2000
	if testing.Short() {
		n = 200 // the kernel matrix: an exec takes ~100 times longer under emulation
	}
	pids := make([]uint32, 0, n)
	for i := range n {
		pids = append(pids, run(t, "/bin/true", fmt.Sprint(i)))
	}
	execs, exits, _ := s.collect(t, pids...)
	st, err := s.s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	lost := st.EventsLost + st.Dropped
	if uint64(len(execs))+lost < uint64(n) || uint64(len(exits))+lost < uint64(n) {
		t.Errorf("%d processes: %d execs, %d exits, %d losses counted", n, len(execs), len(exits), lost)
	}
	for i, e := range execs {
		if lost == 0 && (e.PID != pids[i] || e.Argv[1] != fmt.Sprint(i)) {
			t.Fatalf("exec %d: got %+v, want pid %d", i, e, pids[i])
		}
	}
	t.Logf("%d processes: %d execs, %d exits, %d lost, %d dropped", n, len(execs), len(exits), st.EventsLost, st.Dropped)
}
