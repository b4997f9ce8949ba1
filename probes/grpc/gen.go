package grpc

//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_grpc -type grpc_event grpcBPF ../../bpf/grpc.c -- -I../../bpf/include -O2 -g -Wall -Werror
