package http

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// layout is where the fields the probe reads are in this program. Every
// value comes from the types compiled into the running program (it is the
// binary the uprobes attach to), through unsafe.Offsetof for exported
// fields and reflect for unexported ones: no per-version offsets table, no
// DWARF.
type layout struct {
	reqMethod, reqURL, reqHost, reqRemoteAddr uint64
	reqContentLength, reqPattern, reqCtx      uint64
	urlHost, urlPath                          uint64
	respConn, respStatus, respWritten         uint64
	connBufr, connHijacked                    uint64
	bufioBuf, bufioR                          uint64
	responseStatus, responseLength            uint64
	respItab                                  uint64 // runtime address
	reqSize, urlSize                          uint64 // bytes copied at once
	respLo                                    uint64 // first byte of response read at return
	reqURI                                    uint64
	responseLo                                uint64 // first byte of Response read at return
	responseMajor                             uint64 // Response.ProtoMajor
	ctxRoot                                   uint64 // data word of context.Background()
	ctxWalk                                   bool
	reqTLS, reqProtoMajor, reqProtoMinor      uint64 // Request.TLS, ProtoMajor, ProtoMinor
	urlScheme                                 uint64 // url.URL.Scheme
	responseMinor                             uint64 // Response.ProtoMinor
	h2                                        h2Layout
	// h2Err says why HTTP/2 served requests are not instrumented (their
	// ResponseWriter's layout could not be learnt); nil when they are.
	h2Err error
}

// h2Layout is net/http's HTTP/2 ResponseWriter in this program: its itab
// as a ResponseWriter, and where its status and body bytes written are.
type h2Layout struct {
	itab   uint64 // runtime address
	rws    uint64 // offset of the pointer to the writer's state; ^0: the fields are the writer's own
	lo     uint64 // first byte of the state read at return
	status uint64 // status (int)
	writ   uint64 // body bytes written (int64)
	// Where the incoming trace context is found (see bpf/http.c,
	// h2_headers): the state's stream and the stream's ID, and the
	// layout of hpack.HeaderField; the offset of MetaHeadersFrame.Fields
	// is learnt at attach time (learnH2Fields). ctxErr says why it
	// cannot be read; nil when it can.
	stream, streamID uint64
	hf               hfLayout
	ctxErr           error
}

// hfLayout is hpack.HeaderField in this program.
type hfLayout struct {
	size, name, value uint64
}

var (
	layoutOnce sync.Once
	layoutVal  layout
	layoutErr  error
)

// programLayout computes the layout once per process.
func programLayout() (layout, error) {
	layoutOnce.Do(func() { layoutVal, layoutErr = computeLayout() })
	return layoutVal, layoutErr
}

func computeLayout() (layout, error) {
	var r http.Request
	var u url.URL
	var resp http.Response
	l := layout{
		reqMethod:        uint64(unsafe.Offsetof(r.Method)),
		reqURL:           uint64(unsafe.Offsetof(r.URL)),
		reqHost:          uint64(unsafe.Offsetof(r.Host)),
		reqRemoteAddr:    uint64(unsafe.Offsetof(r.RemoteAddr)),
		reqContentLength: uint64(unsafe.Offsetof(r.ContentLength)),
		reqPattern:       uint64(unsafe.Offsetof(r.Pattern)),
		reqURI:           uint64(unsafe.Offsetof(r.RequestURI)),
		urlHost:          uint64(unsafe.Offsetof(u.Host)),
		urlPath:          uint64(unsafe.Offsetof(u.Path)),
		responseStatus:   uint64(unsafe.Offsetof(resp.StatusCode)),
		responseLength:   uint64(unsafe.Offsetof(resp.ContentLength)),
		responseMajor:    uint64(unsafe.Offsetof(resp.ProtoMajor)),
		responseMinor:    uint64(unsafe.Offsetof(resp.ProtoMinor)),
		reqTLS:           uint64(unsafe.Offsetof(r.TLS)),
		reqProtoMajor:    uint64(unsafe.Offsetof(r.ProtoMajor)),
		reqProtoMinor:    uint64(unsafe.Offsetof(r.ProtoMinor)),
		urlScheme:        uint64(unsafe.Offsetof(u.Scheme)),
	}
	var err error
	fields := []struct {
		dst  *uint64
		t    reflect.Type
		name string
		kind reflect.Kind
	}{
		{&l.reqCtx, reflect.TypeFor[http.Request](), "ctx", reflect.Interface},
		{&l.bufioBuf, reflect.TypeFor[bufio.Reader](), "buf", reflect.Slice},
		{&l.bufioR, reflect.TypeFor[bufio.Reader](), "r", reflect.Int},
	}
	w, itab, err := responseWriter()
	if err != nil {
		return l, err
	}
	l.respItab = itab
	rt := w.Elem() // http.response
	connField, ok := rt.FieldByName("conn")
	if !ok || connField.Type.Kind() != reflect.Pointer {
		return l, fmt.Errorf("net/http's response type %v has no conn pointer", w)
	}
	ct := connField.Type.Elem() // http.conn
	fields = append(fields, []struct {
		dst  *uint64
		t    reflect.Type
		name string
		kind reflect.Kind
	}{
		{&l.respConn, rt, "conn", reflect.Pointer},
		{&l.respStatus, rt, "status", reflect.Int},
		{&l.respWritten, rt, "written", reflect.Int64},
		{&l.connBufr, ct, "bufr", reflect.Pointer},
		{&l.connHijacked, ct, "hijackedv", reflect.Bool},
	}...)
	for _, f := range fields {
		sf, ok := f.t.FieldByName(f.name)
		if !ok || sf.Type.Kind() != f.kind || len(sf.Index) != 1 {
			return l, fmt.Errorf("%v.%s is not a %v field in this Go release (%w)", f.t, f.name, f.kind, errLayout)
		}
		*f.dst = uint64(sf.Offset)
	}
	if bt := ct.Field(mustIndex(ct, "bufr")).Type; bt != reflect.TypeFor[*bufio.Reader]() {
		return l, fmt.Errorf("http.conn.bufr is a %v, not a *bufio.Reader (%w)", bt, errLayout)
	}
	l.ctxWalk = contextParentsFirst()
	// The kernel side copies a struct once and takes the fields from the
	// copy; it copies at most objMax bytes.
	l.reqSize = uint64(reflect.TypeFor[http.Request]().Size())
	l.urlSize = uint64(reflect.TypeFor[url.URL]().Size())
	for _, o := range []uint64{l.reqMethod, l.reqURL, l.reqHost, l.reqRemoteAddr, l.reqContentLength, l.reqCtx, l.reqURI,
		l.reqTLS, l.reqProtoMajor, l.reqProtoMinor} {
		if o+16 > min(l.reqSize, objMax) {
			return l, fmt.Errorf("http.Request field at %d is beyond the %d bytes copied (%w)", o, objMax, errLayout)
		}
	}
	if l.urlHost+16 > min(l.urlSize, objMax) || l.urlPath+16 > min(l.urlSize, objMax) || l.urlScheme+16 > min(l.urlSize, objMax) {
		return l, fmt.Errorf("url.URL is larger than the %d bytes copied (%w)", objMax, errLayout)
	}
	if l.bufioBuf+24 > 64 || l.bufioR+8 > 64 {
		return l, fmt.Errorf("bufio.Reader's buf and r are beyond its first 64 bytes (%w)", errLayout)
	}
	l.respLo = min(l.respStatus, l.respWritten)
	if max(l.respStatus, l.respWritten)-l.respLo > 56 {
		return l, fmt.Errorf("http.response's status and written are too far apart (%w)", errLayout)
	}
	// client_return copies 96 bytes of the Response from responseLo.
	l.responseLo = min(l.responseStatus, l.responseLength)
	if max(l.responseStatus, l.responseLength, l.responseMajor, l.responseMinor)-l.responseLo > 88 ||
		min(l.responseMajor, l.responseMinor) < l.responseLo {
		return l, fmt.Errorf("http.Response's StatusCode, ProtoMajor, ProtoMinor and ContentLength are too far apart (%w)", errLayout)
	}
	// HTTP/2 is served without it if need be (counted as unsupported).
	l.h2, l.h2Err = h2WriterLayout()
	// Where a client's context chain ends: Background and TODO are
	// zero-size values, whose data word is the runtime's zerobase.
	bg, todo := context.Background(), context.TODO()
	l.ctxRoot = uint64(uintptr((*iface)(unsafe.Pointer(&bg)).data))
	if t := uint64(uintptr((*iface)(unsafe.Pointer(&todo)).data)); t != l.ctxRoot {
		l.ctxRoot = 0 // not a shared zero-size value: walk as before
	}
	return l, nil
}

// objMax is OBJ_MAX in bpf/http.c.
const objMax = 512

var errLayout = errors.New("net/http changed: please report it with your Go version")

func mustIndex(t reflect.Type, name string) int {
	f, _ := t.FieldByName(name)
	return f.Index[0]
}

// iface is the layout of a non-empty interface value.
type iface struct {
	tab  unsafe.Pointer
	data unsafe.Pointer
}

// contextParentsFirst checks, on real values, what the kernel side relies
// on to find the served request a client's context derives from: every
// context type of the standard library keeps its parent Context as its
// first word pair, so the parent's data pointer is at +8.
func contextParentsFirst() bool {
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	type key struct{}
	derive := []func(context.Context) (context.Context, context.CancelFunc){
		func(p context.Context) (context.Context, context.CancelFunc) { return context.WithCancel(p) },
		func(p context.Context) (context.Context, context.CancelFunc) {
			return context.WithTimeout(p, time.Hour)
		},
		func(p context.Context) (context.Context, context.CancelFunc) {
			c, f := context.WithCancelCause(p)
			return c, func() { f(nil) }
		},
		func(p context.Context) (context.Context, context.CancelFunc) {
			return context.WithValue(p, key{}, 1), func() {}
		},
		func(p context.Context) (context.Context, context.CancelFunc) {
			return context.WithoutCancel(p), func() {}
		},
	}
	pd := (*iface)(unsafe.Pointer(&parent)).data
	for _, d := range derive {
		c, stop := d(parent)
		cd := (*iface)(unsafe.Pointer(&c)).data
		t := reflect.TypeOf(c)
		size := t.Size()
		if t.Kind() == reflect.Pointer {
			size = t.Elem().Size()
		}
		ok := size >= 16 && (*iface)(cd).data == pd
		stop()
		if !ok {
			return false
		}
	}
	return true
}

// responseWriter serves one request over an in-memory pipe to learn the
// dynamic type of net/http's HTTP/1 ResponseWriter (the unexported
// *http.response) and its itab as a ResponseWriter, both as compiled into
// this program.
func responseWriter() (reflect.Type, uint64, error) {
	type result struct {
		t    reflect.Type
		itab uint64
	}
	got := make(chan result, 1)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			got <- result{reflect.TypeOf(w), uint64(uintptr((*iface)(unsafe.Pointer(&w)).tab))}
		}),
		ErrorLog: log.New(io.Discard, "", 0),
	}
	server, client := net.Pipe()
	ln := &pipeListener{conn: server, done: make(chan struct{})}
	go srv.Serve(ln)
	defer srv.Close()
	go func() {
		defer client.Close()
		client.Write([]byte("GET / HTTP/1.1\r\nHost: flowmill\r\n\r\n"))
		io.Copy(io.Discard, client)
	}()
	select {
	case r := <-got:
		if r.t.Kind() != reflect.Pointer || r.t.Elem().Kind() != reflect.Struct {
			return nil, 0, fmt.Errorf("net/http's ResponseWriter is a %v (%w)", r.t, errLayout)
		}
		return r.t, r.itab, nil
	case <-time.After(10 * time.Second):
		return nil, 0, errors.New("net/http did not serve an in-memory request within 10s")
	}
}

// pipeListener hands out one connection, then blocks until closed.
type pipeListener struct {
	once sync.Once
	conn net.Conn
	mu   sync.Mutex
	done chan struct{}
	used bool
}

func (l *pipeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if !l.used {
		l.used = true
		l.mu.Unlock()
		return l.conn, nil
	}
	l.mu.Unlock()
	<-l.done
	return nil, net.ErrClosed
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// propLayout is where the fields the propagation uprobe
// (net/http.(*persistConn).roundTrip) reads are, and the types it tells
// apart, all from this program's own types.
type propLayout struct {
	pcConn      uint64 // http.persistConn.conn (net.Conn)
	tcpConnFD   uint64 // net.TCPConn's conn.fd (*net.netFD)
	netFDSysfd  uint64 // net.netFD's pfd.Sysfd (int)
	tcpConnItab uint64 // itab of (*net.TCPConn, net.Conn), a runtime address
	tcpConnType uint64 // type of *net.TCPConn
	tlsConnItab uint64 // itab of (*tls.Conn, net.Conn)
	tlsConnType uint64 // type of *tls.Conn
}

var (
	propLayoutOnce sync.Once
	propLayoutVal  propLayout
	propLayoutErr  error
)

// programPropLayout computes the propagation layout once per process. It
// is apart from programLayout: without it spans still work, and only
// propagation is unavailable.
func programPropLayout() (propLayout, error) {
	propLayoutOnce.Do(func() { propLayoutVal, propLayoutErr = computePropLayout() })
	return propLayoutVal, propLayoutErr
}

// eface is the layout of an empty interface value.
type eface struct {
	typ  unsafe.Pointer
	data unsafe.Pointer
}

func computePropLayout() (propLayout, error) {
	var l propLayout
	pc, ok := findStruct(reflect.TypeFor[http.Transport](), "net/http", "persistConn", 4)
	if !ok {
		return l, fmt.Errorf("no net/http.persistConn reachable from http.Transport's fields (%w)", errLayout)
	}
	path := []struct {
		t    reflect.Type
		name string
		want reflect.Type // nil: any of kind
		kind reflect.Kind
	}{
		{pc, "conn", reflect.TypeFor[net.Conn](), reflect.Interface},
	}
	conn, ok := reflect.TypeFor[net.TCPConn]().FieldByName("conn")
	if !ok || conn.Type.Kind() != reflect.Struct || len(conn.Index) != 1 {
		return l, fmt.Errorf("net.TCPConn does not embed net.conn (%w)", errLayout)
	}
	fd, ok := conn.Type.FieldByName("fd")
	if !ok || fd.Type.Kind() != reflect.Pointer || fd.Type.Elem().Kind() != reflect.Struct || len(fd.Index) != 1 {
		return l, fmt.Errorf("net.conn has no fd pointer (%w)", errLayout)
	}
	pfd, ok := fd.Type.Elem().FieldByName("pfd")
	if !ok || pfd.Type.Kind() != reflect.Struct || len(pfd.Index) != 1 {
		return l, fmt.Errorf("net.netFD has no pfd (%w)", errLayout)
	}
	sysfd, ok := pfd.Type.FieldByName("Sysfd")
	if !ok || sysfd.Type.Kind() != reflect.Int || len(sysfd.Index) != 1 {
		return l, fmt.Errorf("poll.FD has no Sysfd int (%w)", errLayout)
	}
	for _, f := range path {
		sf, ok := f.t.FieldByName(f.name)
		if !ok || sf.Type.Kind() != f.kind || (f.want != nil && sf.Type != f.want) || len(sf.Index) != 1 {
			return l, fmt.Errorf("%v.%s is not a %v field in this Go release (%w)", f.t, f.name, f.kind, errLayout)
		}
		l.pcConn = uint64(sf.Offset)
	}
	l.tcpConnFD = uint64(conn.Offset + fd.Offset)
	l.netFDSysfd = uint64(pfd.Offset + sysfd.Offset)
	var c net.Conn = (*net.TCPConn)(nil)
	l.tcpConnItab = uint64(uintptr((*iface)(unsafe.Pointer(&c)).tab))
	var a any = (*net.TCPConn)(nil)
	l.tcpConnType = uint64(uintptr((*eface)(unsafe.Pointer(&a)).typ))
	c = (*tls.Conn)(nil)
	l.tlsConnItab = uint64(uintptr((*iface)(unsafe.Pointer(&c)).tab))
	a = (*tls.Conn)(nil)
	l.tlsConnType = uint64(uintptr((*eface)(unsafe.Pointer(&a)).typ))
	return l, nil
}

// findStruct finds the struct type pkg.name among the types of t's
// fields, and theirs, depth levels down (through pointers, slices, arrays,
// maps and struct fields).
func findStruct(t reflect.Type, pkg, name string, depth int) (reflect.Type, bool) {
	if t.Kind() == reflect.Struct && t.PkgPath() == pkg && t.Name() == name {
		return t, true
	}
	if depth == 0 {
		return nil, false
	}
	switch t.Kind() {
	case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Chan:
		return findStruct(t.Elem(), pkg, name, depth-1)
	case reflect.Map:
		if f, ok := findStruct(t.Key(), pkg, name, depth-1); ok {
			return f, true
		}
		return findStruct(t.Elem(), pkg, name, depth-1)
	case reflect.Struct:
		for i := range t.NumField() {
			if f, ok := findStruct(t.Field(i).Type, pkg, name, depth-1); ok {
				return f, true
			}
		}
	}
	return nil, false
}

// h2WriterLayout learns net/http's HTTP/2 ResponseWriter as compiled into
// this program: it serves one request over unencrypted HTTP/2 (prior
// knowledge) on an in-memory pipe, with net/http's own HTTP/2 client, and
// walks the writer's dynamic type with reflect for its status code and
// body bytes written: in the writer itself, or in a struct it points to
// (Go 1.26: *http.http2responseWriter, whose rws points to an
// http2responseWriterState with status int and wroteBytes int64; Go 1.27:
// the same, moved to net/http/internal/http2, behind a one-pointer struct
// of net/http's).
func h2WriterLayout() (h2Layout, error) {
	var l h2Layout
	w, itab, err := h2ResponseWriter()
	if err != nil {
		return l, err
	}
	// The interface's data word points to the writer: it is a pointer,
	// or a struct holding just one (Go 1.27: http.http2ResponseWriter
	// embeds *http2.responseWriter), which an interface stores as is.
	ptr := w
	if w.Kind() == reflect.Struct && w.NumField() == 1 && w.Size() == unsafe.Sizeof(uintptr(0)) {
		ptr = w.Field(0).Type
	}
	if ptr.Kind() != reflect.Pointer || ptr.Elem().Kind() != reflect.Struct {
		return l, fmt.Errorf("net/http's HTTP/2 ResponseWriter is a %v (%w)", w, errLayout)
	}
	st := ptr.Elem()
	fields := func(t reflect.Type) (status, written uint64, ok bool) {
		s, ok1 := t.FieldByName("status")
		n, ok2 := t.FieldByName("wroteBytes")
		if !ok1 || !ok2 || s.Type.Kind() != reflect.Int || n.Type.Kind() != reflect.Int64 || len(s.Index) != 1 || len(n.Index) != 1 {
			return 0, 0, false
		}
		return uint64(s.Offset), uint64(n.Offset), true
	}
	l.rws = ^uint64(0)
	state := st
	status, written, ok := fields(st)
	for i := 0; !ok && i < st.NumField(); i++ {
		f := st.Field(i)
		if f.Type.Kind() != reflect.Pointer || f.Type.Elem().Kind() != reflect.Struct {
			continue
		}
		if status, written, ok = fields(f.Type.Elem()); ok {
			l.rws = uint64(f.Offset)
			state = f.Type.Elem()
		}
	}
	if !ok {
		return l, fmt.Errorf("net/http's HTTP/2 ResponseWriter %v has no status int and wroteBytes int64, in it or in a struct it points to (%w)", w, errLayout)
	}
	l.itab, l.status, l.writ = itab, status, written
	l.lo = min(status, written)
	if max(status, written)-l.lo > 56 {
		return l, fmt.Errorf("net/http's HTTP/2 writer's status and wroteBytes are too far apart (%w)", errLayout)
	}
	l.stream, l.streamID, l.hf, l.ctxErr = h2StreamLayout(state)
	return l, nil
}

// h2StreamLayout finds, from the HTTP/2 writer's state type, its stream
// (stream *stream, whose id is a uint32) and hpack.HeaderField (Name and
// Value strings), reachable from the stream's connection (its HPACK
// encoder's table holds HeaderFields).
func h2StreamLayout(state reflect.Type) (stream, id uint64, hf hfLayout, err error) {
	sf, ok := state.FieldByName("stream")
	if !ok || len(sf.Index) != 1 || sf.Type.Kind() != reflect.Pointer || sf.Type.Elem().Kind() != reflect.Struct {
		return 0, 0, hf, fmt.Errorf("net/http's HTTP/2 writer state %v has no stream pointer (%w)", state, errLayout)
	}
	idf, ok := sf.Type.Elem().FieldByName("id")
	if !ok || len(idf.Index) != 1 || idf.Type.Kind() != reflect.Uint32 {
		return 0, 0, hf, fmt.Errorf("net/http's HTTP/2 stream %v has no uint32 id (%w)", sf.Type.Elem(), errLayout)
	}
	t, ok := findType(sf.Type.Elem(), func(t reflect.Type) bool {
		return t.Kind() == reflect.Struct && t.Name() == "HeaderField" && strings.HasSuffix(t.PkgPath(), "/hpack")
	})
	if !ok {
		return 0, 0, hf, fmt.Errorf("no hpack.HeaderField reachable from net/http's HTTP/2 stream (%w)", errLayout)
	}
	name, ok1 := t.FieldByName("Name")
	value, ok2 := t.FieldByName("Value")
	if !ok1 || !ok2 || name.Type.Kind() != reflect.String || value.Type.Kind() != reflect.String || t.Size() > h2HFMax {
		return 0, 0, hf, fmt.Errorf("hpack.HeaderField is not Name and Value strings within %d bytes (%w)", h2HFMax, errLayout)
	}
	return uint64(sf.Offset), uint64(idf.Offset), hfLayout{uint64(t.Size()), uint64(name.Offset), uint64(value.Offset)}, nil
}

// h2HFMax is H2_HF_MAX in bpf/http.c.
const h2HFMax = 48

// findType looks for a type that matches among the types reachable from
// t (its fields', elements', keys', functions' arguments and results),
// breadth first.
func findType(t reflect.Type, match func(reflect.Type) bool) (reflect.Type, bool) {
	seen := map[reflect.Type]bool{t: true}
	queue := []reflect.Type{t}
	for len(queue) > 0 {
		t := queue[0]
		queue = queue[1:]
		if match(t) {
			return t, true
		}
		var next []reflect.Type
		switch t.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Chan:
			next = append(next, t.Elem())
		case reflect.Map:
			next = append(next, t.Key(), t.Elem())
		case reflect.Struct:
			for i := range t.NumField() {
				next = append(next, t.Field(i).Type)
			}
		case reflect.Func:
			for i := range t.NumIn() {
				next = append(next, t.In(i))
			}
			for i := range t.NumOut() {
				next = append(next, t.Out(i))
			}
		}
		for _, n := range next {
			if !seen[n] {
				seen[n] = true
				queue = append(queue, n)
			}
		}
	}
	return nil, false
}

// h2ResponseWriter returns the dynamic type of net/http's HTTP/2
// ResponseWriter and its itab as a ResponseWriter, from one request served
// over unencrypted HTTP/2 on an in-memory pipe.
func h2ResponseWriter() (reflect.Type, uint64, error) {
	type result struct {
		t     reflect.Type
		itab  uint64
		proto int
	}
	got := make(chan result, 1)
	err := serveH2C(func(w http.ResponseWriter, r *http.Request) {
		select {
		case got <- result{reflect.TypeOf(w), uint64(uintptr((*iface)(unsafe.Pointer(&w)).tab)), r.ProtoMajor}:
		default:
		}
	}, nil)
	var r result
	select {
	case r = <-got:
	default:
		if err == nil {
			err = errors.New("the handler was not called")
		}
		return nil, 0, fmt.Errorf("net/http did not serve an in-memory HTTP/2 request: %w", err)
	}
	if r.proto != 2 {
		return nil, 0, fmt.Errorf("net/http served an unencrypted HTTP/2 request as HTTP/%d (%w)", r.proto, errLayout)
	}
	return r.t, r.itab, nil
}

// serveH2C serves one GET request with header hdr over unencrypted HTTP/2
// (prior knowledge) on an in-memory pipe, with net/http's own HTTP/2
// client, to h. It returns once the response was read (h returned), or
// with the request's error, within 10 seconds.
func serveH2C(h http.HandlerFunc, hdr http.Header) error {
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &protos, Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	server, client := net.Pipe()
	ln := &pipeListener{conn: server, done: make(chan struct{})}
	go srv.Serve(ln)
	defer srv.Close()
	tr := &http.Transport{
		Protocols: &protos,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return client, nil
		},
	}
	defer tr.CloseIdleConnections()
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://flowmill/", nil)
		if err == nil {
			for k, v := range hdr {
				req.Header[k] = v
			}
			var resp *http.Response
			if resp, err = tr.RoundTrip(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return errors.New("net/http did not serve an in-memory HTTP/2 request within 10s")
	}
}
