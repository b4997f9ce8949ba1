package http

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"go.opentelemetry.io/otel/trace"
)

// TestLayoutReadsRealValues checks every offset the kernel side uses
// against a live request served by this program: the value read at the
// offset must be the one the handler produced.
func TestLayoutReadsRealValues(t *testing.T) {
	l, err := programLayout()
	if err != nil {
		t.Fatal(err)
	}
	if !l.ctxWalk {
		t.Error("context parents are not first: client spans would not find their parent by context")
	}
	type seen struct {
		itab               uint64
		status, written    int64
		header             string
		pattern, method    string
		path, remote, host string
		ctxData            unsafe.Pointer
		hijacked           bool
	}
	got := make(chan seen, 1)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /things/{id}", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "12345")
		resp := (*iface)(unsafe.Pointer(&w))
		base := resp.data
		conn := *(*unsafe.Pointer)(unsafe.Add(base, l.respConn))
		bufr := *(*unsafe.Pointer)(unsafe.Add(conn, l.connBufr))
		buf := *(*[]byte)(unsafe.Add(bufr, l.bufioBuf))
		rd := *(*int)(unsafe.Add(bufr, l.bufioR))
		req := unsafe.Pointer(r)
		url := *(*unsafe.Pointer)(unsafe.Add(req, l.reqURL))
		ctx := (*iface)(unsafe.Add(req, l.reqCtx))
		rc := r.Context()
		got <- seen{
			itab:     uint64(uintptr(resp.tab)),
			status:   int64(*(*int)(unsafe.Add(base, l.respStatus))),
			written:  *(*int64)(unsafe.Add(base, l.respWritten)),
			header:   string(buf[:rd]),
			pattern:  *(*string)(unsafe.Add(req, l.reqPattern)),
			method:   *(*string)(unsafe.Add(req, l.reqMethod)),
			host:     *(*string)(unsafe.Add(req, l.reqHost)),
			remote:   *(*string)(unsafe.Add(req, l.reqRemoteAddr)),
			path:     *(*string)(unsafe.Add(url, l.urlPath)),
			ctxData:  ctx.data,
			hijacked: *(*bool)(unsafe.Add(conn, l.connHijacked)),
		}
		if (*iface)(unsafe.Pointer(&rc)).data != ctx.data {
			t.Error("Request.ctx is not what r.Context() returns")
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	req, _ := http.NewRequest("POST", srv.URL+"/things/7?x=1", strings.NewReader("body"))
	req.Header.Set("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	s := <-got
	if s.itab != l.respItab {
		t.Errorf("itab %#x, layout says %#x", s.itab, l.respItab)
	}
	if s.status != http.StatusTeapot || s.written != 5 {
		t.Errorf("status %d written %d, want 418 and 5", s.status, s.written)
	}
	if s.pattern != "POST /things/{id}" || s.method != "POST" || s.path != "/things/7" {
		t.Errorf("pattern %q method %q path %q", s.pattern, s.method, s.path)
	}
	if s.host != strings.TrimPrefix(srv.URL, "http://") || s.remote == "" || s.hijacked {
		t.Errorf("host %q remote %q hijacked %v", s.host, s.remote, s.hijacked)
	}
	if !strings.HasPrefix(s.header, "POST /things/7?x=1 HTTP/1.1\r\n") || !strings.Contains(s.header, "Traceparent: 00-4bf9") || !strings.HasSuffix(s.header, "\r\n\r\n") {
		t.Errorf("buffer up to the read position is not the request header:\n%q", s.header)
	}
	// Response fields.
	var r http.Response
	if l.responseStatus != uint64(unsafe.Offsetof(r.StatusCode)) {
		t.Error("Response.StatusCode offset")
	}
}

func TestRouteOf(t *testing.T) {
	for in, want := range map[string]string{
		"":                           "",
		"/":                          "/",
		"/users/{id}":                "/users/{id}",
		"GET /users/{id}":            "/users/{id}",
		"GET example.com/users/{id}": "/users/{id}",
		"example.com/static/":        "/static/",
		"POST  /x/{rest...}":         "/x/{rest...}",
	} {
		if got := routeOf(in); got != want {
			t.Errorf("routeOf(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParentLinkString(t *testing.T) {
	if NoParent.String() != "none" || ParentByContext.String() != "context" || ParentByGoroutine.String() != "goroutine" {
		t.Error("ParentLink names")
	}
}

func TestSpanContextJSON(t *testing.T) {
	for _, in := range []SpanContext{
		{TraceID: trace.TraceID{1, 2}, SpanID: trace.SpanID{3}},
		{TraceID: trace.TraceID{1, 2}, SpanID: trace.SpanID{3}, ParentSpanID: trace.SpanID{0, 4}, RemoteParent: true, Sampled: true},
	} {
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		var out SpanContext
		if err := json.Unmarshal(b, &out); err != nil || out != in {
			t.Errorf("%s: round trip gave %+v, %v", b, out, err)
		}
	}
}

// TestPropLayoutReadsRealValues checks the offsets and types the
// propagation uprobe uses against a live connection: the net.Conn at
// persistConn.conn of a Transport's idle connection is the one its dialer
// returned, whose itab is the program's (*net.TCPConn, net.Conn) itab,
// holding the *net.TCPConn type, and whose descriptor is at
// conn.fd.pfd.Sysfd; a *tls.Conn has the other itab.
func TestPropLayoutReadsRealValues(t *testing.T) {
	l, err := programPropLayout()
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	dialed := make(chan net.Conn, 1)
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			dialed <- c
		}
		return c, err
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	conn := <-dialed
	// The idle persistConn: the one element of Transport.idleConn, once
	// the connection's readLoop put it there (after the body was read),
	// read under Transport.idleMu.
	trv := reflect.ValueOf(tr).Elem()
	idle := trv.FieldByName("idleConn")
	mu := (*sync.Mutex)(unsafe.Pointer(trv.FieldByName("idleMu").UnsafeAddr()))
	var pc unsafe.Pointer
	for deadline := time.Now().Add(10 * time.Second); pc == nil && time.Now().Before(deadline); {
		mu.Lock()
		for it := idle.MapRange(); it.Next(); {
			if it.Value().Len() > 0 {
				pc = it.Value().Index(0).UnsafePointer()
			}
		}
		mu.Unlock()
		if pc == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if pc == nil {
		t.Fatal("no idle persistConn")
	}
	got := *(*net.Conn)(unsafe.Add(pc, l.pcConn))
	if got != conn {
		t.Fatalf("persistConn.conn at %d is %v, want the dialed %v", l.pcConn, got, conn)
	}
	ifc := (*iface)(unsafe.Pointer(&got))
	if uint64(uintptr(ifc.tab)) != l.tcpConnItab || uint64(*(*uintptr)(unsafe.Add(ifc.tab, 8))) != l.tcpConnType {
		t.Errorf("itab %p (type %#x), want %#x (type %#x)", ifc.tab, *(*uintptr)(unsafe.Add(ifc.tab, 8)), l.tcpConnItab, l.tcpConnType)
	}
	sysfd := *(*int)(unsafe.Add(*(*unsafe.Pointer)(unsafe.Add(ifc.data, l.tcpConnFD)), l.netFDSysfd))
	rc, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) {
		if int(fd) != sysfd {
			t.Errorf("Sysfd at conn.fd+%d is %d, want %d", l.netFDSysfd, sysfd, fd)
		}
	})
	var tc net.Conn = tls.Client(conn, &tls.Config{})
	tifc := (*iface)(unsafe.Pointer(&tc))
	if uint64(uintptr(tifc.tab)) != l.tlsConnItab || uint64(*(*uintptr)(unsafe.Add(tifc.tab, 8))) != l.tlsConnType {
		t.Errorf("*tls.Conn itab %p, want %#x", tifc.tab, l.tlsConnItab)
	}
}

// TestH2LayoutReadsRealValues checks the HTTP/2 writer's offsets against a
// live request served over h2c by this program, and the Request fields
// that give the protocol version and scheme.
func TestH2LayoutReadsRealValues(t *testing.T) {
	l, err := programLayout()
	if err != nil {
		t.Fatal(err)
	}
	if l.h2Err != nil {
		t.Fatalf("HTTP/2 writer not learnt: %v", l.h2Err)
	}
	if l.h2.ctxErr != nil || l.h2.hf.size < 32 || l.h2.hf.name == l.h2.hf.value {
		t.Fatalf("HTTP/2 stream and header field layout %+v: %v", l.h2, l.h2.ctxErr)
	}
	type seen struct {
		itab            uint64
		stream          uint32
		status, written int64
		major, minor    int
		tls             bool
	}
	got := make(chan seen, 1)
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "1234567")
		wi := (*iface)(unsafe.Pointer(&w))
		st := wi.data
		if l.h2.rws != ^uint64(0) {
			st = *(*unsafe.Pointer)(unsafe.Add(st, l.h2.rws))
		}
		req := unsafe.Pointer(r)
		got <- seen{
			itab:    uint64(uintptr(wi.tab)),
			stream:  *(*uint32)(unsafe.Add(*(*unsafe.Pointer)(unsafe.Add(st, l.h2.stream)), l.h2.streamID)),
			status:  int64(*(*int)(unsafe.Add(st, l.h2.status))),
			written: *(*int64)(unsafe.Add(st, l.h2.writ)),
			major:   *(*int)(unsafe.Add(req, l.reqProtoMajor)),
			minor:   *(*int)(unsafe.Add(req, l.reqProtoMinor)),
			tls:     *(*unsafe.Pointer)(unsafe.Add(req, l.reqTLS)) != nil,
		}
	}))
	srv.Config.Protocols = &protos
	srv.Start()
	defer srv.Close()
	tr := &http.Transport{Protocols: &protos}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	s := <-got
	if s.itab != l.h2.itab {
		t.Errorf("itab %#x, layout says %#x", s.itab, l.h2.itab)
	}
	if s.stream != 1 {
		t.Errorf("stream ID %d, want 1 (a connection's first request)", s.stream)
	}
	if s.status != http.StatusTeapot || s.written != 7 || s.major != 2 || s.minor != 0 || s.tls {
		t.Errorf("status %d written %d version %d.%d tls %v, want 418, 7, 2.0, no TLS", s.status, s.written, s.major, s.minor, s.tls)
	}
	var r http.Response
	if l.responseMinor != uint64(unsafe.Offsetof(r.ProtoMinor)) || resp.ProtoMajor != 2 {
		t.Errorf("Response.ProtoMinor offset, or a response of HTTP/%d", resp.ProtoMajor)
	}
}

func TestProtocolVersionText(t *testing.T) {
	for _, c := range []struct {
		v ProtocolVersion
		s string
	}{{ProtocolVersion{}, ""}, {ProtocolVersion{1, 0}, "1.0"}, {ProtocolVersion{1, 1}, "1.1"}, {ProtocolVersion{2, 0}, "2"}, {ProtocolVersion{3, 0}, "3"}} {
		if c.v.String() != c.s {
			t.Errorf("%+v: %q, want %q", c.v, c.v.String(), c.s)
		}
		var back ProtocolVersion
		if err := back.UnmarshalText([]byte(c.s)); err != nil || back != c.v {
			t.Errorf("%q: %+v %v", c.s, back, err)
		}
	}
	for _, s := range []Scheme{SchemeUnknown, SchemeHTTP, SchemeHTTPS} {
		b, _ := s.MarshalText()
		var back Scheme
		if err := back.UnmarshalText(b); err != nil || back != s {
			t.Errorf("%v: %v %v", s, back, err)
		}
	}
}
