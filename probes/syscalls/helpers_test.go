package syscalls_test

import "syscall"

func syscallGetpid() { syscall.RawSyscall(syscall.SYS_GETPID, 0, 0, 0) }
