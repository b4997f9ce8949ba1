// Command sysloop makes a known number of system calls, for the syscalls
// probe's tests. It prints "ready", waits for a line on stdin, then calls
// getpid G times and opens (and closes) /dev/null O times, and exits:
//
//	sysloop G O
//
// Run it with GODEBUG=asyncpreemptoff=1: the Go runtime's preemption
// signals call getpid.
package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
	"unsafe"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: sysloop GETPIDS OPENATS")
		os.Exit(2)
	}
	getpids, err1 := strconv.Atoi(os.Args[1])
	openats, err2 := strconv.Atoi(os.Args[2])
	if err1 != nil || err2 != nil {
		fmt.Fprintln(os.Stderr, "sysloop: counts must be integers")
		os.Exit(2)
	}
	path, _ := syscall.BytePtrFromString("/dev/null")
	os.Stdout.WriteString("ready\n")
	var b [1]byte
	os.Stdin.Read(b[:])
	for range getpids {
		syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0)
	}
	for range openats {
		fd, _, e := syscall.RawSyscall6(syscall.SYS_OPENAT, uintptr(atFDCWD), uintptr(unsafe.Pointer(path)), syscall.O_RDONLY|syscall.O_CLOEXEC, 0, 0, 0)
		if e != 0 {
			fmt.Fprintln(os.Stderr, "sysloop: openat:", e)
			os.Exit(1)
		}
		syscall.RawSyscall(syscall.SYS_CLOSE, fd, 0, 0)
	}
	os.Exit(0)
}

var atFDCWD = -100 // AT_FDCWD; a variable, to convert it to uintptr
