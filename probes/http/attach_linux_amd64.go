//go:build linux && amd64

package http

import (
	cryptorand "crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"sync"
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
	flagMethodRO     = 1 << 5 // method holds the address of a read-only string
	flagRouteRO      = 1 << 6 // route holds the address of a read-only string
)

// Counter slots (bpf/include/flowmill.h, bpf/http.c).
const (
	ctrLost = iota
	ctrUnsupported
	ctrServersAdd
	ctrServersDel
	ctrCtxsAdd
	ctrCtxsDel
	ctrClientsAdd
	ctrClientsDel
	ctrUnreadable // a request not traced: its Request could not be read
	ctrPreempted  // a request not traced: its entry program was overtaken
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
	for _, m := range []string{"servers", "server_ctxs", "clients", "conns"} {
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
		ReqUri: lay.reqURI, ResponseLo: lay.responseLo, CtxRoot: lay.ctxRoot,
	}
	// Without the read-only range every string is copied (slower, same
	// results).
	roLo, roHi, err := readOnlyRange("/proc/self/maps", "/proc/self/exe")
	if err == nil {
		off.RoLo, off.RoHi = roLo, roHi
	}
	if lay.ctxWalk {
		off.CtxWalk = 1
	}
	if err := spec.Variables["off"].Set(off); err != nil {
		return nil, fmt.Errorf("http: setting field offsets: %w", err)
	}
	var seed [8]byte
	if _, err := cryptorand.Read(seed[:]); err != nil {
		return nil, fmt.Errorf("http: seeding span IDs: %w", err)
	}
	if err := spec.Variables["id_seed"].Set(binary.NativeEndian.Uint64(seed[:])); err != nil {
		return nil, fmt.Errorf("http: seeding span IDs: %w", err)
	}
	floor, err := bpfload.EvictionFloor(p.maxInFlight)
	if err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	a := &attachment{
		boot:       env.BootTime,
		servers:    probes.Produce[ServerRequest](env.Bus),
		clients:    probes.Produce[ClientRequest](env.Bus),
		staleAfter: p.staleAfter,
		evictFloor: floor,
		roLo:       off.RoLo,
		roHi:       off.RoHi,
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

	roLo, roHi uint64 // the executable's read-only mappings (off.ro_lo, ro_hi)

	staleAfter time.Duration
	stop       chan struct{}

	// Losses of in-flight entries, by map (servers, server_ctxs,
	// clients): removed by the sweeper, or evicted by the LRU (inferred).
	statsMu    sync.Mutex // also held by the sweeper while it deletes
	swept      [nMaps]uint64
	evicted    [nMaps]uint64
	evictFloor int64 // below this many entries the LRU cannot have evicted
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
		pattern := a.str(e.Route[:], e.RouteLen, e.Flags&flagRouteRO != 0)
		r := ServerRequest{
			Start:            a.boot(e.StartNs),
			End:              a.boot(e.EndNs),
			Method:           a.str(e.Method[:], uint16(e.MethodLen), e.Flags&flagMethodRO != 0),
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
			Method:           a.str(e.Method[:], uint16(e.MethodLen), e.Flags&flagMethodRO != 0),
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

// str returns a short repeating string of the record: its bytes, or, when
// ro is set, the string in the executable's read-only data whose address
// the kernel side put in their place (immutable for the life of the
// process, so it is used as is, without a copy). An address outside those
// mappings cannot come from our programs and gives "".
func (a *attachment) str(b []int8, n uint16, ro bool) string {
	if !ro {
		return a.strs.get(b, n)
	}
	n = min(n, uint16(len(b)))
	addr := binary.LittleEndian.Uint64(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), 8))
	if addr < a.roLo || addr+uint64(n) > a.roHi || addr+uint64(n) < addr {
		return ""
	}
	p := *(*unsafe.Pointer)(unsafe.Pointer(&addr))
	return unsafe.String((*byte)(p), n)
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
		a.sweepOnce(kclock.Now() - uint64(a.staleAfter))
	}
}

// sweepOnce deletes the entries of requests started before cutoff, with
// the served requests' context entries.
func (a *attachment) sweepOnce(cutoff uint64) {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	var ctxs []uint64
	a.swept[mapServers] += sweepMap(a.objs.Servers, cutoff, func(v *httpBPFServerState) bool {
		if v.Ev.StartNs >= cutoff {
			return false
		}
		if v.Ctx != 0 {
			ctxs = append(ctxs, v.Ctx)
		}
		return true
	})
	for _, c := range ctxs {
		if a.objs.ServerCtxs.Delete(c) == nil {
			a.swept[mapCtxs]++
		}
	}
	a.swept[mapClients] += sweepMap(a.objs.Clients, cutoff, func(v *httpBPFHttpEvent) bool { return v.StartNs < cutoff })
}

func sweepMap[V any](m *ebpf.Map, cutoff uint64, stale func(*V) bool) uint64 {
	var (
		k    uint64
		v    V
		keys []uint64
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if stale(&v) {
			keys = append(keys, k)
		}
	}
	var n uint64
	for _, k := range keys {
		if m.Delete(k) == nil {
			n++
		}
	}
	return n
}

// The in-flight maps, as indexes of attachment.swept and .evicted.
const (
	mapServers = iota
	mapCtxs
	mapClients
	nMaps
)

// Stats reports records lost in the kernel (ring full, requests served by
// an unsupported ResponseWriter) and in-flight entries lost: removed by
// the sweeper as stale, or evicted by the LRU when more requests were in
// flight than WithMaxInFlight allows.
//
// Every entry the programs insert is still in its map, removed by them,
// removed by the sweeper, or evicted. Counting a map's entries costs a
// syscall per entry, so it is done only when the map may be full enough to
// evict. Inserts are read before the walk and removals after it, so the
// inference never exceeds the real evictions.
func (a *attachment) Stats() (probes.Stats, error) {
	before, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probes.Stats{}, err
	}
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	maps := [nMaps]struct {
		m        *ebpf.Map
		add, del int
	}{
		mapServers: {a.objs.Servers, ctrServersAdd, ctrServersDel},
		mapCtxs:    {a.objs.ServerCtxs, ctrCtxsAdd, ctrCtxsDel},
		mapClients: {a.objs.Clients, ctrClientsAdd, ctrClientsDel},
	}
	var (
		after []uint64
		total uint64
	)
	for i, m := range maps {
		inFlight := int64(before[m.add]) - int64(before[m.del]) - int64(a.swept[i]) - int64(a.evicted[i])
		if inFlight >= a.evictFloor {
			live, err := bpfload.CountKeys(m.m)
			if err != nil {
				return probes.Stats{}, err
			}
			if after == nil {
				if after, err = bpfload.Counters(a.objs.Counters, nCounters); err != nil {
					return probes.Stats{}, err
				}
			}
			n := int64(before[m.add]) - int64(after[m.del]) - int64(a.swept[i]) - live
			if n > int64(a.evicted[i]) {
				a.evicted[i] = uint64(n)
			}
		}
		total += a.swept[i] + a.evicted[i]
	}
	lost := before[ctrLost] + before[ctrUnsupported] + before[ctrUnreadable] + before[ctrPreempted]
	return probes.Stats{Lost: lost, Evicted: total, Missed: bpfload.Missed(&a.objs.httpBPFPrograms)}, nil
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
