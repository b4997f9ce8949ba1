package http

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testutil"
)

// selfSigned makes a certificate for 127.0.0.1 and localhost, and a pool
// that trusts it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "flowmill test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool
}

// testMux serves the routes the HTTP/2 and TLS tests request; /call makes
// a client request to backend with the request's context.
func testMux(backend func() string) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "user "+r.PathValue("id")+"\n")
	})
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "failed", http.StatusInternalServerError)
	})
	mux.HandleFunc("GET /empty", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) })
	mux.HandleFunc("GET /call", func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), "GET", backend()+"/backend", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		io.WriteString(w, "called\n")
	})
	return mux
}

// served is what a server span should say.
type served struct {
	method, route string
	status        int
	respBody      int64
	reqBody       int64
	version       string
	scheme        Scheme
}

// request is one request a test makes, and what its span should say.
type request struct {
	path     string
	body     string // POST it
	status   int
	route    string
	respBody int64
}

var requests = []request{
	{"/hello", "", 200, "/hello", 6},
	{"/users/42", "", 200, "/users/{id}", 8},
	{"/fail", "", 500, "/fail", 7},
	{"/nope", "", 404, "", 19},
	{"/empty", "", 200, "/empty", 0},
	{"/echo", "0123456789", 200, "/echo", 10},
}

// curlHTTP2 says whether this machine's curl speaks HTTP/2 (nghttp2).
func curlHTTP2(t *testing.T) bool {
	out, err := exec.Command("curl", "-V").Output()
	return err == nil && strings.Contains(string(out), "HTTP2")
}

// runCurl requests url with curl and extra flags; it checks the status and
// the HTTP version curl used.
func runCurl(t *testing.T, r request, url, version string, flags ...string) {
	t.Helper()
	args := append([]string{"-sS", "-k", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"}, flags...)
	if r.body != "" {
		args = append(args, "--data-binary", r.body)
	}
	out, err := exec.Command("curl", append(args, url+r.path)...).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %v: %v: %s", args, err, out)
	}
	if got := fmt.Sprintf("%d %s", r.status, version); strings.TrimSpace(string(out)) != got {
		t.Fatalf("curl %s: %q, want %q", r.path, out, got)
	}
}

// goGet makes the requests with a Go client and checks the versions.
func goGet(t *testing.T, c *http.Client, r request, url string, major int) {
	t.Helper()
	var resp *http.Response
	var err error
	if r.body != "" {
		resp, err = c.Post(url+r.path, "text/plain", strings.NewReader(r.body))
	} else {
		resp, err = c.Get(url + r.path)
	}
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != r.status || resp.ProtoMajor != major {
		t.Fatalf("%s: status %d over HTTP/%d, want %d over HTTP/%d", r.path, resp.StatusCode, resp.ProtoMajor, r.status, major)
	}
}

// checkServed takes a server span per request (by path) and checks it;
// then, that no other follows.
// A request from a client of this process over plain-text HTTP/1 carries
// its client span as the remote parent (propagated); others are roots.
func checkServed(t *testing.T, servers *probe.Sub[ServerRequest], version string, scheme Scheme, reqs []request, propagated bool) map[string]ServerRequest {
	t.Helper()
	want := map[string]request{}
	for _, r := range reqs {
		want[r.path] = r
	}
	got := map[string]ServerRequest{}
	timeout := time.After(testutil.Timeout(10 * time.Second))
	for len(got) < len(reqs) {
		select {
		case s := <-servers.C():
			r, ok := want[s.Path]
			if !ok {
				t.Errorf("unexpected server span %+v", s)
				continue
			}
			if _, dup := got[s.Path]; dup {
				t.Errorf("a second span for %s: %+v", s.Path, s)
			}
			got[s.Path] = s
			method := "GET"
			reqBody := int64(-1)
			if r.body != "" {
				method, reqBody = "POST", int64(len(r.body))
			}
			if s.Method != method || s.Route != r.route || s.StatusCode != r.status || s.ResponseBodySize != r.respBody ||
				s.ProtocolVersion.String() != version || s.Scheme != scheme || !s.Peer.Addr().IsLoopback() || s.Peer.Port() == 0 {
				t.Errorf("span %s %s route %q status %d body %d version %q scheme %v peer %v; want %s route %q status %d body %d version %q scheme %v",
					s.Method, s.Path, s.Route, s.StatusCode, s.ResponseBodySize, s.ProtocolVersion, s.Scheme, s.Peer,
					method, r.route, r.status, r.respBody, version, scheme)
			}
			// HTTP/1 requests without a body declare none (0); HTTP/2
			// ones, with no content-length, an unknown size (-1).
			if s.RequestBodySize != reqBody && !(reqBody == -1 && s.RequestBodySize == 0) {
				t.Errorf("%s: request body %d, want %d", s.Path, s.RequestBodySize, reqBody)
			}
			if !s.Span.TraceID.IsValid() || !s.Span.SpanID.IsValid() || s.Span.ParentSpanID.IsValid() != propagated || s.Span.RemoteParent != propagated {
				t.Errorf("%s: span context %+v, want a remote parent: %v", s.Path, s.Span, propagated)
			}
		case <-timeout:
			t.Fatalf("got %d of %d server spans", len(got), len(reqs))
		}
	}
	select {
	case s := <-servers.C():
		t.Fatalf("extra server span %+v", s)
	case <-time.After(300 * time.Millisecond):
	}
	return got
}

// checkClients takes n client spans and checks their version and scheme.
func checkClients(t *testing.T, clients *probe.Sub[ClientRequest], n int, version string, scheme Scheme, prop Propagation) []ClientRequest {
	t.Helper()
	var out []ClientRequest
	timeout := time.After(testutil.Timeout(10 * time.Second))
	for len(out) < n {
		select {
		case c := <-clients.C():
			out = append(out, c)
			if c.ProtocolVersion.String() != version || c.Scheme != scheme || c.Propagation != prop || c.StatusCode == 0 {
				t.Errorf("client span %s %s%s status %d version %q scheme %v propagation %v; want version %q scheme %v propagation %v",
					c.Method, c.Host, c.Path, c.StatusCode, c.ProtocolVersion, c.Scheme, c.Propagation, version, scheme, prop)
			}
		case <-timeout:
			t.Fatalf("got %d of %d client spans", len(out), n)
		}
	}
	select {
	case c := <-clients.C():
		t.Fatalf("extra client span %+v", c)
	case <-time.After(300 * time.Millisecond):
	}
	return out
}

// TestHTTPS: an HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) hit by curl
// and by Go clients: a server span per request with its protocol version,
// scheme https, route, status and sizes; the Go client's spans with their
// version and scheme, counted as not propagated (TLS, HTTP/2).
func TestHTTPS(t *testing.T) {
	_, servers, clients := attachSelf(t, true)
	if l, _ := programLayout(); l.h2Err != nil {
		t.Fatalf("HTTP/2 serving not instrumented: %v", l.h2Err)
	}
	cert, pool := selfSigned(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: testMux(nil), TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	url := "https://" + ln.Addr().String()

	t.Run("curl-http1.1", func(t *testing.T) {
		testutil.Need(t, exec.LookPath, "curl")
		for _, r := range requests {
			runCurl(t, r, url, "1.1", "--http1.1")
		}
		checkServed(t, servers, "1.1", SchemeHTTPS, requests, false)
	})
	t.Run("curl-http2", func(t *testing.T) {
		testutil.Need(t, exec.LookPath, "curl")
		if !curlHTTP2(t) {
			testutil.Unavailable(t, "this curl has no HTTP/2 (curl -V lists no HTTP2)")
		}
		for _, r := range requests {
			runCurl(t, r, url, "2", "--http2")
		}
		checkServed(t, servers, "2", SchemeHTTPS, requests, false)
	})
	// Over TLS, HTTP/1.1 headers are read from the same bufio.Reader as
	// in plain text (decrypted): traceparent is found. HTTP/2 headers
	// are read from the decoded header fields: found too.
	t.Run("traceparent", func(t *testing.T) {
		testutil.Need(t, exec.LookPath, "curl")
		const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		runCurl(t, requests[0], url, "1.1", "--http1.1", "-H", "traceparent: "+tp)
		s := checkServed(t, servers, "1.1", SchemeHTTPS, requests[:1], true)["/hello"]
		if s.Span.TraceID.String() != "4bf92f3577b34da6a3ce929d0e0e4736" || s.Span.ParentSpanID.String() != "00f067aa0ba902b7" || !s.Span.Sampled {
			t.Errorf("HTTPS HTTP/1.1 span %+v: want the child of %s", s.Span, tp)
		}
		if !curlHTTP2(t) {
			return
		}
		runCurl(t, requests[0], url, "2", "--http2", "-H", "traceparent: "+tp)
		s = checkServed(t, servers, "2", SchemeHTTPS, requests[:1], true)["/hello"]
		if s.Span.TraceID.String() != "4bf92f3577b34da6a3ce929d0e0e4736" || s.Span.ParentSpanID.String() != "00f067aa0ba902b7" || !s.Span.Sampled {
			t.Errorf("HTTPS HTTP/2 span %+v: want the child of %s", s.Span, tp)
		}
	})
	for _, h2 := range []bool{false, true} {
		name, version, major, prop := "go-http1.1", "1.1", 1, PropagationTLS
		if h2 {
			name, version, major, prop = "go-http2", "2", 2, PropagationHTTP2
		}
		t.Run(name, func(t *testing.T) {
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: h2}
			if !h2 {
				tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			t.Cleanup(tr.CloseIdleConnections)
			c := &http.Client{Transport: tr}
			for _, r := range requests {
				goGet(t, c, r, url, major)
			}
			checkServed(t, servers, version, SchemeHTTPS, requests, false)
			checkClients(t, clients, len(requests), version, SchemeHTTPS, prop)
		})
	}
}

// TestH2C: HTTP/2 in plain text with prior knowledge (Server.Protocols
// with UnencryptedHTTP2): server spans with version 2 and scheme http,
// client spans of a Go client with version 2 (not propagated: HTTP/2); a
// client request made by an HTTP/2 handler with its request's context is
// the child of that request's span. HTTP/1 on the same port is traced as
// 1.1.
func TestH2C(t *testing.T) {
	a, servers, clients := attachSelf(t, true)
	backend, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bsrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "backend\n") })}
	go bsrv.Serve(backend)
	t.Cleanup(func() { bsrv.Close() })
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Protocols: &protos, Handler: testMux(func() string { return "http://" + backend.Addr().String() })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	url := "http://" + ln.Addr().String()
	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	tr2 := &http.Transport{Protocols: &h2}
	t.Cleanup(tr2.CloseIdleConnections)

	t.Run("go-h2c", func(t *testing.T) {
		before, err := a.Stats()
		if err != nil {
			t.Fatal(err)
		}
		c := &http.Client{Transport: tr2}
		for _, r := range requests {
			goGet(t, c, r, url, 2)
		}
		checkServed(t, servers, "2", SchemeHTTP, requests, false)
		checkClients(t, clients, len(requests), "2", SchemeHTTP, PropagationHTTP2)
		// Served over HTTP/2: traced, not unsupported; sent over
		// HTTP/2: traced, its trace context not propagated.
		st, err := a.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if d := st.Unsupported - before.Unsupported; d != uint64(len(requests)) || st.Lost != 0 {
			t.Errorf("stats %+v: want %d more unsupported (propagation over HTTP/2), none lost", st, len(requests))
		}
	})
	t.Run("curl-h2c", func(t *testing.T) {
		testutil.Need(t, exec.LookPath, "curl")
		if !curlHTTP2(t) {
			testutil.Unavailable(t, "this curl has no HTTP/2 (curl -V lists no HTTP2)")
		}
		for _, r := range requests {
			runCurl(t, r, url, "2", "--http2-prior-knowledge")
		}
		checkServed(t, servers, "2", SchemeHTTP, requests, false)
	})
	t.Run("http1", func(t *testing.T) {
		tr1 := &http.Transport{}
		t.Cleanup(tr1.CloseIdleConnections)
		c := &http.Client{Transport: tr1}
		for _, r := range requests[:2] {
			goGet(t, c, r, url, 1)
		}
		checkServed(t, servers, "1.1", SchemeHTTP, requests[:2], true)
		checkClients(t, clients, 2, "1.1", SchemeHTTP, PropagationInjected)
	})
	t.Run("parent", func(t *testing.T) {
		goGet(t, &http.Client{Transport: tr2}, request{path: "/call", status: 200}, url, 2)
		var call, back ServerRequest
		timeout := time.After(testutil.Timeout(10 * time.Second))
		for call.Path == "" || back.Path == "" {
			select {
			case s := <-servers.C():
				switch s.Path {
				case "/call":
					call = s
				case "/backend":
					back = s
				default:
					t.Fatalf("unexpected span %+v", s)
				}
			case <-timeout:
				t.Fatal("no server spans for /call and /backend")
			}
		}
		var out, in ClientRequest
		for out.Path == "" || in.Path == "" {
			select {
			case c := <-clients.C():
				switch c.Path {
				case "/backend":
					out = c
				case "/call":
					in = c
				default:
					t.Fatalf("unexpected client span %+v", c)
				}
			case <-timeout:
				t.Fatal("no client spans for /call and /backend")
			}
		}
		if in.ProtocolVersion.String() != "2" || in.Propagation != PropagationHTTP2 ||
			out.ProtocolVersion.String() != "1.1" || out.Propagation != PropagationInjected || out.Scheme != SchemeHTTP {
			t.Errorf("client spans %+v and %+v: want HTTP/2 not propagated, HTTP/1.1 injected", in, out)
		}
		if call.ProtocolVersion.String() != "2" || back.ProtocolVersion.String() != "1.1" {
			t.Errorf("versions %v, %v: want 2 and 1.1", call.ProtocolVersion, back.ProtocolVersion)
		}
		if out.Parent != ParentByContext || out.Span.TraceID != call.Span.TraceID || out.Span.ParentSpanID != call.Span.SpanID {
			t.Errorf("client span %+v: want the child (by context) of the HTTP/2 span %+v", out.Span, call.Span)
		}
		if back.Span.TraceID != call.Span.TraceID || back.Span.ParentSpanID != out.Span.SpanID || !back.Span.RemoteParent {
			t.Errorf("backend span %+v: want the remote child of the client span %+v", back.Span, out.Span)
		}
	})
}
