//go:build linux

package tcp_test

import (
	"syscall"
	"testing"
	"unsafe"
)

func getTCPInfo(t *testing.T, fd int) *syscall.TCPInfo {
	var info syscall.TCPInfo
	size := uint32(unsafe.Sizeof(info))
	_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd), syscall.SOL_TCP, syscall.TCP_INFO,
		uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		t.Fatalf("getsockopt TCP_INFO: %v", errno)
	}
	return &info
}
