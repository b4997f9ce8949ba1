package http

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testutil"
)

// backendSeen is what the HTTP/1 backend of TestH2TraceContext received.
type backendSeen struct {
	traceparent, tracestate []string
}

// h2Spans takes the server spans of the given paths and the client spans
// of the given paths, exactly, and fails on any other within 300 ms.
func h2Spans(t *testing.T, servers *probe.Sub[ServerRequest], clients *probe.Sub[ClientRequest], srv, cli []string) (map[string]ServerRequest, map[string]ClientRequest) {
	t.Helper()
	return h2SpansLossy(t, servers, clients, srv, cli, nil)
}

// h2SpansLossy is h2Spans where requests the kernel counted as not traced
// may be missing: lost reports how many it counted that no earlier call
// accounted for (on 7.x uprobe programs are preempted, and a request
// whose entry another overtook on its CPU is dropped and counted). Once
// the spans stop coming, at most that many may be missing; they are
// logged. nil: none may be.
func h2SpansLossy(t *testing.T, servers *probe.Sub[ServerRequest], clients *probe.Sub[ClientRequest], srv, cli []string, lost func(missing int) bool) (map[string]ServerRequest, map[string]ClientRequest) {
	t.Helper()
	gs, gc := map[string]ServerRequest{}, map[string]ClientRequest{}
	timeout := time.After(testutil.Timeout(10 * time.Second))
	for len(gs) < len(srv) || len(gc) < len(cli) {
		select {
		case s := <-servers.C():
			if _, dup := gs[s.Path]; dup || !slices.Contains(srv, s.Path) {
				t.Fatalf("unexpected server span %+v", s)
			}
			gs[s.Path] = s
		case c := <-clients.C():
			if _, dup := gc[c.Path]; dup || !slices.Contains(cli, c.Path) {
				t.Fatalf("unexpected client span %+v", c)
			}
			gc[c.Path] = c
		case <-timeout:
			if missing := len(srv) - len(gs) + len(cli) - len(gc); lost != nil && lost(missing) {
				t.Logf("%d spans missing, as many counted as not traced: got server spans %v and client spans %v", missing, keys(gs), keys(gc))
				return gs, gc
			}
			t.Fatalf("got server spans %v and client spans %v, want %v and %v", keys(gs), keys(gc), srv, cli)
		}
	}
	select {
	case s := <-servers.C():
		t.Fatalf("extra server span %+v", s)
	case c := <-clients.C():
		t.Fatalf("extra client span %+v", c)
	case <-time.After(300 * time.Millisecond):
	}
	return gs, gc
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestH2TraceContext: an HTTP/2 request (h2c from a Go client and from
// curl --http2-prior-knowledge, TLS with ALPN from curl --http2) with a
// traceparent, sampled or not, and a tracestate is served as the child of
// that remote span, with its sampled flag; the client request its handler
// makes with its context carries the trace on, with the tracestate, to an
// HTTP/1 backend. Without a traceparent, a request starts a trace.
func TestH2TraceContext(t *testing.T) {
	a, servers, clients := attachSelf(t, true)
	if !a.h2ctx {
		t.Fatal("HTTP/2 incoming trace context not read (see Status.Skipped)")
	}
	var accounted uint64 // kernel losses the concurrent requests explain
	seen := make(chan backendSeen, 16)
	backend, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bsrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- backendSeen{r.Header.Values("Traceparent"), r.Header.Values("Tracestate")}
		io.WriteString(w, "backend\n")
	})}
	go bsrv.Serve(backend)
	t.Cleanup(func() { bsrv.Close() })
	mux := testMux(func() string { return "http://" + backend.Addr().String() })

	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h2c := &http.Server{Protocols: &protos, Handler: mux}
	go h2c.Serve(ln)
	t.Cleanup(func() { h2c.Close() })
	h2cURL := "http://" + ln.Addr().String()

	cert, _ := selfSigned(t)
	tln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tsrv := &http.Server{Handler: mux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go tsrv.ServeTLS(tln, "", "")
	t.Cleanup(func() { tsrv.Close() })
	tlsURL := "https://" + tln.Addr().String()

	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &h2}
	t.Cleanup(tr.CloseIdleConnections)
	goH2C := func(t *testing.T, path string, hdr http.Header) {
		req, _ := http.NewRequestWithContext(context.Background(), "GET", h2cURL+path, nil)
		for k, v := range hdr {
			req.Header[k] = v
		}
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
			t.Fatalf("%s: %d over HTTP/%d", path, resp.StatusCode, resp.ProtoMajor)
		}
	}
	curl := func(url, flag string) func(*testing.T, string, http.Header) {
		return func(t *testing.T, path string, hdr http.Header) {
			testutil.Need(t, exec.LookPath, "curl")
			if !curlHTTP2(t) {
				testutil.Unavailable(t, "this curl has no HTTP/2 (curl -V lists no HTTP2)")
			}
			var flags []string
			for k, vs := range hdr {
				for _, v := range vs {
					flags = append(flags, "-H", k+": "+v)
				}
			}
			runCurl(t, request{path: path, status: 200}, url, "2", append(flags, flag)...)
		}
	}
	clientsOf := map[string]func(*testing.T, string, http.Header){
		"go-h2c":   goH2C,
		"curl-h2c": curl(h2cURL, "--http2-prior-knowledge"),
		"curl-tls": curl(tlsURL, "--http2"),
	}
	const tid, pid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	const state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
	for _, name := range []string{"go-h2c", "curl-h2c", "curl-tls"} {
		do := clientsOf[name]
		// The Go client's own requests are traced too (HTTP/2: not
		// propagated; the test's traceparent is its own).
		var own []string
		if name == "go-h2c" {
			own = []string{"/call"}
		}
		for _, flags := range []string{"01", "00"} {
			t.Run(name+"/flags-"+flags, func(t *testing.T) {
				do(t, "/call", http.Header{"Traceparent": {"00-" + tid + "-" + pid + "-" + flags}, "Tracestate": {state}})
				gs, gc := h2Spans(t, servers, clients, []string{"/call", "/backend"}, append([]string{"/backend"}, own...))
				call, out, back := gs["/call"], gc["/backend"], gs["/backend"]
				if call.ProtocolVersion.String() != "2" || call.Span.TraceID.String() != tid || call.Span.ParentSpanID.String() != pid ||
					!call.Span.RemoteParent || call.Span.Sampled != (flags == "01") {
					t.Errorf("HTTP/2 span %+v over %v: want the remote child of %s-%s, sampled %v", call.Span, call.ProtocolVersion, tid, pid, flags == "01")
				}
				if out.Span.TraceID != call.Span.TraceID || out.Span.ParentSpanID != call.Span.SpanID || out.Propagation != PropagationInjected {
					t.Errorf("client span %+v (%v): want the child of %+v, injected", out.Span, out.Propagation, call.Span)
				}
				if back.Span.TraceID != call.Span.TraceID || back.Span.ParentSpanID != out.Span.SpanID || back.Span.Sampled != (flags == "01") {
					t.Errorf("backend span %+v: want the child of %+v, sampled %v", back.Span, out.Span, flags == "01")
				}
				got := <-seen
				want := "00-" + tid + "-" + out.Span.SpanID.String() + "-" + flags
				if !slices.Equal(got.traceparent, []string{want}) || !slices.Equal(got.tracestate, []string{state}) {
					t.Errorf("backend received traceparent %q, tracestate %q; want [%q], [%q]", got.traceparent, got.tracestate, want, state)
				}
			})
		}
		t.Run(name+"/none", func(t *testing.T) {
			do(t, "/hello", nil)
			var o []string
			if own != nil {
				o = []string{"/hello"}
			}
			gs, _ := h2Spans(t, servers, clients, []string{"/hello"}, o)
			s := gs["/hello"]
			if !s.Span.TraceID.IsValid() || s.Span.TraceID.String() == tid || s.Span.ParentSpanID.IsValid() || s.Span.RemoteParent {
				t.Errorf("HTTP/2 span %+v without traceparent: want a new trace", s.Span)
			}
		})
		// Not a valid traceparent: a new trace; a tracestate alone
		// means nothing.
		t.Run(name+"/invalid", func(t *testing.T) {
			do(t, "/call", http.Header{"Traceparent": {"00-" + tid + "-" + pid + "-0"}, "Tracestate": {state}})
			gs, _ := h2Spans(t, servers, clients, []string{"/call", "/backend"}, append([]string{"/backend"}, own...))
			if s := gs["/call"]; s.Span.TraceID.String() == tid || s.Span.RemoteParent {
				t.Errorf("HTTP/2 span %+v with an invalid traceparent: want a new trace", s.Span)
			}
			if got := <-seen; len(got.tracestate) != 0 {
				t.Errorf("backend received tracestate %q, want none", got.tracestate)
			}
		})
	}
	// Concurrent streams of one connection: each request its own parent.
	t.Run("concurrent", func(t *testing.T) {
		const n = 16
		var wg sync.WaitGroup
		paths := make([]string, n)
		for i := range n {
			paths[i] = fmt.Sprintf("/users/%d", i)
			wg.Go(func() {
				req, _ := http.NewRequest("GET", h2cURL+paths[i], nil)
				req.Header.Set("Traceparent", fmt.Sprintf("00-%032x-%016x-01", i+1, i+100))
				resp, err := tr.RoundTrip(req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			})
		}
		wg.Wait()
		gs, gc := h2SpansLossy(t, servers, clients, paths, paths, func(missing int) bool {
			st, err := a.Stats()
			if err != nil {
				t.Fatal(err)
			}
			// Each counted request is one server span and the client
			// span its handler would have made.
			if uint64(missing) > 2*(st.Lost+st.Missed-accounted) {
				return false
			}
			accounted = st.Lost + st.Missed
			return true
		})
		for i, p := range paths {
			s, ok := gs[p]
			if !ok {
				continue // counted as not traced
			}
			if s.Span.TraceID.String() != fmt.Sprintf("%032x", i+1) || s.Span.ParentSpanID.String() != fmt.Sprintf("%016x", i+100) || !s.Span.RemoteParent {
				t.Errorf("%s: span %+v, want the child of its own traceparent", p, s.Span)
			}
		}
		for _, c := range gc {
			if c.ProtocolVersion.String() != "2" {
				t.Errorf("client over %v, want HTTP/2", c.ProtocolVersion)
			}
		}
	})
	if st, err := a.Stats(); err != nil || st.Lost+st.Missed != accounted {
		t.Errorf("stats %+v, %v: want no loss but the %d the concurrent requests accounted for", st, err, accounted)
	}
}
