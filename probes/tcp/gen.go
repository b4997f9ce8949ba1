package tcp

//go:generate go tool bpf2go -tags linux -target bpfel -output-stem zz_generated_tcp -type tcp_event -type tcp_counts -type tcp_tuple -type flow tcpBPF ../../bpf/tcp.c -- -I../../bpf/include -O2 -g -Wall -Werror
