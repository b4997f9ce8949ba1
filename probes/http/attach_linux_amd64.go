//go:build linux && amd64

package http

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/goprobe"
	"github.com/flowmill/flowmill/internal/gotype"
	"github.com/flowmill/flowmill/internal/probe"
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
	// Client requests not propagated, by why (see bpf/http.c).
	ctrPropTLS
	ctrPropHTTP2
	ctrPropConn
	ctrPropUntracked
	ctrPropSockFailed
	ctrPropNoSock
	ctrPropFull
	ctrPropUnavailable
	ctrPropMissed
	ctrTSDropped // served requests whose tracestate was not kept
	ctrH2CtxLost // HTTP/2 served requests whose trace context was read, not kept
	ctrREDFull   // requests not in the request metrics: the table of series was full
	nCounters
)

// Values of the propagate constant (bpf/http.c).
const (
	propagateOff         = 0
	propagateOn          = 1
	propagateUnavailable = 2
)

// Attach finds the probed functions in the program's own executable,
// computes the field offsets from its types, loads the eBPF programs and
// attaches the uprobes. It is called by flowmill.Start.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	self := os.Getpid()
	if env.Scope.Kind == probe.ScopeProcess && env.Scope.PID != uint32(self) {
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
	for _, m := range []string{"servers", "server_ctxs", "conns", "h2_ctxs"} {
		spec.Maps[m].MaxEntries = p.maxInFlight
	}
	sizes := sizesFor(p.maxInFlight)
	sizes.apply(spec)
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
		ReqUri: lay.reqURI, ResponseLo: lay.responseLo, ResponseMajor: lay.responseMajor, CtxRoot: lay.ctxRoot,
		ReqTls: lay.reqTLS, ReqProtoMajor: lay.reqProtoMajor, ReqProtoMinor: lay.reqProtoMinor,
		UrlScheme: lay.urlScheme, ResponseMinor: lay.responseMinor,
	}
	ex, err := link.OpenExecutable("/proc/self/exe")
	if err != nil {
		return nil, fmt.Errorf("http: opening the program's executable: %w", err)
	}
	h2ctx := false
	if status.Server {
		if lay.h2Err == nil {
			off.H2Itab, off.H2Rws, off.H2Lo = lay.h2.itab, lay.h2.rws, lay.h2.lo
			off.H2Status, off.H2Written = lay.h2.status, lay.h2.writ
			status.ServerHTTP2 = true
			if err := h2Context(ex, targets, lay.h2, &off); err != nil {
				status.Skipped = append(status.Skipped, skippedH2Context+err.Error())
			} else {
				h2ctx = true
			}
		} else {
			status.Skipped = append(status.Skipped, skippedH2+lay.h2Err.Error())
		}
	}
	// Without the read-only range every string is copied (slower, same
	// results).
	roLo, roHi, err := goexe.ReadOnlyRange()
	if err == nil {
		off.RoLo, off.RoHi = roLo, roHi
	}
	if lay.ctxWalk {
		off.CtxWalk = 1
	}

	// Propagation first: its maps are shared with the uprobes' object.
	var (
		prop *propagation
		mode uint32 = propagateOff
	)
	switch {
	case !p.propagate:
		status.Skipped = append(status.Skipped, skippedOff)
	case status.Client:
		prop, err = p.setUpPropagation(targets, sizes, &off)
		if err != nil {
			mode = propagateUnavailable
			status.PropagationErr = fmt.Errorf("%w: %w", ErrPropagationUnavailable, err)
			status.Skipped = append(status.Skipped, "trace context propagation: unavailable: "+err.Error())
		} else {
			mode = propagateOn
			status.Propagation = true
			status.Skipped = append(status.Skipped, skippedTLS)
		}
	}
	if err := spec.Variables["propagate"].Set(mode); err != nil {
		prop.closeIfAny()
		return nil, fmt.Errorf("http: %w", err)
	}
	if err := spec.Variables["off"].Set(off); err != nil {
		prop.closeIfAny()
		return nil, fmt.Errorf("http: setting field offsets: %w", err)
	}
	floor, err := bpfload.EvictionFloor(p.maxInFlight)
	if err != nil {
		prop.closeIfAny()
		return nil, fmt.Errorf("http: %w", err)
	}
	a := &attachment{
		boot:       env.BootTime,
		servers:    probe.Produce[ServerRequest](env.Bus),
		clients:    probe.Produce[ClientRequest](env.Bus),
		staleAfter: p.staleAfter,
		evictFloor: floor,
		roLo:       off.RoLo,
		roHi:       off.RoHi,
		h2ctx:      h2ctx,
		prop:       prop,
		stop:       make(chan struct{}),
	}
	var e error = errors.New("")
	a.errTypes = gotype.New(unsafe.Pointer(&e))
	var opts *ebpf.CollectionOptions
	if prop != nil {
		opts = &ebpf.CollectionOptions{MapReplacements: prop.replacements()}
	}
	if err := bpfload.LoadWith(spec, env, &a.objs, opts, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		prop.closeIfAny()
		return nil, fmt.Errorf("http: %w", err)
	}
	cfg := httpBPFSamplingCfg{Bound: sampleBound(p.sampleRatio)}
	if p.sampling {
		cfg.Drop = 1
		status.Sampling, status.SamplingRatio = true, p.sampleRatio
	}
	if err := a.objs.Sampling.Put(uint32(0), &cfg); err != nil {
		a.Close()
		return nil, fmt.Errorf("http: setting the sampling ratio: %w", err)
	}
	progs := map[string][2]*ebpf.Program{
		serverFunc: {a.objs.ServerEnter, a.objs.ServerReturn},
		clientFunc: {a.objs.ClientEnter, a.objs.ClientReturn},
		pconnFunc:  {a.objs.PconnEnter, nil},
	}
	for _, n := range h2HeadersFuncs {
		progs[n] = [2]*ebpf.Program{a.objs.H2Headers, nil}
	}
	// Returns first: an entry whose return is not yet probed would leave
	// an entry behind.
	for _, t := range targets {
		pr := progs[t.fn.Name]
		if pr[1] == nil {
			continue
		}
		for _, r := range t.probes.Returns {
			if err := a.uprobe(ex, t.fn, r, pr[1], self); err != nil {
				a.Close()
				return nil, err
			}
		}
	}
	for _, t := range targets {
		if t.fn.Name == pconnFunc && mode != propagateOn {
			continue
		}
		if progs[t.fn.Name][0] == a.objs.H2Headers && !h2ctx {
			continue
		}
		if err := a.uprobe(ex, t.fn, t.probes.Entry, progs[t.fn.Name][0], self); err != nil {
			a.Close()
			return nil, err
		}
	}
	p.mu.Lock()
	p.status = status
	p.att = a
	p.mu.Unlock()
	a.wg.Go(a.sweep)
	if status.Server {
		a.ctxRoot, a.ctxWalk = off.CtxRoot, off.CtxWalk != 0
		probe.Provide[probe.HTTPServers](env.Bus, a)
	}
	return a, nil
}

// h2Context sets up the reading of HTTP/2 served requests' incoming trace
// context: the offsets of h2_headers and server_enter into off, the
// header fields' offset learnt from the program (learnH2Fields). An error
// says why it is not read.
func h2Context(ex *link.Executable, targets []target, l h2Layout, off *httpBPFHttpOffsets) error {
	if l.ctxErr != nil {
		return l.ctxErr
	}
	t, ok := h2ContextTarget(targets)
	if !ok {
		return fmt.Errorf("none of %v is in the program (or could be disassembled)", h2HeadersFuncs)
	}
	fields, err := learnH2Fields(ex, t, l.hf)
	if err != nil {
		return fmt.Errorf("learning where net/http keeps an HTTP/2 request's header fields: %w", err)
	}
	off.H2Stream, off.H2StreamId, off.H2Fields = l.stream, l.streamID, fields
	off.H2HfSize, off.H2HfName, off.H2HfValue = l.hf.size, l.hf.name, l.hf.value
	return nil
}

// ServerMaps is probe.HTTPServers: the requests being served, for other
// families' spans to find their parent in.
func (a *attachment) ServerMaps() (servers, ctxs *ebpf.Map) {
	return a.objs.Servers, a.objs.ServerCtxs
}

// ContextRoot is probe.HTTPServers.
func (a *attachment) ContextRoot() (uint64, bool) { return a.ctxRoot, a.ctxWalk }

// setUpPropagation computes what the propagation uprobe reads into off and
// attaches the socket programs.
func (p *Probe) setUpPropagation(targets []target, sizes mapSizes, off *httpBPFHttpOffsets) (*propagation, error) {
	found := false
	for _, t := range targets {
		found = found || t.fn.Name == pconnFunc
	}
	if !found {
		return nil, fmt.Errorf("%w: %s is not in the program", probe.ErrMissingHook, pconnFunc)
	}
	pl, err := programPropLayout()
	if err != nil {
		return nil, fmt.Errorf("reading net/http's connection layout in this program: %w", err)
	}
	off.PcConn, off.TcpconnFd, off.NetfdSysfd = pl.pcConn, pl.tcpConnFD, pl.netFDSysfd
	off.TcpconnItab, off.TcpconnType = pl.tcpConnItab, pl.tcpConnType
	off.TlsconnItab, off.TlsconnType = pl.tlsConnItab, pl.tlsConnType
	return attachPropagation(sizes)
}

func (pr *propagation) closeIfAny() {
	if pr != nil {
		pr.close()
	}
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
	for _, name := range append([]string{serverFunc, clientFunc, pconnFunc}, h2HeadersFuncs...) {
		fn, ok, err := exe.Lookup(name)
		if err != nil {
			return nil, st, err
		}
		if !ok {
			if name == serverFunc || name == clientFunc { // propagation and HTTP/2 say so of the others
				st.Skipped = append(st.Skipped, name+": not in the program (never called), not instrumented")
			}
			continue
		}
		code, err := exe.Code(fn)
		if err != nil {
			return nil, st, err
		}
		pr, err := goexe.Analyze(code)
		if err != nil {
			if slices.Contains(h2HeadersFuncs, name) {
				// Only HTTP/2's incoming trace context is lost
				// (h2Context says so).
				continue
			}
			return nil, st, fmt.Errorf("%w: disassembling %s: %v", probe.ErrMissingHook, name, err)
		}
		out = append(out, target{fn, pr})
		switch name {
		case serverFunc:
			st.Server = true
		case clientFunc:
			st.Client = true
		}
	}
	return out, st, nil
}

type attachment struct {
	objs    httpBPFObjects
	links   []link.Link
	boot    func(uint64) time.Time
	servers *probe.Topic[ServerRequest]
	clients *probe.Topic[ClientRequest]

	ev       httpBPFHttpEvent // scratch: records need not be aligned
	strs     goprobe.Interner
	errTypes *gotype.Names // the Transport's errors, by itab

	// Records of the ring that could not be decoded and were dropped,
	// and events delivered with a field unknown (see Stats).
	malformed, incomplete atomic.Uint64

	roLo, roHi uint64 // the executable's read-only mappings (off.ro_lo, ro_hi)

	h2ctx bool // HTTP/2 served requests' incoming trace context is read

	ctxRoot uint64 // off.ctx_root, for probe.HTTPServers
	ctxWalk bool   // off.ctx_walk

	// The request metrics' series: decoded once each (seriesMu); their
	// last reading, kept at Close (finalRED, finalUnaggregated).
	seriesMu          sync.Mutex
	seriesIDs         map[httpBPFRedKey]string
	seriesWalk        bpfload.Walker[httpBPFRedKey, httpBPFRedHist]
	finalRED          map[string]*finalSeries
	finalUnaggregated uint64

	prop      *propagation      // nil: propagation off or unavailable
	unwritten atomic.Uint64     // inject entries swept as stale
	finalProp *PropagationStats // after Close

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
	l, err := goprobe.Attach(ex, fn, at, prog, pid)
	if err != nil {
		return fmt.Errorf("http: %w", err)
	}
	a.links = append(a.links, l)
	return nil
}

func (a *attachment) Rings() []probe.Ring {
	return []probe.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

const eventSize = int(unsafe.Sizeof(httpBPFHttpEvent{}))

// handle decodes one record and publishes it. A record that cannot come
// from our programs (short, of an unknown kind, naming a string outside
// the executable's read-only data) is dropped and counted as malformed; a
// client request whose error type does not resolve is delivered with
// Error "_OTHER" and counted as incomplete. Nothing is decoded when
// nobody subscribes.
func (a *attachment) handle(raw []byte) {
	if len(raw) < eventSize {
		a.malformed.Add(1)
		return
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&a.ev)), eventSize), raw)
	e := &a.ev
	switch e.Kind {
	case kindServer:
		if !a.servers.Active() {
			return
		}
		pattern, ok1 := a.str(e.Route[:], e.RouteLen, e.Flags&flagRouteRO != 0)
		method, ok2 := a.str(e.Method[:], uint16(e.MethodLen), e.Flags&flagMethodRO != 0)
		if !ok1 || !ok2 {
			a.malformed.Add(1)
			return
		}
		r := ServerRequest{
			Start:            a.boot(e.StartNs),
			End:              a.boot(e.EndNs),
			Method:           method,
			Path:             str(e.Path[:], e.PathLen),
			Pattern:          pattern,
			Route:            routeOf(pattern),
			Host:             a.strs.String(e.Host[:], uint16(e.HostLen)),
			ProtocolVersion:  ProtocolVersion{e.ProtoMajor, e.ProtoMinor},
			Scheme:           scheme(e.Scheme),
			StatusCode:       servedStatus(e.Status, e.Flags),
			RequestBodySize:  e.ReqLength,
			ResponseBodySize: e.RespLength,
			Hijacked:         e.Flags&flagHijacked != 0,
			Span:             spanContext(e),
			Goroutine:        e.Goid,
			PID:              e.Pid,
			TID:              e.Tid,
		}
		r.Peer, _ = netip.ParseAddrPort(str(e.Peer[:], uint16(e.PeerLen)))
		a.servers.Publish(&r)
	case kindClient:
		if !a.clients.Active() {
			return
		}
		method, ok := a.str(e.Method[:], uint16(e.MethodLen), e.Flags&flagMethodRO != 0)
		if !ok {
			a.malformed.Add(1)
			return
		}
		errType, ok := a.errTypes.Name(e.ErrItab)
		if !ok {
			errType = errTypeOther
			a.incomplete.Add(1)
		}
		r := ClientRequest{
			Start:            a.boot(e.StartNs),
			End:              a.boot(e.EndNs),
			Method:           method,
			Host:             a.strs.String(e.Host[:], uint16(e.HostLen)),
			Path:             str(e.Path[:], e.PathLen),
			Scheme:           scheme(e.Scheme),
			ProtocolVersion:  ProtocolVersion{e.ProtoMajor, e.ProtoMinor},
			StatusCode:       int(e.Status),
			RequestBodySize:  e.ReqLength,
			ResponseBodySize: e.RespLength,
			Error:            errType,
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
		if e.Prop <= uint8(PropagationUnavailable) {
			r.Propagation = Propagation(e.Prop)
		}
		a.clients.Publish(&r)
	default:
		a.malformed.Add(1)
	}
}

// servedStatus is the status of a served request from what the kernel
// read: net/http sends 200 when the handler wrote nothing, unless it
// hijacked the connection (0: whatever was sent is unknown).
func servedStatus(status uint16, flags uint8) int {
	if status == 0 && flags&flagHijacked == 0 {
		return 200
	}
	return int(status)
}

// scheme decodes http_event.scheme; a value our programs do not write is
// unknown.
func scheme(v uint8) Scheme {
	if v <= uint8(SchemeHTTPS) {
		return Scheme(v)
	}
	return SchemeUnknown
}

// errTypeOther is ClientRequest.Error for an error whose type is not known
// (the semantic conventions' fallback value of error.type).
const errTypeOther = "_OTHER"

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
// mappings cannot come from our programs: false.
func (a *attachment) str(b []int8, n uint16, ro bool) (string, bool) {
	if !ro {
		return a.strs.String(b, n), true
	}
	n = min(n, uint16(len(b)))
	addr := binary.LittleEndian.Uint64(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), 8))
	if a.roLo == 0 || addr < a.roLo || addr+uint64(n) > a.roHi || addr+uint64(n) < addr {
		return "", false
	}
	p := *(*unsafe.Pointer)(unsafe.Pointer(&addr))
	return unsafe.String((*byte)(p), n), true
}

func str(b []int8, n uint16) string {
	n = min(n, uint16(len(b)))
	return string(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), n))
}

// sweep drops in-flight entries older than staleAfter: requests whose RET
// never came (a panicking handler, a Transport that never returned).
func (a *attachment) sweep() { goprobe.Sweep(a.stop, a.staleAfter, a.sweepOnce) }

// sweepOnce deletes the entries of requests started before cutoff, with
// the served requests' context entries.
func (a *attachment) sweepOnce(cutoff uint64) {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	var ctxs []uint64
	a.swept[mapServers] += goprobe.DeleteStale(a.objs.Servers, func(v *httpBPFServerState) bool {
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
	a.swept[mapClients] += goprobe.DeleteStale(a.objs.Clients, func(v *httpBPFHttpEvent) bool { return v.StartNs < cutoff })
	// HTTP/2 trace contexts whose handler never ran (a malformed
	// request, a connection closed first): no loss of a request.
	goprobe.DeleteStale(a.objs.H2Ctxs, func(v *httpBPFH2Ctx) bool { return v.StartNs < cutoff })
	if a.prop != nil {
		a.unwritten.Add(sweepInject(a.objs.Inject, cutoff))
	}
}

// sweepInject deletes what was prepared for requests whose first write
// never came (they failed before being sent, on a connection that stays
// open).
func sweepInject(m *ebpf.Map, cutoff uint64) uint64 {
	var (
		k    httpBPFSockTuple
		v    httpBPFInjectReq
		keys []httpBPFSockTuple
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if v.StartNs < cutoff {
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

// Stats reports the requests not traced: lost in the kernel (ring full,
// or a request whose entry could not read it or was overtaken on its CPU),
// unsupported (served by another ResponseWriter than net/http's HTTP/1
// and HTTP/2 ones, or over HTTP/2 when its writer could not be learnt:
// see Status.ServerHTTP2), records that did not decode (malformed) and client requests
// whose error type is unknown (incomplete); and in-flight entries lost:
// removed by the sweeper as stale, or evicted by the LRU when more
// requests were in flight than WithMaxInFlight allows. Client requests
// whose trace context did not go out are counted too (see
// PropagationStats): those propagation cannot handle (TLS, HTTP/2, ...) as
// unsupported, kernel failures, full tables and a tracestate not passed on
// as incomplete (the request was traced; its Propagation says what it
// lacked); one that had a traceparent of its own is no loss.
//
// Every entry the programs insert is still in its map, removed by them,
// removed by the sweeper, or evicted. Counting a map's entries costs a
// syscall per entry, so it is done only when the map may be full enough to
// evict. Inserts are read before the walk and removals after it, so the
// inference never exceeds the real evictions.
func (a *attachment) Stats() (probe.Stats, error) {
	before, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
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
				return probe.Stats{}, err
			}
			if after == nil {
				if after, err = bpfload.Counters(a.objs.Counters, nCounters); err != nil {
					return probe.Stats{}, err
				}
			}
			n := int64(before[m.add]) - int64(after[m.del]) - int64(a.swept[i]) - live
			if n > int64(a.evicted[i]) {
				a.evicted[i] = uint64(n)
			}
		}
		total += a.swept[i] + a.evicted[i]
	}
	st := probe.Stats{
		Lost:        before[ctrLost] + before[ctrUnreadable] + before[ctrPreempted] + before[ctrREDFull],
		Evicted:     total,
		Missed:      bpfload.Missed(&a.objs.httpBPFPrograms),
		Malformed:   a.malformed.Load(),
		Incomplete:  a.incomplete.Load(),
		Unsupported: before[ctrUnsupported],
	}
	// Requests whose trace context did not go out: those propagation
	// cannot handle are unsupported; those it failed (a full table, a
	// failed insertion, a missed hit) and those that went out without
	// their tracestate were delivered with part of what they should have
	// carried missing, as their Propagation says: incomplete. Lost stays
	// what it is, requests that were not traced at all. (Present, a
	// traceparent of the request's own, is no loss.)
	ps, err := a.propagationCounts(before)
	if err != nil {
		return probe.Stats{}, err
	}
	st.Unsupported += ps.TLS + ps.HTTP2 + ps.OtherConn + ps.Untracked + ps.HeaderTooLarge + ps.NotHTTP1 + ps.Unavailable
	// A served HTTP/2 request whose traceparent was read and lost
	// started a trace of its own: delivered, its parent missing.
	st.Incomplete += ps.Failed + ps.TracestateDropped + before[ctrH2CtxLost]
	if a.prop != nil {
		st.Missed += bpfload.Missed(&struct{ A, B, C *ebpf.Program }{a.prop.objs.TrackState, a.prop.objs.TrackSock, a.prop.objs.InjectMsg})
	}
	return st, nil
}

// propagationCounts sums the propagation counters of both objects; h are
// the http object's counters.
func (a *attachment) propagationCounts(h []uint64) (PropagationStats, error) {
	var pc []uint64
	if a.prop != nil {
		var err error
		if pc, err = a.prop.counters(); err != nil {
			return PropagationStats{}, err
		}
	} else {
		pc = make([]uint64, nPCounters)
	}
	return PropagationStats{
		Injected:       pc[pctrInjected],
		Present:        pc[pctrPresent],
		TLS:            h[ctrPropTLS],
		HTTP2:          h[ctrPropHTTP2],
		OtherConn:      h[ctrPropConn],
		Untracked:      h[ctrPropUntracked],
		HeaderTooLarge: pc[pctrTooLarge],
		NotHTTP1:       pc[pctrNotHTTP1],
		Failed: h[ctrPropSockFailed] + h[ctrPropNoSock] + h[ctrPropFull] + h[ctrPropMissed] +
			pc[pctrFailed] + pc[pctrPreempted] + pc[pctrForeign],
		Unavailable:       h[ctrPropUnavailable],
		Unwritten:         a.unwritten.Load(),
		TracestateDropped: h[ctrTSDropped] + pc[pctrTSMissing],
	}, nil
}

// propagationStats reads the propagation counters (the final ones after
// Close).
func (a *attachment) propagationStats() PropagationStats {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	if a.finalProp != nil {
		return *a.finalProp
	}
	h, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return PropagationStats{}
	}
	ps, err := a.propagationCounts(h)
	if err != nil {
		return PropagationStats{}
	}
	return ps
}

func (a *attachment) Close() error {
	a.closeOnce.Do(func() {
		close(a.stop)
		a.wg.Wait()
		a.closeErr = bpfload.CloseLinks(a.links)
		a.keepRED()
		if a.objs.Counters != nil {
			final := a.propagationStats()
			a.statsMu.Lock()
			a.finalProp = &final
			a.statsMu.Unlock()
		}
		if a.prop != nil {
			if err := a.prop.close(); a.closeErr == nil {
				a.closeErr = err
			}
		}
		if err := a.objs.Close(); a.closeErr == nil {
			a.closeErr = err
		}
		if err := a.errTypes.Close(); a.closeErr == nil {
			a.closeErr = err
		}
	})
	return a.closeErr
}

// eachSeries implements requestTotals: one walk of the kernel's table of
// series (a few system calls), or, after Close, its last reading.
func (a *attachment) eachSeries(fn func(id string, s func() (requestSeries, bool), b *redBuckets)) error {
	a.seriesMu.Lock()
	defer a.seriesMu.Unlock()
	if a.finalRED != nil {
		for id, f := range a.finalRED {
			fn(id, func() (requestSeries, bool) { return f.s, f.ok }, &f.b)
		}
		return nil
	}
	if a.objs.Red == nil {
		return nil
	}
	if a.seriesIDs == nil {
		a.seriesIDs = make(map[httpBPFRedKey]string)
	}
	return a.seriesWalk.Walk(a.objs.Red, func(keys []httpBPFRedKey, hs []httpBPFRedHist) error {
		for i := range keys {
			k := &keys[i]
			id, ok := a.seriesIDs[*k]
			if !ok {
				id = strconv.Itoa(len(a.seriesIDs))
				a.seriesIDs[*k] = id
			}
			fn(id, func() (requestSeries, bool) { return a.series(k) }, (*redBuckets)(unsafe.Pointer(&hs[i])))
		}
		return nil
	})
}

// unaggregated implements requestTotals.
func (a *attachment) unaggregated() uint64 {
	a.seriesMu.Lock()
	final := a.finalRED != nil
	a.seriesMu.Unlock()
	if final {
		return a.finalUnaggregated
	}
	c, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return 0
	}
	return c[ctrREDFull]
}

// keepRED keeps the last reading of the series for the recorders that
// read them after Close (an exporter shut down after its session).
func (a *attachment) keepRED() {
	if a.objs.Red == nil {
		return
	}
	final := make(map[string]*finalSeries)
	err := a.eachSeries(func(id string, decode func() (requestSeries, bool), b *redBuckets) {
		f := &finalSeries{b: *b}
		f.s, f.ok = decode()
		final[id] = f
	})
	n := a.unaggregated()
	a.seriesMu.Lock()
	defer a.seriesMu.Unlock()
	if err == nil {
		a.finalRED, a.finalUnaggregated = final, n
	} else {
		a.finalRED = map[string]*finalSeries{}
	}
}

// finalSeries is a series as Close left it.
type finalSeries struct {
	s  requestSeries
	ok bool
	b  redBuckets
}

// keyStr is str for the strings of a series key: not through the
// interner, which is the ring reader's alone (series are decoded on the
// SDK's collecting goroutines).
func (a *attachment) keyStr(b []int8, n uint16, ro bool) (string, bool) {
	if !ro {
		return str(b, n), true
	}
	return a.str(b, n, true)
}

// series decodes the attributes' fields of a series key; false for one our
// programs cannot have written.
func (a *attachment) series(k *httpBPFRedKey) (requestSeries, bool) {
	method, ok := a.keyStr(k.Method[:], uint16(k.MethodLen), k.Flags&flagMethodRO != 0)
	if !ok {
		return requestSeries{}, false
	}
	switch k.Kind {
	case kindServer:
		pattern, ok := a.keyStr(k.Str[:], k.StrLen, k.Flags&flagRouteRO != 0)
		if !ok {
			return requestSeries{}, false
		}
		s := ServerRequest{
			Method: method, Pattern: pattern, Route: routeOf(pattern),
			ProtocolVersion: ProtocolVersion{k.ProtoMajor, k.ProtoMinor},
			Scheme:          scheme(k.Scheme), StatusCode: servedStatus(k.Status, k.Flags),
			Hijacked: k.Flags&flagHijacked != 0,
		}
		return requestSeries{IsServer: true, Server: s}, true
	case kindClient:
		errType, ok := a.errTypes.Name(k.ErrItab)
		if !ok {
			errType = errTypeOther
		}
		return requestSeries{Client: ClientRequest{
			Method: method, Host: str(k.Str[:], k.StrLen),
			ProtocolVersion: ProtocolVersion{k.ProtoMajor, k.ProtoMinor},
			StatusCode:      int(k.Status), Error: errType,
		}}, true
	}
	return requestSeries{}, false
}
