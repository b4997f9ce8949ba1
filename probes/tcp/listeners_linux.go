package tcp

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/flowmill/flowmill/internal/cgroupfs"
	"github.com/flowmill/flowmill/probes"
)

// seedListeners records the listening sockets that already exist when the
// probe starts, so connections they accept are attributed to their owner.
// (Sockets that start listening later are recorded by the kernel program.)
// Only the session's network namespace is visible here.
func seedListeners(m *ebpf.Map, scope probes.Scope) error {
	ports := map[uint64]uint16{} // socket inode -> port
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		if err := listeningSockets(f, ports); err != nil {
			return err
		}
	}
	if len(ports) == 0 {
		return nil
	}
	netns, err := netnsInode("/proc/self/ns/net")
	if err != nil {
		return err
	}
	var pids []int
	if scope.Kind == probes.ScopeProcess {
		pids = []int{int(scope.PID)}
	} else {
		ents, err := os.ReadDir("/proc")
		if err != nil {
			return err
		}
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	var cgroupID uint64
	if scope.Kind == probes.ScopeCgroup {
		if cgroupID, err = cgroupfs.ID(scope.CgroupPath); err != nil {
			return err
		}
	}
	for _, pid := range pids {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			continue // gone, or not ours to read
		}
		var task *tcpBPFFmTask
		for _, fd := range fds {
			target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err != nil || !strings.HasPrefix(target, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]"), 10, 64)
			if err != nil {
				continue
			}
			port, ok := ports[ino]
			if !ok {
				continue
			}
			if task == nil {
				if task = procTask(pid); task == nil {
					break
				}
				if scope.Kind == probes.ScopeCgroup && !underCgroup(pid, cgroupID) {
					break
				}
			}
			key := tcpBPFListenerKey{Netns: netns, Port: port}
			if err := m.Put(&key, task); err != nil {
				return fmt.Errorf("recording listener on port %d: %w", port, err)
			}
		}
	}
	return nil
}

// listeningSockets adds the LISTEN sockets of a /proc/net/tcp* table.
func listeningSockets(path string, out map[uint64]uint16) error {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil // no IPv6
		}
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" {
			continue
		}
		i := strings.LastIndexByte(fields[1], ':')
		port, err := strconv.ParseUint(fields[1][i+1:], 16, 16)
		if err != nil {
			continue
		}
		ino, err := strconv.ParseUint(fields[9], 10, 64)
		if err != nil || ino == 0 {
			continue
		}
		out[ino] = uint16(port)
	}
	return sc.Err()
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
