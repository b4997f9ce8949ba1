//go:build linux

// Package cgroupfs finds cgroup v2 directories: where the unified hierarchy
// is mounted (/sys/fs/cgroup on most systems, /sys/fs/cgroup/unified on
// hybrid ones) and which directory a process belongs to.
package cgroupfs

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
)

var root = sync.OnceValues(func() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options ... - fstype source ...
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 file system is mounted")
})

// Root returns the mount point of the cgroup v2 hierarchy.
func Root() (string, error) { return root() }

// Dir returns the cgroup v2 directory of process pid.
func Dir(pid int) (string, error) {
	r, err := Root()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return filepath.Join(r, p), nil
		}
	}
	return "", fmt.Errorf("process %d has no cgroup v2 entry", pid)
}

// ID returns the ID of the cgroup at dir: the inode number of the
// directory, what bpf_get_current_cgroup_id() reports.
func ID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, err
	}
	return fi.Sys().(*syscall.Stat_t).Ino, nil
}

// Under reports whether dir is root or below it.
func Under(dir, root string) bool {
	rel, err := filepath.Rel(root, dir)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
