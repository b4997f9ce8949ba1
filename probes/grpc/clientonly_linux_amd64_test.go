package grpc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	fmgrpc "github.com/flowmill/flowmill/probes/grpc"
	"github.com/flowmill/flowmill/probes/grpc/internal/grpctest"
)

// TestClientOnly: testdata/clientonly (grpc-go v1.85.0) is only a gRPC
// client: it dials a health server this test runs (not instrumented) and
// has no grpc-go server in its executable. The client part is instrumented without the
// server part: one client span per RPC, with its method and status code,
// and Status says the server part was skipped and why. Stripped
// (-ldflags='-s -w') as well.
func TestClientOnly(t *testing.T) {
	for name, prog := range map[string]testprog.Program{"plain": testprog.GRPCClientOnly, "stripped": testprog.GRPCClientOnlyStripped} {
		t.Run(name, func(t *testing.T) { testClientOnly(t, prog) })
	}
}

func testClientOnly(t *testing.T, prog testprog.Program) {
	testutil.RequireBPF(t)
	bin := build(t, prog)
	// The linker left grpc-go's server out (go tool nm on the plain build
	// shows no grpc.NewServer and no (*Server).handleStream either): what
	// the probe finds in the pclntab, which a stripped build keeps.
	exe, err := goexe.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]bool{
		"google.golang.org/grpc.NewServer":               false,
		"google.golang.org/grpc.(*Server).handleStream":  false,
		"google.golang.org/grpc.(*ClientConn).Invoke":    true,
		"google.golang.org/grpc.(*ClientConn).NewStream": true,
		"google.golang.org/grpc.(*clientStream).finish":  true,
		"google.golang.org/grpc.(*Server).Serve":         false,
	} {
		_, ok, err := exe.Lookup(name)
		if err != nil {
			t.Fatal(err)
		}
		if ok != want {
			t.Errorf("%s in %s: %v, want %v", name, prog.Name(), ok, want)
		}
	}
	exe.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpctest.NewServer(grpctest.Health{})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	addr := ln.Addr().String()

	calls := []struct {
		call   string
		method string
		code   codes.Code
	}{
		{"check=ok", "Check", codes.OK},
		{"check=notfound", "Check", codes.NotFound},
		{"check=denied", "Check", codes.PermissionDenied},
		{"watch=msgs=2", "Watch", codes.OK},
	}
	args := []string{"-addr=" + addr, "-wait=" + testutil.Timeout(20*time.Second).String()}
	for _, c := range calls {
		args = append(args, c.call)
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Timeout(60*time.Second))
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stderr = os.Stderr
	out, runErr := cmd.Output()
	type result struct {
		Call string     `json:"call"`
		Code codes.Code `json:"code"`
	}
	var (
		status  *fmgrpc.Status
		results []result
		spans   []fmgrpc.ClientRPC
	)
	for _, l := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		var v struct {
			Error  string            `json:"error"`
			Status *fmgrpc.Status    `json:"status"`
			Result *result           `json:"result"`
			Client *fmgrpc.ClientRPC `json:"client"`
		}
		if err := json.Unmarshal(l, &v); err != nil {
			t.Fatalf("child wrote %q: %v (exit: %v)", l, err, runErr)
		}
		switch {
		case v.Error != "":
			if testutil.Required() || !strings.Contains(v.Error, "privilege") {
				t.Fatal(v.Error)
			}
			t.Skip(v.Error)
		case v.Status != nil:
			status = v.Status
		case v.Result != nil:
			results = append(results, *v.Result)
		case v.Client != nil:
			spans = append(spans, *v.Client)
		}
	}
	if runErr != nil {
		t.Fatalf("child: %v\n%s", runErr, out)
	}
	if status == nil {
		t.Fatalf("child wrote no status:\n%s", out)
	}
	if !status.Client || status.Server || status.IncomingContext {
		t.Errorf("status %+v: want the client part only", status)
	}
	skipped := false
	for _, s := range status.Skipped {
		if strings.HasPrefix(s, "server RPCs: not instrumented: ") && strings.Contains(s, "handleStream") {
			skipped = true
		}
		if strings.HasPrefix(s, "client RPCs:") {
			t.Errorf("skipped %q", s)
		}
	}
	if !skipped {
		t.Errorf("skipped %q: nothing says why served RPCs are not instrumented", status.Skipped)
	}
	if len(results) != len(calls) {
		t.Fatalf("results %+v, want %d", results, len(calls))
	}
	for i, c := range calls {
		if results[i].Call != c.call || results[i].Code != c.code {
			t.Fatalf("call %s: %+v, want code %v", c.call, results[i], c.code)
		}
	}
	// One call at a time: the spans come in the calls' order.
	if len(spans) != len(calls) {
		t.Fatalf("%d client spans, want one per call (%d): %+v", len(spans), len(calls), spans)
	}
	for i, c := range calls {
		r := spans[i]
		if r.FullMethod != "/grpc.health.v1.Health/"+c.method || r.Service != "grpc.health.v1.Health" || r.Method != c.method || r.Code != c.code {
			t.Errorf("call %s: span %+v, want grpc.health.v1.Health/%s, code %v", c.call, r, c.method, c.code)
		}
		if !strings.HasSuffix(r.Target, addr) || r.PID != uint32(cmd.Process.Pid) {
			t.Errorf("call %s: target %q, pid %d: want %s, pid %d", c.call, r.Target, r.PID, addr, cmd.Process.Pid)
		}
		if !r.Span.TraceID.IsValid() || !r.Span.SpanID.IsValid() || r.Span.ParentSpanID.IsValid() || r.Parent != fmgrpc.NoParent || !r.Span.Sampled {
			t.Errorf("call %s: span %+v (parent %v), want a trace of its own", c.call, r.Span, r.Parent)
		}
		if d := r.Duration(); d < 0 || d > testutil.Timeout(10*time.Second) {
			t.Errorf("call %s: duration %v", c.call, d)
		}
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("the child timed out")
	}
}
