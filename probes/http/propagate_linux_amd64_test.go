package http_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

// received is a request as service B (this test process, not
// instrumented) received it.
type received struct {
	Seq         string
	Traceparent []string // every value, whatever the case of the names
	Tracestate  []string
	Remote      string // the client's address: the connection
	Size        int
	SHA256      string
	Proto       string
}

// peer is service B: a plain net/http server recording what it receives.
type peer struct {
	srv *httptest.Server
	got chan received
}

// newPeer starts B: plain HTTP/1.1, or over "tls" (HTTP/1.1), "h2"
// (HTTP/2 over TLS) or "h2c" (HTTP/2 without TLS).
func newPeer(t *testing.T, mode string) *peer {
	t.Helper()
	p := &peer{got: make(chan received, 64)}
	p.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("B: reading the body of %s: %v", r.URL, err)
		}
		h := sha256.Sum256(b)
		p.got <- received{
			Seq: r.Header.Get("X-Seq"), Traceparent: r.Header.Values("Traceparent"), Tracestate: r.Header.Values("Tracestate"),
			Remote: r.RemoteAddr, Size: len(b), SHA256: hex.EncodeToString(h[:]), Proto: r.Proto,
		}
	}))
	switch mode {
	case "":
		p.srv.Start()
	case "tls":
		p.srv.StartTLS()
	case "h2":
		p.srv.EnableHTTP2 = true
		p.srv.StartTLS()
	case "h2c":
		ps := new(http.Protocols)
		ps.SetHTTP1(true)
		ps.SetUnencryptedHTTP2(true)
		p.srv.Config.Protocols = ps
		p.srv.Start()
	}
	t.Cleanup(p.srv.Close)
	return p
}

// take returns the n requests B received.
func (p *peer) take(t *testing.T, n int) []received {
	t.Helper()
	var out []received
	timeout := time.After(testutil.Timeout(20 * time.Second))
	for len(out) < n {
		select {
		case r := <-p.got:
			out = append(out, r)
		case <-timeout:
			t.Fatalf("B received %d requests, want %d", len(out), n)
		}
	}
	return out
}

// callResult is what testdata/server's /call answers.
type callResult struct {
	Requests []struct {
		Status int
		Error  string
		Size   int
		SHA256 string
	}
}

// call asks A (c) to make requests (see testdata/server/call.go), sending
// it hdr, and returns what A reports of them.
func (c *child) call(t *testing.T, q url.Values, hdr http.Header) callResult {
	t.Helper()
	req, _ := http.NewRequest("GET", c.url("/call?"+q.Encode()), nil)
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /call?%s: %v", q.Encode(), err)
	}
	defer resp.Body.Close()
	var res callResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /call?%s: %d, %v", q.Encode(), resp.StatusCode, err)
	}
	for i, r := range res.Requests {
		if r.Error != "" || r.Status != 200 {
			t.Errorf("A's request %d: status %d, error %q", i, r.Status, r.Error)
		}
	}
	return res
}

// propagation reads A's propagation counters.
func (c *child) propagation(t *testing.T) fmhttp.PropagationStats {
	t.Helper()
	var l struct{ Propagation fmhttp.PropagationStats }
	if err := json.Unmarshal([]byte(c.losses()), &l); err != nil {
		t.Fatalf("the child's losses: %v", err)
	}
	return l.Propagation
}

// parseTraceparent splits a version-00 traceparent.
func parseTraceparent(t *testing.T, v string) (trace.TraceID, trace.SpanID, string) {
	t.Helper()
	f := strings.Split(v, "-")
	if len(f) != 4 || f[0] != "00" || len(v) != 55 {
		t.Fatalf("traceparent %q is not version 00's 55 characters", v)
	}
	tid, err1 := trace.TraceIDFromHex(f[1])
	sid, err2 := trace.SpanIDFromHex(f[2])
	if err1 != nil || err2 != nil {
		t.Fatalf("traceparent %q: %v %v", v, err1, err2)
	}
	return tid, sid, f[3]
}

// checkInjected checks that every request B received carries exactly one
// traceparent naming the trace of A's served request srv and, as parent,
// the span of the client request A made for it, with flags; that every
// client request was a child of srv and says it was propagated; and that
// bodies arrived as sent. It returns A's client requests by span ID.
func checkInjected(t *testing.T, got []received, cli []fmhttp.ClientRequest, srv fmhttp.ServerRequest, res callResult, flags string) map[trace.SpanID]fmhttp.ClientRequest {
	t.Helper()
	byID := map[trace.SpanID]fmhttp.ClientRequest{}
	for _, c := range cli {
		byID[c.Span.SpanID] = c
		if c.Span.TraceID != srv.Span.TraceID || c.Span.ParentSpanID != srv.Span.SpanID || c.Propagation != fmhttp.PropagationInjected {
			t.Errorf("A's client request %+v (propagation %v) is not a propagated child of its served request %+v", c.Span, c.Propagation, srv.Span)
		}
	}
	seen := map[trace.SpanID]bool{}
	for _, r := range got {
		if len(r.Traceparent) != 1 {
			t.Errorf("B: request %s carries %d traceparent headers %q, want 1", r.Seq, len(r.Traceparent), r.Traceparent)
			continue
		}
		tid, parent, fl := parseTraceparent(t, r.Traceparent[0])
		c, ok := byID[parent]
		switch {
		case !ok:
			t.Errorf("B: request %s: traceparent %s names parent %s, none of A's client spans", r.Seq, r.Traceparent[0], parent)
		case seen[parent]:
			t.Errorf("B: two requests name the same parent %s", parent)
		case tid != srv.Span.TraceID || tid != c.Span.TraceID:
			t.Errorf("B: request %s: trace %s, want A's %s", r.Seq, tid, srv.Span.TraceID)
		case fl != flags:
			t.Errorf("B: request %s: flags %s, want %s", r.Seq, fl, flags)
		}
		seen[parent] = true
		var i int
		fmt.Sscan(r.Seq, &i)
		if i < len(res.Requests) && (r.SHA256 != res.Requests[i].SHA256 && res.Requests[i].SHA256 != "" || r.Size != res.Requests[i].Size) {
			t.Errorf("B: request %s: body of %d bytes, sha256 %s; A sent %d bytes, sha256 %s", r.Seq, r.Size, r.SHA256, res.Requests[i].Size, res.Requests[i].SHA256)
		}
	}
	return byID
}

// TestPropagation: service A (testdata/server with the probe) calls
// service B (this process, plain net/http) over HTTP/1.1 while it serves
// /call. B sees exactly one traceparent per request, with A's trace ID and
// A's client span as parent, and every body byte-exact: the default
// client, a Transport of its own, a 300 KB POST, a 300 KB POST from a file
// (sent with sendfile), a chunked POST, and five requests on one
// keep-alive connection.
func TestPropagation(t *testing.T) {
	a := start(t, testprog.HTTPServer)
	if !a.status.Propagation || !slices.ContainsFunc(a.status.Skipped, func(s string) bool { return strings.Contains(s, "TLS") }) {
		t.Errorf("status %+v: want propagation on, and TLS said not propagated", a.status)
	}
	b := newPeer(t, "")
	for _, tc := range []struct {
		name string
		q    url.Values
		n    int
	}{
		{"default client", url.Values{"client": {"default"}}, 1},
		{"custom transport", url.Values{"client": {"custom"}}, 1},
		{"300 KB POST", url.Values{"client": {"custom"}, "method": {"POST"}, "body": {"fixed"}, "size": {"307200"}}, 1},
		{"300 KB POST from a file", url.Values{"client": {"default"}, "method": {"POST"}, "body": {"file"}, "size": {"307200"}}, 1},
		{"chunked POST", url.Values{"client": {"custom"}, "method": {"POST"}, "body": {"chunked"}, "size": {"100000"}}, 1},
		{"keep-alive", url.Values{"client": {"custom"}, "method": {"POST"}, "body": {"fixed"}, "size": {"3000"}, "n": {"5"}}, 5},
		{"background context", url.Values{"client": {"default"}, "ctx": {"background"}}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.q.Set("url", b.srv.URL+"/b")
			tc.q.Set("seed", fmt.Sprint(len(tc.name)))
			res := a.call(t, tc.q, nil)
			got := b.take(t, tc.n)
			srv := a.nServers(t, 1)[0]
			cli := a.nClients(t, tc.n)
			checkInjected(t, got, cli, srv, res, "01")
			if tc.n > 1 {
				for _, r := range got {
					if r.Remote != got[0].Remote {
						t.Errorf("B: requests came on %s and %s, want one keep-alive connection", got[0].Remote, r.Remote)
					}
				}
			}
		})
	}
	if ps := a.propagation(t); ps.Injected < 11 || ps.Failed != 0 || ps.Untracked != 0 {
		t.Errorf("A's propagation counters %+v: want 11 injected and no failure", ps)
	}
}

// TestPropagationTraceContext: a served request's incoming trace context
// goes on: B sees A's trace (the one A was called in), A's client span as
// parent, the incoming sampled flag (00 stays 00: a request that is not
// sampled still propagates) and the incoming tracestate.
func TestPropagationTraceContext(t *testing.T) {
	a := start(t, testprog.HTTPServer)
	b := newPeer(t, "")
	const tid, pid = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	for _, flags := range []string{"01", "00"} {
		t.Run("flags "+flags, func(t *testing.T) {
			state := "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
			hdr := http.Header{"Traceparent": {"00-" + tid + "-" + pid + "-" + flags}, "Tracestate": {" " + state + " "}}
			res := a.call(t, url.Values{"url": {b.srv.URL + "/b"}, "client": {"custom"}}, hdr)
			got := b.take(t, 1)
			srv := a.nServers(t, 1)[0]
			if srv.Span.TraceID.String() != tid || srv.Span.ParentSpanID.String() != pid || srv.Span.Sampled != (flags == "01") {
				t.Fatalf("A's served request %+v is not in the incoming trace", srv.Span)
			}
			checkInjected(t, got, a.nClients(t, 1), srv, res, flags)
			if !slices.Equal(got[0].Tracestate, []string{state}) {
				t.Errorf("B: tracestate %q, want [%q]", got[0].Tracestate, state)
			}
		})
	}
	// Without a tracestate coming in, none goes out.
	res := a.call(t, url.Values{"url": {b.srv.URL + "/b"}, "client": {"custom"}},
		http.Header{"Traceparent": {"00-" + tid + "-" + pid + "-01"}})
	got := b.take(t, 1)
	checkInjected(t, got, a.nClients(t, 1), a.nServers(t, 1)[0], res, "01")
	if len(got[0].Tracestate) != 0 {
		t.Errorf("B: tracestate %q, want none", got[0].Tracestate)
	}
}

// rawPeer is service B reading requests as bytes: it records each
// request's bytes as they arrived (header block and body), and the TCP
// segments with data they came in (the kernel's tcpi_data_segs_in), and
// answers 200.
type rawPeer struct {
	ln   net.Listener
	got  chan []byte
	segs chan int
}

// dataSegsIn is the number of segments with data conn received.
func dataSegsIn(conn net.Conn) int {
	rc, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = int(info.Data_segs_in)
		}
	})
	return n
}

func newRawPeer(t *testing.T) *rawPeer {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &rawPeer{ln: ln, got: make(chan []byte, 16), segs: make(chan int, 16)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(t, conn)
		}
	}()
	return p
}

func (p *rawPeer) serve(t *testing.T, conn net.Conn) {
	defer conn.Close()
	var raw bytes.Buffer
	br := bufio.NewReader(io.TeeReader(conn, &raw))
	segs := dataSegsIn(conn)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		if _, err := io.Copy(io.Discard, req.Body); err != nil {
			return
		}
		// The client waits for the answer before its next request: all
		// that was read is this request's.
		p.got <- bytes.Clone(raw.Bytes()[:raw.Len()-br.Buffered()])
		now := dataSegsIn(conn)
		p.segs <- now - segs
		segs = now
		raw.Next(raw.Len() - br.Buffered())
		if _, err := io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err != nil {
			return
		}
	}
}

func (p *rawPeer) url() string { return "http://" + p.ln.Addr().String() + "/raw" }

func (p *rawPeer) take(t *testing.T) []byte {
	t.Helper()
	b, _ := p.takeSegs(t)
	return b
}

// takeSegs returns the next request's bytes and the number of TCP
// segments with data it came in.
func (p *rawPeer) takeSegs(t *testing.T) ([]byte, int) {
	t.Helper()
	select {
	case b := <-p.got:
		return b, <-p.segs
	case <-time.After(testutil.Timeout(20 * time.Second)):
		t.Fatal("the raw peer received nothing")
	}
	return nil, 0
}

// reference sends from this process, which flowmill does not instrument,
// the request A's /call?client=custom sends, and returns its bytes.
func (p *rawPeer) reference(t *testing.T, method string, body []byte, hname, hvalue string) []byte {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, _ := http.NewRequest(method, p.url(), rd)
	req.Header.Set("X-Seq", "0")
	if hname != "" {
		req.Header[hname] = []string{hvalue}
	}
	tr := &http.Transport{MaxConnsPerHost: 1, DisableCompression: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return p.take(t)
}

// TestPropagationBytes: what A sends is, byte for byte, what the same
// request sent by an uninstrumented net/http client is, with one
// "traceparent: ...\r\n" line inserted at the end of the header block; a
// request with a traceparent of its own, whatever the case of its name,
// arrives exactly as it was sent, with no second one and no tracestate.
func TestPropagationBytes(t *testing.T) {
	a := start(t, testprog.HTTPServer)
	b := newRawPeer(t)
	body := bodyFor(0, 0, 6000) // what A's /call sends (seed 0, request 0)
	q := func(extra ...string) url.Values {
		v := url.Values{"url": {b.url()}, "client": {"custom"}, "method": {"POST"}, "body": {"fixed"}, "size": {fmt.Sprint(len(body))}}
		for i := 0; i+1 < len(extra); i += 2 {
			v.Set(extra[i], extra[i+1])
		}
		return v
	}
	t.Run("injected", func(t *testing.T) {
		a.call(t, q(), nil)
		got := b.take(t)
		cli := a.nClients(t, 1)[0]
		a.nServers(t, 1)
		ref := b.reference(t, "POST", body, "", "")
		end := bytes.Index(ref, []byte("\r\n\r\n"))
		line := fmt.Sprintf("traceparent: 00-%s-%s-01\r\n", cli.Span.TraceID, cli.Span.SpanID)
		exp := slices.Concat(ref[:end+2], []byte(line), ref[end+2:])
		if !bytes.Equal(got, exp) {
			t.Errorf("A sent\n%q\nwant\n%q", got, exp)
		}
	})
	// A request without a body goes out in one segment, as it would
	// without flowmill (the three pieces bpf_msg_push_data leaves are
	// joined): a server reading it in pieces may drop the start of the
	// header block from its buffer (Go's bufio.Reader slides consumed
	// bytes out), and with it the traceparent.
	t.Run("one segment", func(t *testing.T) {
		for i := range 5 {
			a.call(t, url.Values{"url": {b.url()}, "client": {"custom"}}, nil)
			got, segs := b.takeSegs(t)
			a.nClients(t, 1)
			a.nServers(t, 1)
			if !bytes.Contains(got, []byte("\r\ntraceparent: 00-")) || segs != 1 {
				t.Errorf("request %d came in %d segments, want 1 with a traceparent:\n%q", i, segs, got)
			}
		}
	})
	for _, name := range []string{"traceparent", "TRACEPARENT", "Traceparent", "tRaCePaReNt"} {
		t.Run("present as "+name, func(t *testing.T) {
			const v = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
			a.call(t, q("hname", name, "hvalue", v), nil)
			got := b.take(t)
			cli := a.nClients(t, 1)[0]
			a.nServers(t, 1)
			ref := b.reference(t, "POST", body, name, v)
			if !bytes.Equal(got, ref) {
				t.Errorf("A sent\n%q\nwant it untouched:\n%q", got, ref)
			}
			if cli.Propagation != fmhttp.PropagationPresent {
				t.Errorf("A's client request: propagation %v, want present", cli.Propagation)
			}
		})
	}
}

// bodyFor is the body testdata/server's /call sends as request i with
// seed (its Body).
func bodyFor(seed uint64, i, size int) []byte {
	r := rand.New(rand.NewPCG(seed, uint64(i)))
	b := make([]byte, size)
	for k := range b {
		b[k] = byte(r.Uint32())
	}
	return b
}

// TestPropagationNotPropagated: what cannot carry the trace context goes
// out unchanged, and says why: TLS, HTTP/2 over TLS and without it, a
// net.Conn of a DialContext's own type, a header block that does not end
// within the first 4 KiB written, and a keep-alive connection opened
// before the probe attached. Each is counted.
func TestPropagationNotPropagated(t *testing.T) {
	plain, tlsPeer, h2, h2c := newPeer(t, ""), newPeer(t, "tls"), newPeer(t, "h2"), newPeer(t, "h2c")
	a := start(t, testprog.HTTPServer, "-pre", plain.srv.URL+"/pre")
	plain.take(t, 1) // the request made before flowmill started
	for _, tc := range []struct {
		name   string
		b      *peer
		q      url.Values
		want   fmhttp.Propagation
		proto  string
		counts func(fmhttp.PropagationStats) uint64
	}{
		{"tls", tlsPeer, url.Values{"client": {"tls"}}, fmhttp.PropagationTLS, "HTTP/1.1", func(s fmhttp.PropagationStats) uint64 { return s.TLS }},
		{"h2", h2, url.Values{"client": {"h2"}}, fmhttp.PropagationHTTP2, "HTTP/2.0", func(s fmhttp.PropagationStats) uint64 { return s.HTTP2 }},
		{"h2c", h2c, url.Values{"client": {"h2c"}}, fmhttp.PropagationHTTP2, "HTTP/2.0", func(s fmhttp.PropagationStats) uint64 { return s.HTTP2 }},
		{"wrapped conn", plain, url.Values{"client": {"wrapped"}}, fmhttp.PropagationOtherConn, "HTTP/1.1", func(s fmhttp.PropagationStats) uint64 { return s.OtherConn }},
		{"header too large", plain, url.Values{"client": {"custom"}, "big": {"5000"}}, fmhttp.PropagationHeaderTooLarge, "HTTP/1.1", func(s fmhttp.PropagationStats) uint64 { return s.HeaderTooLarge }},
		{"connection before start", plain, url.Values{"client": {"pre"}}, fmhttp.PropagationUntracked, "HTTP/1.1", func(s fmhttp.PropagationStats) uint64 { return s.Untracked }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.counts(a.propagation(t))
			tc.q.Set("url", tc.b.srv.URL+"/b")
			a.call(t, tc.q, nil)
			got := tc.b.take(t, 1)[0]
			if len(got.Traceparent) != 0 || got.Proto != tc.proto {
				t.Errorf("B received %s with traceparent %q, want %s without", got.Proto, got.Traceparent, tc.proto)
			}
			a.nServers(t, 1)
			if c := a.nClients(t, 1)[0]; c.Propagation != tc.want {
				t.Errorf("A's client request: propagation %v, want %v", c.Propagation, tc.want)
			}
			if after := tc.counts(a.propagation(t)); after != before+1 {
				t.Errorf("counted %d, want %d", after, before+1)
			}
		})
	}
	// All are unsupported in the session's stats: no loss.
	var l struct {
		Session struct{ EventsLost, Unsupported uint64 }
	}
	if err := json.Unmarshal([]byte(a.losses()), &l); err != nil {
		t.Fatal(err)
	}
	if l.Session.Unsupported < 6 || l.Session.EventsLost != 0 {
		t.Errorf("session stats %+v: want 6 unsupported, none lost", l.Session)
	}
}

// TestWithoutPropagation: with http.WithoutPropagation, requests go out as
// written, and the status says propagation is off.
func TestWithoutPropagation(t *testing.T) {
	a := start(t, testprog.HTTPServer, "-propagate=false")
	if a.status.Propagation || !slices.ContainsFunc(a.status.Skipped, func(s string) bool { return strings.Contains(s, "WithoutPropagation") }) {
		t.Errorf("status %+v: want propagation off", a.status)
	}
	b := newPeer(t, "")
	a.call(t, url.Values{"url": {b.srv.URL + "/b"}}, nil)
	if got := b.take(t, 1)[0]; len(got.Traceparent) != 0 {
		t.Errorf("B received traceparent %q", got.Traceparent)
	}
	a.nServers(t, 1)
	if c := a.nClients(t, 1)[0]; c.Propagation != fmhttp.PropagationNone {
		t.Errorf("A's client request: propagation %v, want none", c.Propagation)
	}
}
