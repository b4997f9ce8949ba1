package http

import (
	"encoding/json"

	"go.opentelemetry.io/otel/trace"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"unsafe"
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
