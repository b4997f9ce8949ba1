package http

//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_http -type http_event httpBPF ../../bpf/http.c -- -I../../bpf/include -O2 -g -Wall -Werror
