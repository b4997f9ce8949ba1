package grpc_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	fmgrpc "github.com/flowmill/flowmill/probes/grpc"
	"github.com/flowmill/flowmill/probes/grpc/internal/grpctest"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

// calls makes a unary Check and a Watch stream (read to its end) with
// ctx.
func calls(ctx context.Context, hc healthpb.HealthClient, name string) error {
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: name}); err != nil {
		return err
	}
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: name + "/msgs=2"})
	if err != nil {
		return err
	}
	for {
		if _, err := w.Recv(); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// TestHTTPParent: gRPC client RPCs (a unary Check and a Watch stream) made
// by a handler of a net/http server traced by probes/http, listed before
// probes/grpc, are children of the request's server span: with the
// request's context (derived from r.Context(), on another goroutine) and
// with context.Background() on the handler's goroutine. Those of a request
// that came with an unsampled traceparent are in its trace, unsampled, and
// not recorded.
func TestHTTPParent(t *testing.T) {
	testutil.RequireBPF(t)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr), sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	p := fmgrpc.New()
	sess, err := flowmill.New(flowmill.WithProbes(fmhttp.New(fmhttp.WithoutPropagation()), p), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	rpcs, err := flowmill.Subscribe[fmgrpc.ClientRPC](sess)
	if err != nil {
		t.Fatal(err)
	}
	exp, err := flowmill.NewExporter(sess, flowmill.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exp.Close() })
	testutil.CheckStart(t, sess.Start(context.Background()))
	if st := p.Status(); !st.Client || !st.HTTPParenting {
		t.Fatalf("status %+v: want client RPCs with HTTP parents", st)
	}
	for _, s := range p.Status().Skipped {
		if strings.Contains(s, "HTTP parenting") {
			t.Errorf("skipped %q with the HTTP family attached", s)
		}
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpctest.NewServer(grpctest.Health{})
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	cc, err := ggrpc.NewClient("passthrough:///"+ln.Addr().String(), ggrpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	hc := healthpb.NewHealthClient(cc)

	errs := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ctx":
			// On another goroutine, with a context derived from the
			// request's.
			ctx, cancel := context.WithTimeout(r.Context(), testutil.Timeout(20*time.Second))
			defer cancel()
			var wg sync.WaitGroup
			var err error
			wg.Go(func() { err = calls(ctx, hc, "by-context") })
			wg.Wait()
			errs <- err
		case "/goroutine", "/unsampled":
			// On the handler's goroutine, with an unrelated context.
			errs <- calls(context.Background(), hc, "by-goroutine")
		default:
			errs <- nil
		}
	}))
	t.Cleanup(srv.Close)
	const unsampled = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, path := range []string{"/ctx", "/goroutine", "/unsampled"} {
		req, err := http.NewRequest("GET", srv.URL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if path == "/unsampled" {
			req.Header.Set("Traceparent", "00-"+unsampled+"-00f067aa0ba902b7-00")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if err := <-errs; err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	var got []fmgrpc.ClientRPC
	deadline := time.After(testutil.Timeout(20 * time.Second))
	for len(got) < 6 {
		select {
		case c := <-rpcs.Events():
			if c.Service == "grpc.health.v1.Health" {
				got = append(got, c)
			}
		case <-deadline:
			t.Fatalf("got %d of 6 client RPCs: %+v", len(got), got)
		}
	}
	if err := sess.Close(); err != nil {
		t.Fatal(err)
	}
	if err := exp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st, err := sess.Stats(); err == nil {
		t.Logf("session stats %+v", st)
	}

	servers := map[string]sdktrace.ReadOnlySpan{}
	var clients []sdktrace.ReadOnlySpan
	for _, s := range sr.Ended() {
		switch {
		case s.SpanKind() == trace.SpanKindServer && attr(s, "url.path") != "":
			servers[attr(s, "url.path")] = s
		case s.SpanKind() == trace.SpanKindClient && strings.HasPrefix(s.Name(), "grpc.health.v1.Health/"):
			clients = append(clients, s)
		}
	}
	link := map[string]fmgrpc.ParentLink{"/ctx": fmgrpc.ParentByContext, "/goroutine": fmgrpc.ParentByGoroutine}
	for path, l := range link {
		srvSpan, ok := servers[path]
		if !ok {
			t.Fatalf("no HTTP server span for %s: %v", path, sr.Ended())
		}
		sc := srvSpan.SpanContext()
		// The events: two client RPCs, Check and Watch, whose parent is
		// this request, found as the path says.
		methods := map[string]bool{}
		for _, c := range got {
			if c.Span.TraceID != sc.TraceID() || c.Span.ParentSpanID != sc.SpanID() {
				continue
			}
			methods[c.Method] = true
			if !c.Span.Sampled {
				t.Errorf("%s: client RPC %s: not sampled", path, c.Method)
			}
			if !c.ParentHTTP || c.Parent != l {
				t.Errorf("%s: client RPC %s: parent link %v (HTTP %v), want %v (HTTP)", path, c.Method, c.Parent, c.ParentHTTP, l)
			}
		}
		if !methods["Check"] || !methods["Watch"] {
			t.Errorf("%s: client RPCs with the request as parent: %v, want Check and Watch; all: %+v", path, methods, got)
		}
		// The spans: each grpc client span's trace and parent are the
		// HTTP server span's.
		n := 0
		for _, c := range clients {
			if c.Parent().SpanID() != sc.SpanID() {
				continue
			}
			n++
			if c.SpanContext().TraceID() != sc.TraceID() {
				t.Errorf("%s: span %q: trace %v, want the server span's %v", path, c.Name(), c.SpanContext().TraceID(), sc.TraceID())
			}
			if c.StartTime().Before(srvSpan.StartTime()) || c.EndTime().After(srvSpan.EndTime()) {
				t.Errorf("%s: span %q [%v, %v] not within its server span [%v, %v]", path, c.Name(), c.StartTime(), c.EndTime(), srvSpan.StartTime(), srvSpan.EndTime())
			}
		}
		if n != 2 {
			for _, c := range clients {
				t.Logf("client span %q trace %v parent %v", c.Name(), c.SpanContext().TraceID(), c.Parent().SpanID())
			}
			t.Errorf("%s: %d grpc client spans with the HTTP server span %v as parent, want 2", path, n, sc.SpanID())
		}
	}
	if len(clients) != 4 {
		t.Errorf("%d grpc client spans, want 4 (none of the unsampled trace)", len(clients))
	}
	// The unsampled request's: in its trace, children of its (unrecorded)
	// server span, unsampled.
	n := 0
	for _, c := range got {
		if c.Span.TraceID.String() != unsampled {
			continue
		}
		n++
		if c.Span.Sampled || !c.ParentHTTP || c.Parent != fmgrpc.ParentByGoroutine || !c.Span.ParentSpanID.IsValid() {
			t.Errorf("/unsampled: client RPC %+v: want an unsampled child of the served request", c)
		}
	}
	if n != 2 {
		t.Errorf("/unsampled: %d client RPCs in the request's trace, want 2; all: %+v", n, got)
	}
	for _, s := range sr.Ended() {
		if s.SpanContext().TraceID().String() == unsampled {
			t.Errorf("span %q of the unsampled trace recorded", s.Name())
		}
	}
}

// TestNoHTTPParentStatus: without the HTTP family, Status says client RPCs
// get no HTTP parents, and why.
func TestNoHTTPParentStatus(t *testing.T) {
	s := serve(t)
	st := s.probe.Status()
	if !st.Client || st.HTTPParenting {
		t.Fatalf("status %+v: want client RPCs without HTTP parenting", st)
	}
	found := false
	for _, sk := range st.Skipped {
		found = found || strings.Contains(sk, "HTTP parenting") && strings.Contains(sk, "probes/http")
	}
	if !found {
		t.Errorf("skipped %q: nothing says why client RPCs have no HTTP parents", st.Skipped)
	}
}

// attr is the value of span attribute key, "" if it has none.
func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}
