// Command v185 is the gRPC probe's test program built with grpc-go v1.85.0
// (its own go.mod), the newest release the probe is tested with, where the
// library's go.mod requires the oldest. With -mode=client it makes the
// calls given as arguments to -addr (see grpctest.Run) and writes their
// results as JSON lines; with -mode=server it serves the test health
// service with flowmill's gRPC probe on itself and writes {"listen":
// "host:port"} (or {"error": ...}), its probe's {"status": ...}, then every
// ServerRPC as {"server": ...}, until interrupted.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/flowmill/flowmill"
	fmgrpc "github.com/flowmill/flowmill/probes/grpc"
	"github.com/flowmill/flowmill/probes/grpc/internal/grpctest"
)

type line struct {
	Listen string            `json:"listen,omitempty"`
	Error  string            `json:"error,omitempty"`
	Status *fmgrpc.Status    `json:"status,omitempty"`
	Server *fmgrpc.ServerRPC `json:"server,omitempty"`
}

func main() {
	mode := flag.String("mode", "client", "client or server")
	addr := flag.String("addr", "", "client: the server's address")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(l line) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(l)
	}
	if *mode == "client" {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		if err := grpctest.Run(ctx, *addr, flag.Args(), os.Stdout); err != nil {
			emit(line{Error: err.Error()})
			os.Exit(1)
		}
		return
	}
	p := fmgrpc.New()
	s, err := flowmill.New(flowmill.WithProbes(p), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		emit(line{Error: err.Error()})
		os.Exit(1)
	}
	sub, err := flowmill.Subscribe[fmgrpc.ServerRPC](s)
	if err != nil {
		emit(line{Error: err.Error()})
		os.Exit(1)
	}
	if err := s.Start(ctx); err != nil {
		emit(line{Error: err.Error()})
		os.Exit(1)
	}
	defer s.Close()
	st := p.Status()
	emit(line{Status: &st})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		emit(line{Error: err.Error()})
		os.Exit(1)
	}
	srv := grpctest.NewServer(grpctest.Health{})
	go srv.Serve(ln)
	defer srv.Stop()
	go func() {
		for r := range sub.Events() {
			emit(line{Server: &r})
		}
	}()
	emit(line{Listen: ln.Addr().String()})
	<-ctx.Done()
}
