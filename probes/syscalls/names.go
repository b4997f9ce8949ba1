package syscalls

import (
	"strconv"
	"sync"
)

// Syscall is a system call number of this architecture (x86-64).
type Syscall uint16

// String returns the system call's name ("openat"), or "syscall_N" for a
// number missing from the table (one newer than the headers flowmill was
// generated from).
func (s Syscall) String() string {
	if n, ok := s.Name(); ok {
		return n
	}
	return "syscall_" + strconv.Itoa(int(s))
}

// Name returns the system call's name and whether the table has it.
func (s Syscall) Name() (string, bool) {
	t := names[:]
	if int(s) < len(t) && t[s] != "" {
		return t[s], true
	}
	return "", false
}

var (
	byNameOnce sync.Once
	byName     map[string]Syscall
)

// ByName returns the system call named name ("getpid").
func ByName(name string) (Syscall, bool) {
	byNameOnce.Do(func() {
		t := names[:]
		byName = make(map[string]Syscall, len(t))
		for nr, n := range t {
			if n != "" {
				byName[n] = Syscall(nr)
			}
		}
	})
	s, ok := byName[name]
	return s, ok
}
