package http

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"strconv"
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
	ctxRoot                                   uint64 // data word of context.Background()
	ctxWalk                                   bool
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
	for _, o := range []uint64{l.reqMethod, l.reqURL, l.reqHost, l.reqRemoteAddr, l.reqContentLength, l.reqCtx, l.reqURI} {
		if o+16 > min(l.reqSize, objMax) {
			return l, fmt.Errorf("http.Request field at %d is beyond the %d bytes copied (%w)", o, objMax, errLayout)
		}
	}
	if l.urlHost+16 > min(l.urlSize, objMax) || l.urlPath+16 > min(l.urlSize, objMax) {
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
	if max(l.responseStatus, l.responseLength)-l.responseLo > 88 {
		return l, fmt.Errorf("http.Response's StatusCode and ContentLength are too far apart (%w)", errLayout)
	}
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

// readOnlyRange returns the address range of the executable's first run
// of contiguous mappings without write permission (text and read-only
// data, where Go puts string constants), from a /proc/<pid>/maps file.
func readOnlyRange(maps, exe string) (lo, hi uint64, err error) {
	path, err := os.Readlink(exe)
	if err != nil {
		return 0, 0, fmt.Errorf("resolving the executable: %w", err)
	}
	data, err := os.ReadFile(maps)
	if err != nil {
		return 0, 0, fmt.Errorf("reading the mappings: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || strings.Join(f[5:], " ") != path {
			continue
		}
		start, end, ok := strings.Cut(f[0], "-")
		s, err1 := strconv.ParseUint(start, 16, 64)
		e, err2 := strconv.ParseUint(end, 16, 64)
		if !ok || err1 != nil || err2 != nil {
			return 0, 0, fmt.Errorf("malformed mapping %q", line)
		}
		if strings.Contains(f[1], "w") || (hi != 0 && s != hi) {
			if hi != 0 {
				break
			}
			continue
		}
		if hi == 0 {
			lo = s
		}
		hi = e
	}
	if hi == 0 {
		return 0, 0, fmt.Errorf("no read-only mapping of %s", path)
	}
	return lo, hi, nil
}
