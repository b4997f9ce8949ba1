package sql

//go:generate go tool bpf2go -tags linux -target amd64 -output-stem zz_generated_sql -type sql_event sqlBPF ../../bpf/sql.c -- -I../../bpf/include -O2 -g -Wall -Werror
