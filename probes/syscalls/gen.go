package syscalls

//go:generate go tool bpf2go -tags linux -target bpfel -output-stem zz_generated_syscalls -type sc_key syscallsBPF ../../bpf/syscalls.c -- -I../../bpf/include -O2 -g -Wall -Werror
//go:generate go run ./internal/mktable -o zz_generated_names_amd64.go /usr/include/x86_64-linux-gnu/asm/unistd_64.h
