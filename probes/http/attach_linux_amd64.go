//go:build linux && amd64

package http

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/probes"
)

// Values of http_event.kind and .flags (bpf/http.c).
const (
	kindServer = 1
	kindClient = 2

	flagRemoteParent = 1 << 0
	flagSampled      = 1 << 1
	flagParentCtx    = 1 << 2
	flagParentG      = 1 << 3
	flagHijacked     = 1 << 4
)

// Counter slots (bpf/include/flowmill.h, bpf/http.c).
const (
	ctrLost = iota
	ctrUnsupported
	nCounters
)

// Attach finds the probed functions in the program's own executable,
// computes the field offsets from its types, loads the eBPF programs and
// attaches the uprobes. It is called by flowmill.Start.
func (p *Probe) Attach(env *probes.Env) (probes.Attachment, error) {
	self := os.Getpid()
	if env.Scope.Kind == probes.ScopeProcess && env.Scope.PID != uint32(self) {
		return nil, fmt.Errorf("http: the HTTP probe instruments the calling process only (pid %d), not pid %d: start flowmill inside the service", self, env.Scope.PID)
	}
	if p.maxInFlight == 0 {
		return nil, errors.New("http: WithMaxInFlight must be positive")
	}
	lay, err := programLayout()
	if err != nil {
		return nil, fmt.Errorf("http: reading net/http's layout in this program: %w", err)
	}
	goidOff, err := goexe.GoroutineIDOffset()
	if err != nil {
		// Without it, events carry no goroutine ID and a client is
		// not parented by goroutine (by context still).
		goidOff = ^uint64(0)
	}
	targets, status, err := findTargets("/proc/self/exe")
	if err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}

	spec, err := loadHttpBPF()
	if err != nil {
		return nil, fmt.Errorf("http: loading the embedded eBPF object: %w", err)
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	for _, m := range []string{"servers", "server_ctxs", "clients"} {
		spec.Maps[m].MaxEntries = p.maxInFlight
	}
	off := httpBPFHttpOffsets{
		ReqMethod: lay.reqMethod, ReqUrl: lay.reqURL, ReqHost: lay.reqHost,
		ReqRemoteAddr: lay.reqRemoteAddr, ReqContentLength: lay.reqContentLength,
		ReqPattern: lay.reqPattern, ReqCtx: lay.reqCtx,
		UrlHost: lay.urlHost, UrlPath: lay.urlPath,
		RespConn: lay.respConn, RespStatus: lay.respStatus, RespWritten: lay.respWritten,
		ConnBufr: lay.connBufr, ConnHijacked: lay.connHijacked,
		BufioBuf: lay.bufioBuf, BufioR: lay.bufioR,
		ResponseStatus: lay.responseStatus, ResponseLength: lay.responseLength,
		RespItab: lay.respItab, Goid: goidOff,
		ReqSize: lay.reqSize, UrlSize: lay.urlSize, RespLo: lay.respLo,
	}
	if lay.ctxWalk {
		off.CtxWalk = 1
	}
	if err := spec.Variables["off"].Set(off); err != nil {
		return nil, fmt.Errorf("http: setting field offsets: %w", err)
	}
	a := &attachment{
		boot:       env.BootTime,
		servers:    probes.Produce[ServerRequest](env.Bus),
		clients:    probes.Produce[ClientRequest](env.Bus),
		staleAfter: p.staleAfter,
		stop:       make(chan struct{}),
	}
	if err := bpfload.Load(spec, env, &a.objs, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	ex, err := link.OpenExecutable("/proc/self/exe")
	if err != nil {
		a.objs.Close()
		return nil, fmt.Errorf("http: opening the program's executable: %w", err)
	}
	progs := map[string][2]*ebpf.Program{
		serverFunc: {a.objs.ServerEnter, a.objs.ServerReturn},
		clientFunc: {a.objs.ClientEnter, a.objs.ClientReturn},
	}
	// Returns first: an entry whose return is not yet probed would leave
	// an entry behind.
	for _, t := range targets {
		pr := progs[t.fn.Name]
		for _, r := range t.probes.Returns {
			if err := a.uprobe(ex, t.fn, r, pr[1], self); err != nil {
				a.Close()
				return nil, err
			}
		}
	}
	for _, t := range targets {
		if err := a.uprobe(ex, t.fn, t.probes.Entry, progs[t.fn.Name][0], self); err != nil {
			a.Close()
			return nil, err
		}
	}
	p.mu.Lock()
	p.status = status
	p.mu.Unlock()
	a.wg.Go(a.sweep)
	return a, nil
}

type target struct {
	fn     goexe.Func
	probes goexe.Probes
}

// findTargets locates the probed functions in the executable. A function
// the linker left out is skipped and reported in the Status; a function
// that is present but cannot be analysed is an error.
func findTargets(path string) ([]target, Status, error) {
	var st Status
	exe, err := goexe.Open(path)
	if err != nil {
		return nil, st, err
	}
	defer exe.Close()
	var out []target
	for _, name := range []string{serverFunc, clientFunc} {
		fn, ok, err := exe.Lookup(name)
		if err != nil {
			return nil, st, err
		}
		if !ok {
			st.Skipped = append(st.Skipped, name+": not in the program (never called), not instrumented")
			continue
		}
		code, err := exe.Code(fn)
		if err != nil {
			return nil, st, err
		}
		pr, err := goexe.Analyze(code)
		if err != nil {
			return nil, st, fmt.Errorf("%w: disassembling %s: %v", probes.ErrMissingHook, name, err)
		}
		out = append(out, target{fn, pr})
		if name == serverFunc {
			st.Server = true
		} else {
			st.Client = true
		}
	}
	return out, st, nil
}

type attachment struct {
	objs    httpBPFObjects
	links   []link.Link
	boot    func(uint64) time.Time
	servers *probes.Topic[ServerRequest]
	clients *probes.Topic[ClientRequest]

	ev      httpBPFHttpEvent // scratch: records need not be aligned
	strs    strs
	errMu   sync.Mutex
	errName map[uint64]string

	staleAfter time.Duration
	swept      atomic.Uint64
	stop       chan struct{}
	wg         sync.WaitGroup
	closeOnce  sync.Once
	closeErr   error
}

func (a *attachment) uprobe(ex *link.Executable, fn goexe.Func, at uint64, prog *ebpf.Program, pid int) error {
	l, err := ex.Uprobe(fn.Name, prog, &link.UprobeOptions{Address: fn.Offset, Offset: at, PID: pid})
	if err != nil {
		return fmt.Errorf("http: %w: uprobe on %s+%#x: %w", probes.ErrMissingHook, fn.Name, at, bpfload.Explain(err))
	}
	a.links = append(a.links, l)
	return nil
}

func (a *attachment) Rings() []probes.Ring {
	return []probes.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

const eventSize = int(unsafe.Sizeof(httpBPFHttpEvent{}))

// handle decodes one record and publishes it. Records that cannot come
// from our programs are ignored.
func (a *attachment) handle(raw []byte) {
	if len(raw) < eventSize {
		return
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&a.ev)), eventSize), raw)
	e := &a.ev
	switch e.Kind {
	case kindServer:
		if !a.servers.Active() {
			return
		}
		pattern := a.strs.get(e.Route[:], e.RouteLen)
		r := ServerRequest{
			Start:            a.boot(e.StartNs),
			End:              a.boot(e.EndNs),
			Method:           a.strs.get(e.Method[:], uint16(e.MethodLen)),
			Path:             str(e.Path[:], e.PathLen),
			Pattern:          pattern,
			Route:            routeOf(pattern),
			Host:             a.strs.get(e.Host[:], uint16(e.HostLen)),
			StatusCode:       int(e.Status),
			RequestBodySize:  e.ReqLength,
			ResponseBodySize: e.RespLength,
			Hijacked:         e.Flags&flagHijacked != 0,
			Span:             spanContext(e),
			Goroutine:        e.Goid,
			PID:              e.Pid,
			TID:              e.Tid,
		}
		if r.StatusCode == 0 && !r.Hijacked {
			r.StatusCode = 200 // net/http sends 200 when the handler wrote nothing
		}
		r.Peer, _ = netip.ParseAddrPort(str(e.Peer[:], uint16(e.PeerLen)))
		a.servers.Publish(&r)
	case kindClient:
		if !a.clients.Active() {
			return
		}
		r := ClientRequest{
			Start:            a.boot(e.StartNs),
			End:              a.boot(e.EndNs),
			Method:           a.strs.get(e.Method[:], uint16(e.MethodLen)),
			Host:             a.strs.get(e.Host[:], uint16(e.HostLen)),
			Path:             str(e.Path[:], e.PathLen),
			StatusCode:       int(e.Status),
			RequestBodySize:  e.ReqLength,
			ResponseBodySize: e.RespLength,
			Error:            a.errorType(e.ErrItab),
			Span:             spanContext(e),
			Goroutine:        e.Goid,
			PID:              e.Pid,
			TID:              e.Tid,
		}
		switch {
		case e.Flags&flagParentCtx != 0:
			r.Parent = ParentByContext
		case e.Flags&flagParentG != 0:
			r.Parent = ParentByGoroutine
		}
		a.clients.Publish(&r)
	}
}

func spanContext(e *httpBPFHttpEvent) SpanContext {
	var sc SpanContext
	sc.TraceID = e.TraceId
	binary.BigEndian.PutUint64(sc.SpanID[:], e.SpanId)
	if e.ParentSpanId != 0 {
		binary.BigEndian.PutUint64(sc.ParentSpanID[:], e.ParentSpanId)
	}
	sc.RemoteParent = e.Flags&flagRemoteParent != 0
	sc.Sampled = e.Flags&flagSampled != 0
	return sc
}

func str(b []int8, n uint16) string {
	n = min(n, uint16(len(b)))
	return string(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), n))
}

// strs interns the short strings that repeat (methods, hosts, patterns).
// It is used from the ring's goroutine only and is bounded.
type strs struct{ m map[string]string }

func (s *strs) get(b []int8, n uint16) string {
	n = min(n, uint16(len(b)))
	k := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), n)
	if v, ok := s.m[string(k)]; ok {
		return v
	}
	if s.m == nil || len(s.m) > 4096 {
		s.m = make(map[string]string)
	}
	v := string(k)
	s.m[v] = v
	return v
}

// errorType names the dynamic type of the error a Transport returned. The
// kernel side reports the error's itab; itabs live as long as the program,
// and this is the program they belong to, so the type is read from it.
func (a *attachment) errorType(itab uint64) string {
	if itab == 0 {
		return ""
	}
	a.errMu.Lock()
	defer a.errMu.Unlock()
	if s, ok := a.errName[itab]; ok {
		return s
	}
	if a.errName == nil {
		a.errName = make(map[uint64]string)
	}
	// runtime.itab: {inter *interfacetype; _type *_type; ...}
	tab := *(*unsafe.Pointer)(unsafe.Pointer(&itab))
	typ := *(*unsafe.Pointer)(unsafe.Add(tab, 8))
	var v any
	(*[2]unsafe.Pointer)(unsafe.Pointer(&v))[0] = typ
	name := "error"
	if t := reflect.TypeOf(v); t != nil {
		name = t.String()
	}
	a.errName[itab] = name
	return name
}

// sweep drops in-flight entries older than staleAfter: requests whose RET
// never came (a panicking handler, a Transport that never returned).
func (a *attachment) sweep() {
	if a.staleAfter <= 0 {
		return
	}
	t := time.NewTicker(min(a.staleAfter/2, 30*time.Second))
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case <-t.C:
		}
		cutoff := kclock.Now() - uint64(a.staleAfter)
		a.swept.Add(sweepMap(a.objs.Servers, cutoff, func(v *httpBPFServerState) uint64 { return v.Ev.StartNs }))
		a.swept.Add(sweepMap(a.objs.Clients, cutoff, func(v *httpBPFHttpEvent) uint64 { return v.StartNs }))
	}
}

func sweepMap[V any](m *ebpf.Map, cutoff uint64, start func(*V) uint64) uint64 {
	var (
		k     uint64
		v     V
		stale []uint64
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if start(&v) < cutoff {
			stale = append(stale, k)
		}
	}
	var n uint64
	for _, k := range stale {
		if m.Delete(k) == nil {
			n++
		}
	}
	return n
}

func (a *attachment) Stats() (probes.Stats, error) {
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probes.Stats{}, err
	}
	return probes.Stats{Lost: c[ctrLost] + c[ctrUnsupported], Evicted: a.swept.Load()}, nil
}

func (a *attachment) Close() error {
	a.closeOnce.Do(func() {
		close(a.stop)
		a.wg.Wait()
		a.closeErr = bpfload.CloseLinks(a.links)
		if err := a.objs.Close(); a.closeErr == nil {
			a.closeErr = err
		}
	})
	return a.closeErr
}
