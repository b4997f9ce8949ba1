//go:build !amd64

package syscalls

// names is empty off x86-64: system calls are reported by number only.
var names [0]string
