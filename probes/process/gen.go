package process

//go:generate go tool bpf2go -tags linux -target bpfel -output-stem zz_generated_process -type proc_event -type exec_event processBPF ../../bpf/process.c -- -I../../bpf/include -O2 -g -Wall -Werror
