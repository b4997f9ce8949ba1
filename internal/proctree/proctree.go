// Package proctree seeds the kernel's table of the process tree in scope
// (the "tracked" map of bpf/include/proctree.h) with a process and its
// living descendants.
//
// The kernel follows the tree from then on: a fork adds the child when the
// parent is tracked, and the death of a process removes it. Seeding happens
// after the fork hook is attached, so a child forked during the walk is
// added by the kernel if its parent was already seeded, and found by the
// walk otherwise. PIDs are read from /proc, so the session must run in the
// initial PID namespace, like the rest of flowmill's process scope.
package proctree

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	"github.com/cilium/ebpf"
)

// Seed puts root and every living descendant of root into m, a hash map
// from thread group ID (uint32) to uint8.
func Seed(m *ebpf.Map, root uint32) error {
	if err := m.Put(root, uint8(1)); err != nil {
		return fmt.Errorf("tracking process %d: %w", root, err)
	}
	children, err := Children()
	if err != nil {
		return err
	}
	queue := []uint32{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			if err := m.Put(c, uint8(1)); err != nil {
				return fmt.Errorf("tracking process %d, a descendant of %d: %w (raise the probe's process limit)", c, root, err)
			}
			queue = append(queue, c)
		}
	}
	return nil
}

// Children maps each PID in /proc to the PIDs of its children. Processes
// that exit during the walk are skipped.
func Children() (map[uint32][]uint32, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	children := make(map[uint32][]uint32)
	for _, e := range ents {
		pid, err := strconv.ParseUint(e.Name(), 10, 32)
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		if ppid, ok := ParentFromStat(b); ok {
			children[ppid] = append(children[ppid], uint32(pid))
		}
	}
	return children, nil
}

// ParentFromStat extracts the parent PID from the contents of
// /proc/PID/stat ("pid (comm) state ppid ..."). The comm may itself contain
// spaces and parentheses, so the fields are counted from the last ')'.
func ParentFromStat(stat []byte) (uint32, bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(stat[i+1:])
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.ParseUint(string(f[1]), 10, 32)
	if err != nil {
		return 0, false
	}
	return uint32(ppid), true
}
