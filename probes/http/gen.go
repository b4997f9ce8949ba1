package http

//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_http -type http_event -type inject_req -type sock_tuple -type h2_ctx -type red_key -type red_hist -type sampling_cfg httpBPF ../../bpf/http.c -- -I../../bpf/include -O2 -g -Wall -Werror
//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_propagate propagateBPF ../../bpf/propagate.c -- -I../../bpf/include -O2 -g -Wall -Werror
//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_h2learn -type h2_learn_rec h2learnBPF ../../bpf/h2learn.c -- -I../../bpf/include -O2 -g -Wall -Werror
