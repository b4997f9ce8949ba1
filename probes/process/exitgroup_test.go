//go:build linux

package process_test

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/probes/process"
)

// exitGroupEnv makes the test binary, started again by
// TestExitGroupOneExit, a helper process instead of running the tests: it
// starts that many threads and calls exit_group(2) while they run. No
// helper to build: the test binary is already there, also where no
// compiler is (a test VM).
const exitGroupEnv = "FLOWMILL_TEST_EXIT_GROUP_THREADS"

// exitGroupCode is the helper's exit status.
const exitGroupCode = 7

func TestMain(m *testing.M) {
	if v := os.Getenv(exitGroupEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "%s=%q: want a thread count\n", exitGroupEnv, v)
			os.Exit(2)
		}
		exitGroupHelper(n)
	}
	os.Exit(m.Run())
}

// exitGroupHelper runs n threads spinning, each pinned to a CPU (round
// robin), and once all run, exits the process with os.Exit, which is
// exit_group(2): the kernel kills the other threads, and they pass
// sched_process_exit concurrently with the caller, on every CPU.
func exitGroupHelper(n int) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil || cpus < 1 {
		cpus = 1
	}
	runtime.GOMAXPROCS(n + 1)
	pin := func(cpu int) {
		runtime.LockOSThread()
		var set unix.CPUSet
		set.Set(cpu % cpus)
		_ = unix.SchedSetaffinity(0, &set) // fails for an offline CPU: then it runs anywhere
	}
	var ready sync.WaitGroup
	ready.Add(n)
	for i := range n {
		go func() {
			pin(i)
			ready.Done()
			for {
			}
		}()
	}
	pin(n)
	ready.Wait()
	os.Exit(exitGroupCode)
}

// TestExitGroupOneExit runs multi-threaded processes that end with
// exit_group while their threads run: each is reported by exactly one Exit,
// with its exit status, whichever of its threads passes the tracepoint
// first. Host scope: in process scope, leaving the tracked tree also hides
// most later threads, which would mask a duplicate. The race it guards
// against is rare (the last threads must pass the tracepoint at the same
// moment): the test cannot prove its absence, only catch it sometimes.
func TestExitGroupOneExit(t *testing.T) {
	s := start(t, flowmill.WithHostScope())
	const procs, threads = 8, 16
	var pids []uint32
	var cmds []*exec.Cmd
	for range procs {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", exitGroupEnv, threads))
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		pids = append(pids, uint32(cmd.Process.Pid))
	}
	for _, cmd := range cmds {
		err := cmd.Wait()
		if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != exitGroupCode {
			t.Fatalf("helper %d: %v, want exit status %d", cmd.Process.Pid, err, exitGroupCode)
		}
	}
	_, exits, _ := s.collect(t, pids...)

	byPID := make(map[uint32][]process.Exit)
	for _, e := range exits {
		byPID[e.PID] = append(byPID[e.PID], e)
	}
	for _, pid := range pids {
		got := byPID[pid]
		if len(got) != 1 {
			t.Errorf("process %d: %d exits, want exactly 1: %+v", pid, len(got), got)
			continue
		}
		if e := got[0]; e.ExitCode != exitGroupCode || e.Signal != 0 || e.PPID != uint32(os.Getpid()) {
			t.Errorf("process %d: exit %+v, want code %d, no signal, parent %d", pid, e, exitGroupCode, os.Getpid())
		}
	}
	st, err := s.s.Stats()
	if err != nil || st.EventsLost != 0 || st.Dropped != 0 {
		t.Errorf("stats %+v, %v: want no losses", st, err)
	}
	// Skips (Missed) are the kernel's; the second exit program covers
	// them (PT_EXIT_PROGRAMS), which the exits above show.
	t.Logf("%d hook hits skipped by the kernel", st.Missed)
}
