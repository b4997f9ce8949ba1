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
