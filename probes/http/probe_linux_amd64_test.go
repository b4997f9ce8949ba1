package http_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

// child is testdata/server running with the probe: the spans it reports
// arrive on servers and clients.
type child struct {
	addr    string
	status  fmhttp.Status
	servers chan fmhttp.ServerRequest
	clients chan fmhttp.ClientRequest
}

type line struct {
	Listen string                `json:"listen"`
	Error  string                `json:"error"`
	Status *fmhttp.Status        `json:"status"`
	Server *fmhttp.ServerRequest `json:"server"`
	Client *fmhttp.ClientRequest `json:"client"`
}

var (
	buildMu  sync.Mutex
	built    = map[string]string{}
	buildDir string // removed by TestMain
)

// build returns test program prog (testdata/server, see testprog), built
// once per test binary.
func build(t testing.TB, prog testprog.Program) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if bin, ok := built[prog.Name()]; ok {
		return bin
	}
	if buildDir == "" {
		dir, err := os.MkdirTemp("", "flowmill-http-test-")
		if err != nil {
			t.Fatal(err)
		}
		buildDir = dir
	}
	bin, err := testprog.Build(prog, buildDir)
	if err != nil {
		t.Fatalf("building the test server: %v", err)
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

// start runs test program prog and waits until it serves.
func start(t testing.TB, prog testprog.Program, args ...string) *child {
	t.Helper()
	testutil.RequireBPF(t)
	bin := build(t, prog)
	cmd := exec.Command(bin, args...)
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
	c := &child{servers: make(chan fmhttp.ServerRequest, 1<<14), clients: make(chan fmhttp.ClientRequest, 1<<14)}
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var l line
			if os.Getenv("FMDEBUG") != "" {
				fmt.Fprintln(os.Stderr, "child:", sc.Text())
			}
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Errorf("test server wrote a bad line %q: %v", sc.Text(), err)
				continue
			}
			switch {
			case l.Error != "":
				ready <- fmt.Errorf("%s", l.Error)
				return
			case l.Status != nil:
				c.status = *l.Status
			case l.Listen != "":
				c.addr = l.Listen
				ready <- nil
			case l.Server != nil && strings.HasPrefix(l.Server.Path, "/__"):
				// The test's questions to the child (/__losses,
				// /__stats), not the requests under test.
			case l.Server != nil:
				c.servers <- *l.Server
			case l.Client != nil:
				c.clients <- *l.Client
			}
		}
		ready <- fmt.Errorf("test server exited: %v", sc.Err())
	}()
	select {
	case err := <-ready:
		if err != nil {
			if strings.Contains(err.Error(), "insufficient privileges") || strings.Contains(err.Error(), "not supported") || strings.Contains(err.Error(), "BTF") {
				testutil.Unavailable(t, "%v", err)
			}
			t.Fatalf("test server: %v", err)
		}
	case <-time.After(testutil.Timeout(60 * time.Second)):
		t.Fatal("test server did not start within 60s")
	}
	return c
}

func (c *child) url(path string) string { return "http://" + c.addr + path }

// losses returns what the child's session counted as lost, evicted or
// dropped.
func (c *child) losses() string {
	resp, err := http.Get(c.url("/__losses"))
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b))
}

// sessionStats returns what the child's session read, lost and evicted.
func (c *child) sessionStats(t *testing.T) (read, lost, evicted uint64) {
	t.Helper()
	read, lost, evicted, _ = c.sessionStatsMissed(t)
	return read, lost, evicted
}

// sessionStatsMissed is sessionStats and the hook hits the kernel skipped
// (Linux 5.12 and later count them).
func (c *child) sessionStatsMissed(t *testing.T) (read, lost, evicted, missed uint64) {
	t.Helper()
	var l struct {
		Session struct{ EventsRead, EventsLost, Evicted, Missed uint64 }
	}
	if err := json.Unmarshal([]byte(c.losses()), &l); err != nil {
		t.Fatalf("the child's losses: %v", err)
	}
	return l.Session.EventsRead, l.Session.EventsLost, l.Session.Evicted, l.Session.Missed
}

// collectAll collects nSrv server and nCli client spans. Where some never
// come, the child's session must account for every request: read from the
// kernel (and then on its way here), or counted as lost or evicted (under
// preemption a request can be lost, never silently). It returns what came
// and the number of requests that did not.
func (c *child) collectAll(t *testing.T, nSrv, nCli int) ([]fmhttp.ServerRequest, []fmhttp.ClientRequest, uint64) {
	t.Helper()
	var srv []fmhttp.ServerRequest
	var cli []fmhttp.ClientRequest
	timeout := time.After(testutil.Timeout(20 * time.Second))
	for len(srv) < nSrv || len(cli) < nCli {
		select {
		case s := <-c.servers:
			srv = append(srv, s)
		case s := <-c.clients:
			cli = append(cli, s)
		case <-timeout:
			read, lost, evicted, missed := c.sessionStatsMissed(t)
			// What the session read is delivered: wait for any still on
			// its way.
			for late := time.After(testutil.Timeout(2 * time.Second)); uint64(len(srv)+len(cli)) < read; {
				select {
				case s := <-c.servers:
					srv = append(srv, s)
					continue
				case s := <-c.clients:
					cli = append(cli, s)
					continue
				case <-late:
				}
				break
			}
			got, want := uint64(len(srv)+len(cli)), uint64(nSrv+nCli)
			// Where the kernel preempts uprobe programs (the session
			// then counts overtaken entries as lost), a preempted
			// program also makes the kernel skip the uprobe programs
			// of other threads on its CPU (bpf_prog_active): hits
			// counted as missed (5.12+), each of which may be a
			// request's entry. Requests up to the missed hits are
			// allowed, and logged; and, as before missed hits were
			// looked at, up to 1% where some were lost (one request in
			// about 600 went uncounted on emulated 7.3); never where
			// nothing was lost or missed.
			unaccounted := int64(want) - int64(got+lost+evicted)
			if unaccounted > 0 && (uint64(unaccounted) <= missed || lost > 0 && uint64(unaccounted)*100 <= want) {
				t.Logf("%d requests neither traced nor counted (a preempting kernel; %d hits missed)", unaccounted, missed)
			} else if unaccounted > 0 {
				t.Fatalf("got %d of %d server and %d of %d client spans; the session read %d and counted %d lost, %d evicted, %d hits missed: %d requests unaccounted for; the child's counts: %s", len(srv), nSrv, len(cli), nCli, read, lost, evicted, missed, want-got-lost-evicted, c.losses())
			}
			missing := want - got
			t.Logf("got %d of %d server and %d of %d client spans; the session read %d and counted %d lost, %d evicted, %d hits missed", len(srv), nSrv, len(cli), nCli, read, lost, evicted, missed)
			return srv, cli, missing
		}
	}
	select {
	case s := <-c.servers:
		t.Fatalf("extra server span %+v", s)
	case s := <-c.clients:
		t.Fatalf("extra client span %+v", s)
	case <-time.After(300 * time.Millisecond):
	}
	return srv, cli, 0
}

// nServers collects n server spans, then makes sure no extra one follows.
func (c *child) nServers(t *testing.T, n int) []fmhttp.ServerRequest {
	t.Helper()
	var out []fmhttp.ServerRequest
	timeout := time.After(testutil.Timeout(20 * time.Second))
	for len(out) < n {
		select {
		case s := <-c.servers:
			out = append(out, s)
		case <-timeout:
			t.Fatalf("got %d server spans, want %d; the probe's losses: %s", len(out), n, c.losses())
		}
	}
	select {
	case s := <-c.servers:
		t.Fatalf("extra server span %+v", s)
	case <-time.After(300 * time.Millisecond):
	}
	return out
}

func (c *child) nClients(t *testing.T, n int) []fmhttp.ClientRequest {
	t.Helper()
	var out []fmhttp.ClientRequest
	timeout := time.After(testutil.Timeout(20 * time.Second))
	for len(out) < n {
		select {
		case s := <-c.clients:
			out = append(out, s)
		case <-timeout:
			t.Fatalf("got %d client spans, want %d; the probe's losses: %s", len(out), n, c.losses())
		}
	}
	select {
	case s := <-c.clients:
		t.Fatalf("extra client span %+v", s)
	case <-time.After(300 * time.Millisecond):
	}
	return out
}

// curl runs curl and returns the status and the local port it used.
func curl(t *testing.T, args ...string) (status, port int) {
	t.Helper()
	out, err := exec.Command("curl", append([]string{"-s", "-o", "/dev/null", "-w", "%{http_code} %{local_port}"}, args...)...).Output()
	if err != nil {
		t.Fatalf("curl %v: %v", args, err)
	}
	if _, err := fmt.Sscan(string(out), &status, &port); err != nil {
		t.Fatalf("curl output %q: %v", out, err)
	}
	return status, port
}

var builds = []struct {
	name string
	prog testprog.Program
}{
	{"default", testprog.HTTPServer},
	{"stripped", testprog.HTTPServerStripped},
	{"pie", testprog.HTTPServerPIE},
}

// TestServerSpans: every request, from curl and from a Go client, yields
// exactly one span with the right method, path, route, status, peer and a
// duration containing the handler's sleep.
func TestServerSpans(t *testing.T) {
	testutil.Need(t, exec.LookPath, "curl")
	for _, b := range builds {
		t.Run(b.name, func(t *testing.T) {
			c := start(t, b.prog)
			if !c.status.Server || !c.status.Client {
				t.Fatalf("status %+v: want server and client instrumented", c.status)
			}
			type want struct {
				method, path, route string
				status              int
				port                int
				minDur              time.Duration
				reqBody, respBody   int64
			}
			wants := map[string]want{}
			for _, r := range []struct {
				path, route string
				status      int
				body        int64
			}{
				{"/hello", "/hello", 200, 6},
				{"/users/42", "/users/{id}", 200, 8},
				{"/fail", "/fail", 500, 7},
				{"/nope", "", 404, 19},
				{"/empty", "/empty", 200, 0},
			} {
				code, port := curl(t, c.url(r.path))
				if code != r.status {
					t.Fatalf("curl %s: %d", r.path, code)
				}
				wants[r.path] = want{"GET", r.path, r.route, r.status, port, 0, 0, r.body}
			}
			code, port := curl(t, c.url("/sleep/80"))
			wants["/sleep/80"] = want{"GET", "/sleep/80", "/sleep/{ms}", code, port, 80 * time.Millisecond, 0, 0}
			code, port = curl(t, "-d", "0123456789", c.url("/echo"))
			wants["/echo"] = want{"POST", "/echo", "/echo", code, port, 0, 10, 10}
			// A Go client on one keep-alive connection.
			var local string
			tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
				if err == nil {
					local = conn.LocalAddr().String()
				}
				return conn, err
			}}
			defer tr.CloseIdleConnections()
			for i := range 3 {
				path := fmt.Sprintf("/users/go%d", i)
				resp, err := (&http.Client{Transport: tr}).Get(c.url(path))
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				_, p, _ := net.SplitHostPort(local)
				port, _ := strconv.Atoi(p)
				wants[path] = want{"GET", path, "/users/{id}", 200, port, 0, 0, int64(len("user go0\n"))}
			}
			spans := c.nServers(t, len(wants))
			for _, s := range spans {
				w, ok := wants[s.Path]
				if !ok {
					t.Errorf("unexpected span %+v", s)
					continue
				}
				delete(wants, s.Path)
				if s.Method != w.method || s.Route != w.route || s.StatusCode != w.status || int(s.Peer.Port()) != w.port || !s.Peer.Addr().IsLoopback() {
					t.Errorf("span %s %s route %q status %d peer %v; want %s route %q status %d port %d", s.Method, s.Path, s.Route, s.StatusCode, s.Peer, w.method, w.route, w.status, w.port)
				}
				if d := s.Duration(); d < w.minDur || d > w.minDur+2*time.Second {
					t.Errorf("%s: duration %v, want at least %v", s.Path, d, w.minDur)
				}
				if s.RequestBodySize != w.reqBody || s.ResponseBodySize != w.respBody {
					t.Errorf("%s: body sizes %d/%d, want %d/%d", s.Path, s.RequestBodySize, s.ResponseBodySize, w.reqBody, w.respBody)
				}
				if !s.Span.TraceID.IsValid() || !s.Span.SpanID.IsValid() || s.Span.ParentSpanID.IsValid() || s.Span.RemoteParent {
					t.Errorf("%s: span context %+v, want a new root span", s.Path, s.Span)
				}
			}
			if len(wants) > 0 {
				t.Errorf("no span for %v", wants)
			}
		})
	}
}

// TestTraceparent: a request carrying a W3C traceparent yields a span in
// that trace, child of that span.
func TestTraceparent(t *testing.T) {
	testutil.Need(t, exec.LookPath, "curl")
	c := start(t, testprog.HTTPServerStripped)
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	curl(t, "-H", "traceparent: "+tp, c.url("/hello"))
	curl(t, "-H", "TraceParent:"+strings.Replace(tp, "-01", "-00", 1), "-H", "X-Other: 1", c.url("/users/1"))
	curl(t, "-H", "traceparent: 00-zzz-bad", c.url("/fail"))
	req, _ := http.NewRequest("GET", c.url("/proxy"), nil)
	req.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// /proxy makes a request to /hello: 5 server spans, 1 client span.
	byPath := map[string]fmhttp.ServerRequest{}
	for _, s := range c.nServers(t, 5) {
		if s.Path == "/hello" && s.Span.TraceID.String() == "0af7651916cd43dd8448eb211c80319c" {
			byPath["/hello (proxied)"] = s
			continue
		}
		byPath[s.Path] = s
	}
	check := func(path, trace, parent string, sampled bool) {
		t.Helper()
		s := byPath[path]
		if s.Span.TraceID.String() != trace || s.Span.ParentSpanID.String() != parent || !s.Span.RemoteParent || s.Span.Sampled != sampled {
			t.Errorf("%s: span %+v, want trace %s parent %s sampled %v", path, s.Span, trace, parent, sampled)
		}
	}
	check("/hello", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", true)
	check("/users/1", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", false)
	check("/proxy", "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", true)
	if s := byPath["/fail"]; s.Span.RemoteParent || s.Span.ParentSpanID.IsValid() {
		t.Errorf("malformed traceparent: span %+v, want a root", s.Span)
	}
	cl := c.nClients(t, 1)[0]
	if cl.Span.TraceID.String() != "0af7651916cd43dd8448eb211c80319c" || cl.Span.ParentSpanID != byPath["/proxy"].Span.SpanID {
		t.Errorf("client span %+v is not a child of the /proxy span %+v", cl.Span, byPath["/proxy"].Span)
	}
	// Propagated: the /hello it requested continues the trace, as the
	// child of the client span.
	if h := byPath["/hello (proxied)"]; h.Span.ParentSpanID != cl.Span.SpanID || !h.Span.RemoteParent || !h.Span.Sampled {
		t.Errorf("proxied /hello %+v is not the child of the client span %+v", h.Span, cl.Span)
	}
}

// TestTraceparentH2: an HTTP/2 request (h2c, curl --http2-prior-knowledge)
// with a traceparent is served in that trace, as the child of that span,
// in every build (stripped: no symbols, no DWARF); without one it starts a
// trace. Status says nothing of HTTP/2 trace context skipped.
func TestTraceparentH2(t *testing.T) {
	testutil.Need(t, exec.LookPath, "curl")
	if out, err := exec.Command("curl", "-V").Output(); err != nil || !strings.Contains(string(out), "HTTP2") {
		testutil.Unavailable(t, "this curl has no HTTP/2 (curl -V lists no HTTP2)")
	}
	for _, b := range builds {
		t.Run(b.name, func(t *testing.T) {
			c := start(t, b.prog)
			if !c.status.ServerHTTP2 || slices.ContainsFunc(c.status.Skipped, func(s string) bool { return strings.Contains(s, "over HTTP/2") }) {
				t.Fatalf("status %+v: want HTTP/2 served requests instrumented with their trace context", c.status)
			}
			const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
			curl(t, "--http2-prior-knowledge", "-H", "traceparent: "+tp, "-H", "tracestate: a=b", c.url("/hello"))
			curl(t, "--http2-prior-knowledge", "-H", "traceparent: "+strings.Replace(tp, "-01", "-00", 1), c.url("/users/1"))
			curl(t, "--http2-prior-knowledge", c.url("/empty"))
			byPath := map[string]fmhttp.ServerRequest{}
			for _, s := range c.nServers(t, 3) {
				byPath[s.Path] = s
				if s.ProtocolVersion.String() != "2" {
					t.Errorf("%s over %v, want HTTP/2", s.Path, s.ProtocolVersion)
				}
			}
			for path, sampled := range map[string]bool{"/hello": true, "/users/1": false} {
				s := byPath[path]
				if s.Span.TraceID.String() != "4bf92f3577b34da6a3ce929d0e0e4736" || s.Span.ParentSpanID.String() != "00f067aa0ba902b7" ||
					!s.Span.RemoteParent || s.Span.Sampled != sampled {
					t.Errorf("%s: span %+v, want the child of %s, sampled %v", path, s.Span, tp, sampled)
				}
			}
			if s := byPath["/empty"]; s.Span.RemoteParent || s.Span.ParentSpanID.IsValid() || !s.Span.TraceID.IsValid() {
				t.Errorf("/empty: span %+v, want a root", s.Span)
			}
		})
	}
}

// TestClientSpans: an outgoing request made by a handler is a child of the
// handler's span, found by goroutine (/proxy) or by context from another
// goroutine (/fanout); a failed request reports its error type (read from
// the program's type data, wherever the build puts it).
func TestClientSpans(t *testing.T) {
	for _, b := range builds {
		t.Run(b.name, func(t *testing.T) { testClientSpans(t, b.prog) })
	}
}

func testClientSpans(t *testing.T, prog testprog.Program) {
	c := start(t, prog)
	for _, p := range []string{"/proxy", "/fanout", "/refused"} {
		resp, err := http.Get(c.url(p))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	servers := map[trace.SpanID]fmhttp.ServerRequest{}
	for _, s := range c.nServers(t, 5) { // 3 + 2 proxied /hello
		servers[s.Span.SpanID] = s
	}
	for _, cl := range c.nClients(t, 3) {
		parent, ok := servers[cl.Span.ParentSpanID]
		if !ok || parent.Span.TraceID != cl.Span.TraceID {
			t.Errorf("client %s%s: parent %v not a server span of its trace", cl.Host, cl.Path, cl.Span.ParentSpanID)
			continue
		}
		if !parent.Start.Before(cl.Start) || cl.End.After(parent.End) {
			t.Errorf("client %s: [%v, %v] not within its parent [%v, %v]", cl.Path, cl.Start, cl.End, parent.Start, parent.End)
		}
		switch parent.Path {
		case "/proxy", "/fanout":
			want := map[string]fmhttp.ParentLink{"/proxy": fmhttp.ParentByGoroutine, "/fanout": fmhttp.ParentByContext}[parent.Path]
			if cl.Method != "GET" || cl.Host != c.addr || cl.Path != "/hello" || cl.StatusCode != 200 || cl.Error != "" || cl.Parent != want {
				t.Errorf("client under %s: %+v", parent.Path, cl)
			}
		case "/refused":
			if cl.Host != "127.0.0.1:1" || cl.StatusCode != 0 || cl.Error != "*net.OpError" || cl.Parent != fmhttp.ParentByContext {
				t.Errorf("refused client: %+v", cl)
			}
		default:
			t.Errorf("client span under %s", parent.Path)
		}
	}
}

// TestConcurrent: hundreds of concurrent requests, each tagged with its own
// traceparent; every span must carry its own request's path and status,
// and each proxied client span must be the child of its own server span.
func TestConcurrent(t *testing.T) {
	c := start(t, testprog.HTTPServer)
	const n = 400
	tr := &http.Transport{MaxIdleConnsPerHost: 100}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	type want struct {
		path   string
		status int
	}
	wants := make(map[trace.TraceID]want, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	proxies := 0
	for i := range n {
		var tid trace.TraceID
		copy(tid[:], fmt.Sprintf("req-%012d", i))
		w := want{fmt.Sprintf("/users/%d", i), 200}
		switch i % 4 {
		case 1:
			w = want{fmt.Sprintf("/sleep/%d", i%7), 202}
		case 2:
			w = want{"/fail", 500}
		case 3:
			w = want{"/proxy", 200}
			proxies++
		}
		wants[tid] = w
		wg.Go(func() {
			req, _ := http.NewRequest("GET", c.url(w.path), nil)
			req.Header.Set("traceparent", fmt.Sprintf("00-%s-%016x-01", tid, i+1))
			resp, err := client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			mu.Lock()
			defer mu.Unlock()
			if resp.StatusCode != w.status {
				t.Errorf("%s: %d %s", w.path, resp.StatusCode, bytes.TrimSpace(body))
			}
		})
	}
	wg.Wait()
	spans, clients, lost := c.collectAll(t, n+proxies, proxies)
	// Where the session counted losses (a kernel that preempts uprobe
	// programs), a lost entry also leaves its relatives wrong: the client
	// request of a /proxy whose server entry was lost starts a trace of
	// its own, which the /hello it requests carries on; a connection whose
	// tracking hit was missed is not propagated. Such anomalies are
	// allowed up to twice the losses counted (and the requests whose trace
	// context was not propagated), and logged; none where nothing was lost.
	var anomalies []string
	bad := func(format string, args ...any) { anomalies = append(anomalies, fmt.Sprintf(format, args...)) }
	byTrace := map[trace.TraceID]fmhttp.ServerRequest{}
	proxied := map[trace.TraceID]fmhttp.ServerRequest{} // the /hello each /proxy requested
	for _, s := range spans {
		if !s.Span.RemoteParent {
			bad("root span for %s", s.Path)
			continue
		}
		w, ok := wants[s.Span.TraceID]
		if !ok {
			bad("span with unknown trace: %+v", s)
			continue
		}
		if w.path == "/proxy" && s.Path == "/hello" {
			// In the /proxy's trace, the child of its client span
			// (propagation).
			proxied[s.Span.TraceID] = s
			continue
		}
		if _, dup := byTrace[s.Span.TraceID]; dup {
			bad("two spans for %s", w.path)
		}
		byTrace[s.Span.TraceID] = s
		if s.Path != w.path || s.StatusCode != w.status {
			bad("span for %s (%d) has %s (%d)", w.path, w.status, s.Path, s.StatusCode)
		}
	}
	if uint64(len(byTrace))+lost < n || lost == 0 && len(byTrace) != n {
		t.Errorf("%d requests matched, want %d (%d losses counted)", len(byTrace), n, lost)
	}
	for _, cl := range clients {
		parent, ok := byTrace[cl.Span.TraceID]
		if !ok && lost > 0 {
			continue // its /proxy span may be the one lost
		}
		if !ok || parent.Path != "/proxy" || parent.Span.SpanID != cl.Span.ParentSpanID {
			bad("client span %+v not the child of its /proxy span", cl.Span)
		}
		if h, ok := proxied[cl.Span.TraceID]; (ok || lost == 0) && h.Span.ParentSpanID != cl.Span.SpanID {
			bad("the /hello %+v a /proxy requested is not the child of its client span %+v", h.Span, cl.Span)
		}
	}
	_, lostNow, evicted, missed := c.sessionStatsMissed(t)
	ps := c.propagation(t)
	budget := 2*(lostNow+evicted+missed) + ps.Failed + ps.Untracked
	for _, a := range anomalies {
		if lostNow+evicted+missed == 0 || uint64(len(anomalies)) > budget {
			t.Error(a)
		} else {
			t.Log(a)
		}
	}
	if len(anomalies) > 0 {
		t.Logf("%d anomalies; the session counted %d lost, %d evicted, %d hits missed; propagation %+v", len(anomalies), lostNow, evicted, missed, ps)
	}
}

// TestIDs: under hundreds of concurrent requests, every span ID and every
// new trace ID is non-zero and unique, and they look random: no bit stuck,
// no two close together (sequential), and nothing left to learn from one of
// them by inverting the splitmix64 finalizer the probe once used on a
// counter (whose output gave away the seed and so every other ID).
func TestIDs(t *testing.T) {
	c := start(t, testprog.HTTPServer)
	const n = 400
	tr := &http.Transport{MaxIdleConnsPerHost: 100}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	proxies := 0
	var wg sync.WaitGroup
	for i := range n {
		path := fmt.Sprintf("/users/%d", i)
		if i%4 == 3 {
			path = "/proxy" // a client span, and a root /hello
			proxies++
		}
		wg.Go(func() {
			resp, err := client.Get(c.url(path))
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		})
	}
	wg.Wait()
	srv, cli, _ := c.collectAll(t, n+proxies, proxies)
	var spans []uint64
	var traces []trace.TraceID
	for _, s := range srv {
		spans = append(spans, binary.BigEndian.Uint64(s.Span.SpanID[:]))
		// Every served request here is a root, but the /hello a /proxy
		// requests, which continues its trace (propagation).
		if !s.Span.RemoteParent {
			traces = append(traces, s.Span.TraceID)
		}
	}
	for _, cl := range cli {
		spans = append(spans, binary.BigEndian.Uint64(cl.Span.SpanID[:]))
	}
	if len(spans) < n {
		t.Fatalf("only %d spans", len(spans))
	}
	seenTrace := map[trace.TraceID]bool{}
	related := 0
	for _, tid := range traces {
		if !tid.IsValid() {
			t.Errorf("zero trace ID")
		}
		if seenTrace[tid] {
			t.Errorf("trace ID %v twice", tid)
		}
		seenTrace[tid] = true
		// The two halves of a trace ID are independent draws.
		lo, hi := binary.LittleEndian.Uint64(tid[:8]), binary.LittleEndian.Uint64(tid[8:])
		if d := unmix64(lo) ^ unmix64(hi); d < 1<<32 {
			related++
			if related == 1 {
				t.Errorf("trace ID %v: its halves unmix to values %#x apart", tid, d)
			}
		}
	}
	if related > 0 {
		t.Errorf("%d of %d trace IDs have related halves", related, len(traces))
	}
	checkRandom(t, "span", spans)
	var halves []uint64
	for _, tid := range traces {
		halves = append(halves, binary.BigEndian.Uint64(tid[:8]), binary.BigEndian.Uint64(tid[8:]))
	}
	checkRandom(t, "trace ID half", halves)
}

// checkRandom fails t unless ids are non-zero, distinct, not close to one
// another, have every bit set in about half of them, and do not share their
// high bits once unmixed (splitmix64 of a seed xor a counter).
func checkRandom(t *testing.T, what string, ids []uint64) {
	t.Helper()
	sorted := slices.Clone(ids)
	slices.Sort(sorted)
	for i, v := range sorted {
		if v == 0 {
			t.Errorf("%s ID 0", what)
		}
		if i > 0 && v-sorted[i-1] < 1<<24 {
			t.Errorf("%s IDs %#x and %#x: %d apart", what, sorted[i-1], v, v-sorted[i-1])
		}
	}
	for b := range 64 {
		set := 0
		for _, v := range ids {
			set += int(v >> b & 1)
		}
		if set*10 < len(ids)*3 || set*10 > len(ids)*7 {
			t.Errorf("%s IDs: bit %d set in %d of %d", what, b, set, len(ids))
		}
	}
	top := map[uint64]bool{}
	for _, v := range ids {
		top[unmix64(v)>>52] = true
	}
	if len(top) < 16 {
		t.Errorf("%s IDs: unmixed, %d IDs share %d values of their top 12 bits", what, len(ids), len(top))
	}
}

// unmix64 inverts splitmix64's finalizer (z += golden; z = (z^z>>30)*m1;
// z = (z^z>>27)*m2; z ^= z>>31).
func unmix64(z uint64) uint64 {
	z = unshift(z, 31)
	z *= 0x319642b2d24d8ec3 // inverse of 0x94d049bb133111eb
	z = unshift(z, 27)
	z *= 0x96de1b173f119089 // inverse of 0xbf58476d1ce4e5b9
	z = unshift(z, 30)
	return z - 0x9e3779b97f4a7c15
}

// unshift inverts z ^= z >> s.
func unshift(z uint64, s uint) uint64 {
	x := z
	for range 64 / s {
		x = z ^ x>>s
	}
	return x
}

func TestUnmix64(t *testing.T) {
	mix := func(z uint64) uint64 {
		z += 0x9e3779b97f4a7c15
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		return z ^ z>>31
	}
	for _, v := range []uint64{0, 1, 42, 1 << 63, ^uint64(0), 0x123456789abcdef} {
		if got := unmix64(mix(v)); got != v {
			t.Errorf("unmix64(mix64(%#x)) = %#x", v, got)
		}
	}
}
