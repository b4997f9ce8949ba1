package tcp

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/cgroupfs"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/sockdiag"
)

// seedListeners records the owners of the listening sockets in scope that
// already exist when the probe starts, so that the connections they accept
// are attributed to them; the kernel program records those that start
// listening later. Listening sockets and their cookies come from a
// sock_diag dump of each network namespace (entering another one needs
// CAP_SYS_ADMIN; those it cannot enter are skipped), their owners from the
// file descriptors in /proc/PID/fd (reading another user's needs
// CAP_SYS_PTRACE; those it cannot read are skipped). A socket shared by
// several processes (a pre-forked server) belongs to the one with the
// lowest PID, normally the one that called listen(). It returns how many
// namespaces it could not read, and how many listening sockets it could
// not record because the kernel's map was full.
func seedListeners(m *ebpf.Map, scope probe.Scope) (failed, full uint64, err error) {
	var pids []int
	if scope.Kind == probe.ScopeProcess {
		pids = []int{int(scope.PID)}
	} else {
		ents, err := os.ReadDir("/proc")
		if err != nil {
			return 0, 0, err
		}
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				pids = append(pids, pid)
			}
		}
		slices.Sort(pids) // the lowest PID sharing a socket owns it
	}
	var cgroupID uint64
	if scope.Kind == probe.ScopeCgroup {
		var err error
		if cgroupID, err = cgroupfs.ID(scope.CgroupPath); err != nil {
			return 0, 0, err
		}
	}
	self, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return 0, 0, err
	}
	cookies := map[uint32][]uint64{} // socket inode -> cookies of its listening sockets
	dumped := map[uint32]bool{}      // network namespaces
	for _, pid := range pids {
		path := fmt.Sprintf("/proc/%d/ns/net", pid)
		netns, err := netnsInode(path)
		if err != nil {
			continue // gone, or not ours to read
		}
		if !dumped[netns] {
			dumped[netns] = true
			if netns == self {
				path = ""
			}
			err := sockdiag.DumpListening(path, func(s *sockdiag.Socket) {
				if s.Inode != 0 && s.Cookie != 0 {
					cookies[s.Inode] = append(cookies[s.Inode], s.Cookie)
				}
			})
			if err != nil {
				failed++ // a namespace it may not enter is skipped
			}
		}
		n, err := seedProcess(m, pid, scope, cgroupID, cookies)
		if err != nil {
			return failed, full, err
		}
		full += n
	}
	return failed, full, nil
}

// seedProcess records pid as the owner of its listening sockets not
// recorded yet, removing them from cookies. It returns how many it could
// not record because the map is full.
func seedProcess(m *ebpf.Map, pid int, scope probe.Scope, cgroupID uint64, cookies map[uint32][]uint64) (full uint64, err error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, nil // gone, or not ours to read
	}
	var task *tcpBPFFmTask
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil || !strings.HasPrefix(target, "socket:[") {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]"), 10, 32)
		if err != nil || len(cookies[uint32(ino)]) == 0 {
			continue
		}
		if task == nil {
			if scope.Kind == probe.ScopeCgroup && !underCgroup(pid, cgroupID) {
				return 0, nil
			}
			if task = procTask(pid); task == nil {
				return 0, nil // gone
			}
		}
		for _, c := range cookies[uint32(ino)] {
			switch err := m.Put(c, task); {
			case errors.Is(err, unix.E2BIG):
				full++
			case err != nil:
				return full, fmt.Errorf("recording the owner of listening socket %d (process %d): %w", ino, pid, err)
			}
		}
		delete(cookies, uint32(ino))
	}
	return full, nil
}

func procTask(pid int) *tcpBPFFmTask {
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return nil
	}
	t := &tcpBPFFmTask{Pid: uint32(pid), Tid: uint32(pid)}
	for i, c := range []byte(strings.TrimSuffix(string(comm), "\n")) {
		if i == len(t.Comm)-1 {
			break
		}
		t.Comm[i] = int8(c)
	}
	if dir, err := cgroupfs.Dir(pid); err == nil {
		t.CgroupId, _ = cgroupfs.ID(dir)
	}
	return t
}

// underCgroup reports whether pid's cgroup is the one with rootID or below
// it (compared by ID, so that any path to the scope's directory works).
func underCgroup(pid int, rootID uint64) bool {
	dir, err := cgroupfs.Dir(pid)
	if err != nil {
		return false
	}
	top, err := cgroupfs.Root()
	if err != nil {
		return false
	}
	for ; cgroupfs.Under(dir, top); dir = filepath.Dir(dir) {
		if id, err := cgroupfs.ID(dir); err == nil && id == rootID {
			return true
		}
		if dir == top {
			break
		}
	}
	return false
}
