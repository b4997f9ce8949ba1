package grpc_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	otelcodes "go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	fmgrpc "github.com/flowmill/flowmill/probes/grpc"
	"github.com/flowmill/flowmill/probes/grpc/internal/grpctest"
)

var (
	buildMu  sync.Mutex
	built    = map[string]string{}
	buildDir string // removed by TestMain
)

// build returns test program prog, built once per test binary.
func build(t testing.TB, prog testprog.Program) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if bin, ok := built[prog.Name()]; ok {
		return bin
	}
	if buildDir == "" {
		dir, err := os.MkdirTemp("", "flowmill-grpc-test-")
		if err != nil {
			t.Fatal(err)
		}
		buildDir = dir
	}
	bin, err := testprog.Build(prog, buildDir)
	if err != nil {
		t.Fatalf("building %s: %v", prog.Pkg, err)
	}
	built[prog.Name()] = bin
	return bin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// goid is the calling goroutine's ID, from runtime.Stack's first line.
func goid() uint64 {
	var b [64]byte
	n := runtime.Stack(b[:], false)
	f := strings.Fields(string(b[:n]))
	id, _ := strconv.ParseUint(f[1], 10, 64)
	return id
}

// served is a health server in the test process, instrumented by a
// session with the gRPC probe, that remembers which goroutine served
// which service name.
type served struct {
	addr  string
	port  int
	probe *fmgrpc.Probe
	sub   *flowmill.Subscription[fmgrpc.ServerRPC]
	sess  *flowmill.Session

	mu     sync.Mutex
	byGID  map[uint64]string
	onCall func(ctx context.Context, service string) // what a handler does first
}

// serve starts the session and the server; before, if given, runs
// between the session's New and Start.
func serve(t *testing.T, before ...func(*flowmill.Session)) *served {
	t.Helper()
	testutil.RequireBPF(t)
	s := &served{probe: fmgrpc.New(), byGID: map[uint64]string{}}
	sess, err := flowmill.New(flowmill.WithProbes(s.probe), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	s.sess = sess
	if s.sub, err = flowmill.Subscribe[fmgrpc.ServerRPC](sess); err != nil {
		t.Fatal(err)
	}
	for _, f := range before {
		f(sess)
	}
	testutil.CheckStart(t, sess.Start(context.Background()))
	t.Cleanup(func() { sess.Close() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpctest.NewServer(grpctest.Health{OnCall: func(ctx context.Context, svc string) {
		s.mu.Lock()
		s.byGID[goid()] = svc
		on := s.onCall
		s.mu.Unlock()
		if on != nil {
			on(ctx, svc)
		}
	}})
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	s.addr = ln.Addr().String()
	s.port = ln.Addr().(*net.TCPAddr).Port
	return s
}

// service is the service name the RPC served on goroutine id asked for.
func (s *served) service(id uint64) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byGID[id]
}

// next returns the next n health RPCs.
func (s *served) next(t *testing.T, n int) []fmgrpc.ServerRPC {
	t.Helper()
	var out []fmgrpc.ServerRPC
	deadline := time.After(testutil.Timeout(20 * time.Second))
	for len(out) < n {
		select {
		case r := <-s.sub.Events():
			if r.Service == "grpc.health.v1.Health" {
				out = append(out, r)
			}
		case <-deadline:
			t.Fatalf("got %d of %d server RPCs: %+v", len(out), n, out)
		}
	}
	return out
}

// client runs testdata/v185 (grpc-go v1.85.0) as a client of addr making
// calls, and returns its results.
func client(t *testing.T, addr string, calls ...string) []grpctest.Result {
	t.Helper()
	bin := build(t, testprog.GRPCv185)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Timeout(60*time.Second))
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"-mode=client", "-addr=" + addr}, calls...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client: %v\n%s", err, out)
	}
	var rs []grpctest.Result
	for _, l := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		var r grpctest.Result
		if err := json.Unmarshal(l, &r); err != nil {
			t.Fatalf("client wrote %q: %v", l, err)
		}
		rs = append(rs, r)
	}
	return rs
}

func checkRPC(t *testing.T, r fmgrpc.ServerRPC, method string, code codes.Code, min time.Duration, port int) {
	t.Helper()
	if r.FullMethod != "/grpc.health.v1.Health/"+method || r.Service != "grpc.health.v1.Health" || r.Method != method {
		t.Errorf("RPC %+v: want grpc.health.v1.Health/%s", r, method)
	}
	if !r.StatusKnown || r.Code != code {
		t.Errorf("RPC %s: code %v (known %v), want %v", r.FullMethod, r.Code, r.StatusKnown, code)
	}
	if d := r.Duration(); d < min || d > min+testutil.Timeout(5*time.Second) {
		t.Errorf("RPC %s: duration %v, want at least %v", r.FullMethod, d, min)
	}
	if !r.Peer.Addr().IsLoopback() || r.Peer.Port() == 0 {
		t.Errorf("RPC %s: peer %v, want a loopback address", r.FullMethod, r.Peer)
	}
	if port != 0 && r.ServerPort != port {
		t.Errorf("RPC %s: server port %d, want %d", r.FullMethod, r.ServerPort, port)
	}
	if !r.Span.TraceID.IsValid() || !r.Span.SpanID.IsValid() {
		t.Errorf("RPC %s: span %+v", r.FullMethod, r.Span)
	}
}

// TestServerRPCs: a client in another process (grpc-go v1.85.0) calls the
// health service of this process: one span per RPC, with its method,
// status code (OK, NotFound, PermissionDenied) and a duration holding the
// handler's sleep; a server-streaming Watch is one span.
func TestServerRPCs(t *testing.T) {
	s := serve(t)
	st := s.probe.Status()
	if !st.Server || !st.IncomingContext || !st.Client || st.Propagation || !errors.Is(st.PropagationErr, fmgrpc.ErrPropagationUnavailable) {
		t.Fatalf("status %+v (%v)", st, st.PropagationErr)
	}
	calls := []string{"check=ok", "check=notfound", "check=denied", "check=sleep=300", "watch=msgs=3/sleep=50"}
	rs := client(t, s.addr, calls...)
	want := map[string]struct {
		method string
		code   codes.Code
		min    time.Duration
	}{
		"ok":              {"Check", codes.OK, 0},
		"notfound":        {"Check", codes.NotFound, 0},
		"denied":          {"Check", codes.PermissionDenied, 0},
		"sleep=300":       {"Check", codes.OK, 300 * time.Millisecond},
		"msgs=3/sleep=50": {"Watch", codes.OK, 150 * time.Millisecond},
	}
	for _, r := range rs {
		svc := r.Call[strings.IndexByte(r.Call, '=')+1:]
		if r.Code != want[svc].code {
			t.Fatalf("call %s answered %v, want %v", r.Call, r.Code, want[svc].code)
		}
	}
	seen := map[string]bool{}
	for _, r := range s.next(t, len(calls)) {
		svc := s.service(r.Goroutine)
		w, ok := want[svc]
		if !ok || seen[svc] {
			t.Errorf("RPC %+v on goroutine %d: served %q", r, r.Goroutine, svc)
			continue
		}
		seen[svc] = true
		checkRPC(t, r, w.method, w.code, w.min, s.port)
		if r.Span.ParentSpanID.IsValid() || r.Span.RemoteParent {
			t.Errorf("RPC %s: a parent without traceparent: %+v", svc, r.Span)
		}
	}
	select {
	case r := <-s.sub.Events():
		if r.Service == "grpc.health.v1.Health" {
			t.Errorf("an RPC too many: %+v", r)
		}
	default:
	}
}

// TestConcurrentRPCs: 40 RPCs at once, each matched to its own span.
func TestConcurrentRPCs(t *testing.T) {
	s := serve(t)
	const n = 40
	rs := client(t, s.addr, "parallel=40:check=c{i}/sleep=100")
	if len(rs) != n {
		t.Fatalf("%d results, want %d", len(rs), n)
	}
	// Every RPC is a span, or counted as lost: on kernels that preempt
	// uprobe programs (7.x), an entry overtaken on its CPU by another
	// RPC's is dropped and counted (Stats.EventsLost).
	var got []fmgrpc.ServerRPC
	deadline := time.After(testutil.Timeout(20 * time.Second))
wait:
	for len(got) < n {
		select {
		case r := <-s.sub.Events():
			if r.Service == "grpc.health.v1.Health" {
				got = append(got, r)
			}
		case <-deadline:
			break wait
		}
	}
	seen := map[string]bool{}
	for _, r := range got {
		svc := s.service(r.Goroutine)
		if !strings.HasPrefix(svc, "c") || seen[svc] {
			t.Errorf("RPC %+v: served %q", r, svc)
			continue
		}
		seen[svc] = true
		checkRPC(t, r, "Check", codes.OK, 100*time.Millisecond, s.port)
	}
	stats, err := s.sess.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(seen))+stats.EventsLost+stats.Missed < n {
		t.Errorf("%d distinct RPCs matched, %d counted as lost or missed: want %d (stats %+v)", len(seen), stats.EventsLost+stats.Missed, n, stats)
	}
	if stats.Evicted != 0 || stats.Malformed != 0 || stats.Unsupported != 0 {
		t.Errorf("losses: %+v", stats)
	}
	if len(seen) < n {
		t.Logf("%d of %d RPCs traced, the rest counted: %+v", len(seen), n, stats)
	}
}

// TestIncomingTraceparent: "traceparent" metadata makes the server span a
// child of the caller's span; an invalid one starts a trace.
func TestIncomingTraceparent(t *testing.T) {
	s := serve(t)
	const (
		trace = "4bf92f3577b34da6a3ce929d0e0e4736"
		span  = "00f067aa0ba902b7"
	)
	client(t, s.addr, "tp=00-"+trace+"-"+span+"-01,check=tp", "tp=00-zz-bad,check=bad", "tp=00-"+trace+"-"+span+"-00,check=unsampled")
	for _, r := range s.next(t, 3) {
		svc := s.service(r.Goroutine)
		sc := r.Span
		switch svc {
		case "tp", "unsampled":
			if sc.TraceID.String() != trace || sc.ParentSpanID.String() != span || !sc.RemoteParent || sc.Sampled != (svc == "tp") {
				t.Errorf("RPC %s: span %+v, want a child of %s-%s", svc, sc, trace, span)
			}
		case "bad":
			if sc.TraceID.String() == trace || sc.ParentSpanID.IsValid() || sc.RemoteParent {
				t.Errorf("RPC with a bad traceparent: span %+v, want a new trace", sc)
			}
		default:
			t.Errorf("RPC %+v: served %q", r, svc)
		}
	}
}

// TestOtherGRPCVersion: testdata/v185, built with grpc-go v1.85.0 and
// flowmill's gRPC probe, serves the health service to a client in this
// process: the same spans; stripped (-ldflags='-s -w') as well.
func TestOtherGRPCVersion(t *testing.T) {
	for name, prog := range map[string]testprog.Program{"plain": testprog.GRPCv185, "stripped": testprog.GRPCv185Stripped} {
		t.Run(name, func(t *testing.T) { testChildServer(t, prog) })
	}
}

func testChildServer(t *testing.T, prog testprog.Program) {
	testutil.RequireBPF(t)
	bin := build(t, prog)
	cmd := exec.Command(bin, "-mode=server")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(testutil.Timeout(10 * time.Second)):
			cmd.Process.Kill()
			<-done
		}
	})
	type line struct {
		Listen string            `json:"listen"`
		Error  string            `json:"error"`
		Status *fmgrpc.Status    `json:"status"`
		Server *fmgrpc.ServerRPC `json:"server"`
	}
	ready := make(chan string, 1)
	rpcs := make(chan fmgrpc.ServerRPC, 64)
	var status fmgrpc.Status
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var l line
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Errorf("child wrote %q: %v", sc.Text(), err)
				continue
			}
			switch {
			case l.Error != "":
				ready <- "error: " + l.Error
			case l.Status != nil:
				status = *l.Status
			case l.Listen != "":
				ready <- l.Listen
			case l.Server != nil:
				rpcs <- *l.Server
			}
		}
	}()
	var addr string
	select {
	case addr = <-ready:
	case <-time.After(testutil.Timeout(30 * time.Second)):
		t.Fatal("the child did not start")
	}
	if strings.HasPrefix(addr, "error: ") {
		if testutil.Required() || !strings.Contains(addr, "privilege") {
			t.Fatal(addr)
		}
		t.Skip(addr)
	}
	if !status.Server || !status.IncomingContext {
		t.Fatalf("child status %+v", status)
	}
	_, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	const (
		trace = "4bf92f3577b34da6a3ce929d0e0e4736"
		span  = "00f067aa0ba902b7"
	)
	calls := []struct {
		call   string
		method string
		code   codes.Code
		min    time.Duration
	}{
		{"check=ok", "Check", codes.OK, 0},
		{"check=notfound", "Check", codes.NotFound, 0},
		{"check=denied/sleep=100", "Check", codes.PermissionDenied, 100 * time.Millisecond},
		{"watch=msgs=2/sleep=50", "Watch", codes.OK, 100 * time.Millisecond},
		{"tp=00-" + trace + "-" + span + "-01,check=tp", "Check", codes.OK, 0},
	}
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Timeout(30*time.Second))
	defer cancel()
	// One call at a time: the spans come in the calls' order.
	for i, c := range calls {
		var buf bytes.Buffer
		if err := grpctest.Run(ctx, addr, []string{c.call}, &buf); err != nil {
			t.Fatal(err)
		}
		var res grpctest.Result
		if err := json.Unmarshal(buf.Bytes(), &res); err != nil || res.Code != c.code {
			t.Fatalf("call %s: %s (%v)", c.call, buf.Bytes(), err)
		}
		var r fmgrpc.ServerRPC
		for r.Service != "grpc.health.v1.Health" {
			select {
			case r = <-rpcs:
			case <-time.After(testutil.Timeout(20 * time.Second)):
				t.Fatalf("call %d (%s): no span", i, c.call)
			}
		}
		checkRPC(t, r, c.method, c.code, c.min, port)
		if strings.HasPrefix(c.call, "tp=") && (r.Span.TraceID.String() != trace || r.Span.ParentSpanID.String() != span) {
			t.Errorf("call %s: span %+v, want a child of the traceparent", c.call, r.Span)
		}
	}
}

// TestClientRPCs: RPCs made by an instrumented client are client spans,
// children of the served RPC whose context they use (on another
// goroutine) or whose goroutine makes them; a unary call and a
// server-streaming one, with their status codes; an RPC made outside any
// handler starts a trace.
func TestClientRPCs(t *testing.T) {
	s := serve(t)
	if st := s.probe.Status(); !st.Client {
		t.Fatalf("status %+v: client not instrumented", st)
	}
	clients, err := flowmill.Subscribe[fmgrpc.ClientRPC](s.sess)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := ggrpc.NewClient("passthrough:///"+s.addr, ggrpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	hc := healthpb.NewHealthClient(cc)
	s.mu.Lock()
	s.onCall = func(ctx context.Context, svc string) {
		switch svc {
		case "by-context":
			// On another goroutine, with a context derived from the
			// handler's.
			ctx, cancel := context.WithTimeout(ctx, testutil.Timeout(10*time.Second))
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "inner/notfound"})
			}()
			<-done
		case "by-goroutine":
			// On the handler's goroutine, with an unrelated context.
			w, err := hc.Watch(context.Background(), &healthpb.HealthCheckRequest{Service: "inner/msgs=2"})
			if err == nil {
				for {
					if _, err := w.Recv(); err != nil {
						break
					}
				}
			}
		}
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Timeout(20*time.Second))
	defer cancel()
	for _, svc := range []string{"by-context", "by-goroutine", "denied"} {
		hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	}
	// Served: the three outer ones and the two inner ones.
	servers := map[string]fmgrpc.ServerRPC{}
	for _, r := range s.next(t, 5) {
		servers[s.service(r.Goroutine)] = r
	}
	var got []fmgrpc.ClientRPC
	deadline := time.After(testutil.Timeout(20 * time.Second))
	for len(got) < 5 {
		select {
		case c := <-clients.Events():
			if c.Service == "grpc.health.v1.Health" {
				got = append(got, c)
			}
		case <-deadline:
			t.Fatalf("got %d of 5 client RPCs: %+v", len(got), got)
		}
	}
	type want struct {
		method string
		code   codes.Code
		parent string // the served RPC, "" for none
		link   fmgrpc.ParentLink
	}
	// The inner calls first (they end before their parents), then the
	// outer ones in order.
	wants := []want{
		{"Check", codes.NotFound, "by-context", fmgrpc.ParentByContext},
		{"Check", codes.OK, "", fmgrpc.NoParent},
		{"Watch", codes.OK, "by-goroutine", fmgrpc.ParentByGoroutine},
		{"Check", codes.OK, "", fmgrpc.NoParent},
		{"Check", codes.PermissionDenied, "", fmgrpc.NoParent},
	}
	for i, c := range got {
		w := wants[i]
		if c.Method != w.method || c.Code != w.code || c.Parent != w.link || !strings.HasSuffix(c.Target, s.addr) {
			t.Errorf("client RPC %d: %+v, want %+v", i, c, w)
			continue
		}
		if w.parent == "" {
			if c.Span.ParentSpanID.IsValid() {
				t.Errorf("client RPC %d: parent %v, want none", i, c.Span.ParentSpanID)
			}
			continue
		}
		p, ok := servers[w.parent]
		if !ok || c.Span.ParentSpanID != p.Span.SpanID || c.Span.TraceID != p.Span.TraceID {
			t.Errorf("client RPC %d: span %+v, want a child of %+v", i, c.Span, p.Span)
		}
		if c.Start.Before(p.Start) || c.End.After(p.End) {
			t.Errorf("client RPC %d [%v, %v] outside its parent [%v, %v]", i, c.Start, c.End, p.Start, p.End)
		}
	}
}

// TestExporter: through flowmill.NewExporter, an RPC served and the RPC
// its handler makes with the handler's context are a server span and its
// client child span, with the probe's IDs (flowmill.IDGenerator).
func TestExporter(t *testing.T) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr), sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
	var exp *flowmill.Exporter
	s := serve(t, func(sess *flowmill.Session) {
		var err error
		if exp, err = flowmill.NewExporter(sess, flowmill.WithTracerProvider(tp)); err != nil {
			t.Fatal(err)
		}
	})
	cc, err := ggrpc.NewClient("passthrough:///"+s.addr, ggrpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	hc := healthpb.NewHealthClient(cc)
	s.mu.Lock()
	s.onCall = func(ctx context.Context, svc string) {
		if svc == "outer" {
			hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "inner/denied"})
		}
	}
	s.mu.Unlock()
	// From another process: this process's own outer client span would
	// be a third.
	client(t, s.addr, "check=outer")
	s.next(t, 2) // both served RPCs were published (the exporter has its own subscription)
	if err := s.sess.Close(); err != nil {
		t.Fatal(err)
	}
	exp.Shutdown(context.Background())
	// Server spans in the order they ended: the inner RPC first.
	var servers []sdktrace.ReadOnlySpan
	var call sdktrace.ReadOnlySpan
	for _, sp := range sr.Ended() {
		switch {
		case sp.Name() != "grpc.health.v1.Health/Check":
		case sp.SpanKind() == trace.SpanKindClient:
			call = sp
		case sp.SpanKind() == trace.SpanKindServer:
			servers = append(servers, sp)
		}
	}
	if len(servers) != 2 || call == nil {
		t.Fatalf("spans: %v", sr.Ended())
	}
	inner, outer := servers[0], servers[1]
	if call.Parent().SpanID() != outer.SpanContext().SpanID() || call.SpanContext().TraceID() != outer.SpanContext().TraceID() {
		t.Errorf("client span parent %v, want the outer server span %v", call.Parent(), outer.SpanContext())
	}
	if call.Status().Code != otelcodes.Error || inner.Status().Code != otelcodes.Unset {
		t.Errorf("statuses: client %v, inner server %v (PermissionDenied is no server error)", call.Status(), inner.Status())
	}
}

// TestHitsPerRPC: what the probe costs per RPC, counted by the kernel
// (bpf_stats): four program runs per RPC served (handleStream's entry and
// return, writeStatus, operateHeaders), three per unary RPC made (Invoke's
// entry and return, and finish, which every RPC's stream reaches); and
// nothing stays loaded after Close.
func TestHitsPerRPC(t *testing.T) {
	held := testutil.OwnPrograms(t)
	s := serve(t)
	ids := testutil.ProgramsSince(t, held)
	testutil.EnableRunStats(t)
	cc, err := ggrpc.NewClient("passthrough:///"+s.addr, ggrpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Timeout(30*time.Second))
	defer cancel()
	hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "warm-up"}) // the connection
	before := testutil.RunStats(t, ids)
	const n = 50
	for range n {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "ok"}); err != nil {
			t.Fatal(err)
		}
	}
	after := testutil.RunStats(t, ids)
	want := map[string]uint64{"server_enter": n, "server_return": n, "status_enter": n, "headers_enter": n,
		"invoke_enter": n, "invoke_return": n, "finish_enter": n, "stream_enter": 0, "stream_return": 0}
	var total time.Duration
	for name, w := range want {
		b, a := before[name], after[name]
		runs := a.RunCount - b.RunCount
		if runs != w {
			t.Errorf("%s ran %d times for %d RPCs, want %d", name, runs, n, w)
		}
		total += a.Runtime - b.Runtime
		if runs > 0 {
			t.Logf("%s: %v per run", name, (a.Runtime-b.Runtime)/time.Duration(runs))
		}
	}
	t.Logf("kernel run time per RPC (served and made, all programs): %v", total/n)
	s.next(t, n+1)
	if err := s.sess.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.ProgramsGone(t, ids)
}
