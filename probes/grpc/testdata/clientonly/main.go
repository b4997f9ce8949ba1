// Command clientonly is the gRPC probe's test program that is only a gRPC
// client: it dials -addr with grpc-go's generated health client and has
// no server code (it never calls grpc.NewServer, so the linker leaves
// grpc-go's server out: no grpc.(*Server).handleStream in the
// executable). It starts flowmill with the gRPC probe on itself, writes
// its probe's {"status": ...} (or {"error": ...}), makes the calls given
// as arguments, one at a time ("check=SERVICE" or "watch=SERVICE", read
// to its end; the service name tells the test server what to answer, see
// grpctest.Health), writes {"result": {"call", "code"}} for each, then
// every ClientRPC of the health service as {"client": ...} until it has
// one per call and -grace has passed without another, or -wait has
// passed.
//
// It is a module of its own, with grpc-go v1.85.0, built with
// -tags=grpcnotrace: whether the linker leaves grpc-go's server out of a
// program that never serves depends on both. grpc-go's init stores a
// func(*grpc.Server, string) bool in an interface, so once anything in the
// program calls reflect's methods by index (html/template does, which
// golang.org/x/net/trace imports, which grpc-go imports without the tag)
// the linker keeps every exported method of *grpc.Server: Serve, and with
// it handleStream, are linked though never called. Measured with go 1.26:
// v1.85.0 and v1.83.2 with the tag leave them out; without the tag, and
// v1.76.0 even with it, keep them.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/flowmill/flowmill"
	fmgrpc "github.com/flowmill/flowmill/probes/grpc"
)

type result struct {
	Call string     `json:"call"`
	Code codes.Code `json:"code"`
}

type line struct {
	Error  string            `json:"error,omitempty"`
	Status *fmgrpc.Status    `json:"status,omitempty"`
	Result *result           `json:"result,omitempty"`
	Client *fmgrpc.ClientRPC `json:"client,omitempty"`
}

func main() {
	addr := flag.String("addr", "", "the health server's address")
	wait := flag.Duration("wait", 20*time.Second, "how long to wait for the client spans")
	grace := flag.Duration("grace", 300*time.Millisecond, "how long to wait for more spans once there is one per call")
	flag.Parse()
	enc := json.NewEncoder(os.Stdout)
	fail := func(err error) {
		enc.Encode(line{Error: err.Error()})
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p := fmgrpc.New()
	s, err := flowmill.New(flowmill.WithProbes(p), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		fail(err)
	}
	sub, err := flowmill.Subscribe[fmgrpc.ClientRPC](s)
	if err != nil {
		fail(err)
	}
	if err := s.Start(ctx); err != nil {
		fail(err)
	}
	defer s.Close()
	st := p.Status()
	enc.Encode(line{Status: &st})

	cc, err := grpc.NewClient("passthrough:///"+*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	for _, call := range flag.Args() {
		kind, svc, _ := strings.Cut(call, "=")
		req := &healthpb.HealthCheckRequest{Service: svc}
		switch kind {
		case "check":
			_, err = hc.Check(ctx, req)
		case "watch":
			var w healthpb.Health_WatchClient
			if w, err = hc.Watch(ctx, req); err == nil {
				for err == nil {
					_, err = w.Recv()
				}
				if err == io.EOF {
					err = nil
				}
			}
		default:
			fail(status.Errorf(codes.InvalidArgument, "unknown call %q", call))
		}
		enc.Encode(line{Result: &result{Call: call, Code: status.Code(err)}})
	}
	deadline := time.After(*wait)
	var more <-chan time.Time // after one span per call: any extra one
	for n := 0; ; {
		select {
		case r := <-sub.Events():
			if r.Service == "grpc.health.v1.Health" {
				enc.Encode(line{Client: &r})
				if n++; n == flag.NArg() {
					more = time.After(*grace)
				}
			}
		case <-more:
			return
		case <-deadline:
			return
		}
	}
}
