//go:build linux

package testutil

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// OwnPrograms lists the eBPF programs this process holds a file descriptor
// to, directly or through a link (the "prog_id:" lines of
// /proc/self/fdinfo), each once. Unlike a global list, it
// is not disturbed by other tests or programs loading eBPF at the same time.
func OwnPrograms(t testing.TB) []ebpf.ProgramID {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fdinfo")
	if err != nil {
		t.Fatalf("listing file descriptors: %v", err)
	}
	var ids []ebpf.ProgramID
	for _, fd := range fds {
		f, err := os.Open(filepath.Join("/proc/self/fdinfo", fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "prog_id:"); ok {
				id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
				if err == nil && !slices.Contains(ids, ebpf.ProgramID(id)) {
					ids = append(ids, ebpf.ProgramID(id))
				}
			}
		}
		f.Close()
	}
	return ids
}

// ProgramsSince lists the programs this process holds now and did not hold
// in held (an earlier OwnPrograms): those a session started since loaded.
func ProgramsSince(t testing.TB, held []ebpf.ProgramID) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	for _, id := range OwnPrograms(t) {
		if !slices.Contains(held, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// ProgramsGone fails t unless every program in ids is unloaded within two
// seconds (the kernel frees programs after an RCU grace period).
func ProgramsGone(t testing.TB, ids []ebpf.ProgramID) {
	t.Helper()
	var left []ebpf.ProgramID
	for range 100 {
		left = left[:0]
		for _, id := range ids {
			if p, err := ebpf.NewProgramFromID(id); err == nil {
				p.Close()
				left = append(left, id)
			}
		}
		if len(left) == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("programs %v still loaded 2s after Close", left)
}

// RunStats returns, by program name, the run count and total run time the
// kernel measured for the programs in ids. Enable the measurement first
// with EnableRunStats.
func RunStats(t testing.TB, ids []ebpf.ProgramID) map[string]ebpf.ProgramStats {
	t.Helper()
	out := make(map[string]ebpf.ProgramStats)
	for _, id := range ids {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			t.Fatalf("program %d: %v", id, err)
		}
		info, err := p.Info()
		if err != nil {
			p.Close()
			t.Fatalf("program %d: %v", id, err)
		}
		st, err := p.Stats()
		p.Close()
		if err != nil {
			t.Fatalf("program %d: %v", id, err)
		}
		out[info.Name] = *st
	}
	return out
}

// EnableRunStats makes the kernel measure the run time of every eBPF
// program (what the sysctl kernel.bpf_stats_enabled=1 does, without
// changing the sysctl) until the end of t.
func EnableRunStats(t testing.TB) {
	t.Helper()
	c, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		Unavailable(t, "enabling eBPF run-time statistics: %v", err)
	}
	t.Cleanup(func() { c.Close() })
}
