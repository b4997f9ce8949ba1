//go:build linux && amd64

package grpc

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"google.golang.org/grpc/codes"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/goprobe"
	"github.com/flowmill/flowmill/internal/probe"
)

// Values of grpc_event.kind and .flags (bpf/grpc.c).
const (
	kindServer = 1
	kindClient = 2

	flagRemoteParent = 1 << 0
	flagSampled      = 1 << 1
	flagStatus       = 1 << 2
	flagPeer4        = 1 << 3
	flagPeer6        = 1 << 4
	flagLocal        = 1 << 5
	flagParentCtx    = 1 << 6
	flagParentG      = 1 << 7

	// grpc_event.parent_kind (enum grpc_parent): 1 is a served RPC.
	parentHTTP = 2
)

// Counter slots (bpf/include/flowmill.h, bpf/grpc.c).
const (
	ctrLost = iota
	ctrUnsupported
	ctrServersAdd
	ctrServersDel
	ctrUnreadable
	ctrPreempted
	ctrTpsAdd
	ctrTpsDel
	ctrTpBad
	ctrCtxsAdd
	ctrCtxsDel
	ctrClientsAdd
	ctrClientsDel
	ctrStreamsAdd
	ctrStreamsDel
	ctrStreamWrapped
	nCounters
)

// Attach finds the probed functions in the program's own executable,
// computes the field offsets from its types, loads the eBPF programs and
// attaches the uprobes. It is called by flowmill.Start.
//
// The server part (served RPCs) and the client part (RPCs made) are
// independent: each is attached when its functions are in the program
// and its layout is known, and each part left out is in Status.Skipped,
// with the reason. A program that is only a gRPC client may have no
// server functions (the linker leaves out what is never called, see the
// package documentation); one with neither part gets an attachment that
// does nothing, never an error.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	self := os.Getpid()
	if env.Scope.Kind == probe.ScopeProcess && env.Scope.PID != uint32(self) {
		return nil, fmt.Errorf("grpc: the gRPC probe instruments the calling process only (pid %d), not pid %d: start flowmill inside the service", self, env.Scope.PID)
	}
	status := Status{
		PropagationErr: fmt.Errorf("%w: %w", ErrPropagationUnavailable, errNoInjection),
		Skipped:        []string{skippedPropagation},
	}
	a := &attachment{
		boot:       env.BootTime,
		servers:    probe.Produce[ServerRPC](env.Bus),
		clients:    probe.Produce[ClientRPC](env.Bus),
		staleAfter: p.staleAfter,
		stop:       make(chan struct{}),
	}
	targets, err := findTargets("/proc/self/exe")
	if err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	lay := programLayout()
	// The part is skipped, never the session.
	server := partPresent(targets, "server RPCs", lay.serverErr, &status, serverFunc, statusFunc)
	client := partPresent(targets, "client RPCs", lay.clientErr, &status, invokeFunc, newStreamFunc, finishFunc)
	if !server && !client {
		p.setStatus(status)
		return a, nil
	}
	goidOff, err := goexe.GoroutineIDOffset()
	if err != nil {
		goidOff = ^uint64(0)
	}
	spec, err := loadGrpcBPF()
	if err != nil {
		return nil, fmt.Errorf("grpc: loading the embedded eBPF object: %w", err)
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	for _, m := range []string{"grpc_servers", "grpc_server_ctxs", "grpc_clients", "streams"} {
		spec.Maps[m].MaxEntries = p.maxInFlight
	}
	// A part left out has zero offsets: its programs are loaded (one
	// object) but not attached.
	off := grpcBPFGrpcOffsets{
		StatusS: lay.statusS, SpbCode: lay.spbCode,
		MetaHeaders: lay.metaHeaders, MetaFields: lay.metaFields, FrameStreamId: lay.frameStreamID,
		FieldSize: lay.fieldSize, FieldName: lay.fieldName, FieldValue: lay.fieldValue,
		Goid: goidOff,
	}
	if server {
		off.StreamInner, off.StreamMethod, off.StreamId = lay.streamInner, lay.streamMethod, lay.streamID
		off.StreamSt, off.StItab, off.PeerAddr, off.LocalAddr = lay.streamSt, lay.stItab, lay.peerAddr, lay.localAddr
		off.TcpaddrItab, off.TcpaddrIp, off.TcpaddrPort = lay.tcpAddrItab, lay.tcpAddrIP, lay.tcpAddrPort
		off.StreamCtx = lay.streamCtx
		if lay.streamIndirect {
			off.StreamIndirect = 1
		}
	}
	if client {
		off.Client = 1
		off.CtxRoot, off.CcTarget, off.CsItab = lay.ctxRoot, lay.ccTarget, lay.csItab
		off.CsWrapItab, off.CsWrapInner = lay.csWrap, lay.csInner
		off.ErrItab, off.ErrS, off.EofData = lay.errItab, lay.errS, lay.eofData
		if lay.ctxWalk {
			off.CtxWalk = 1
		}
	}
	// The served HTTP requests, from the HTTP family if it attached
	// before: client RPCs made for one are its children.
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{}}
	if root, walk, ok := goprobe.ShareHTTPServers(env.Bus, spec, opts, client); ok {
		off.HttpParent = 1
		off.HttpCtxRoot = root
		if walk {
			off.HttpCtxWalk = 1
		}
	} else if client {
		status.Skipped = append(status.Skipped, skippedHTTPParent)
	}
	if err := spec.Variables["off"].Set(off); err != nil {
		return nil, fmt.Errorf("grpc: setting field offsets: %w", err)
	}
	if a.evictFloor, err = bpfload.EvictionFloor(p.maxInFlight); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	if err := bpfload.LoadWith(spec, env, &a.objs, opts, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("grpc: %w", err)
	}
	a.loaded = true
	ex, err := link.OpenExecutable("/proc/self/exe")
	if err != nil {
		a.Close()
		return nil, fmt.Errorf("grpc: opening the program's executable: %w", err)
	}
	if server {
		if err := a.attachServer(ex, targets, lay, &status, self); err != nil {
			a.Close()
			return nil, err
		}
		status.Server = true
		status.Skipped = append(status.Skipped, skippedServeHTTP)
	}
	if client {
		if err := a.attachClient(ex, targets, self); err != nil {
			a.Close()
			return nil, err
		}
		status.Client = true
		status.HTTPParenting = off.HttpParent == 1
	}
	p.setStatus(status)
	a.wg.Go(a.sweep)
	return a, nil
}

// partPresent says whether a part (server or client RPCs) can be
// instrumented: all its functions are in the program and its layout is
// known. If not, it says why in st.Skipped.
func partPresent(targets map[string]*target, part string, layoutErr error, st *Status, funcs ...string) bool {
	var missing []string
	for _, f := range funcs {
		if targets[f] == nil {
			missing = append(missing, f)
		}
	}
	switch {
	case len(missing) > 0:
		st.Skipped = append(st.Skipped, part+": not instrumented: "+strings.Join(missing, ", ")+
			" not in the program (the linker leaves out what is never called)")
		return false
	case layoutErr != nil:
		st.Skipped = append(st.Skipped, part+": not instrumented: "+layoutErr.Error())
		return false
	}
	return true
}

// attachServer attaches the server part's programs. Returns first: an
// entry whose return is not yet probed would leave an entry behind. Then
// the status, the headers, the entry.
func (a *attachment) attachServer(ex *link.Executable, targets map[string]*target, lay layout, status *Status, self int) error {
	srv := targets[serverFunc]
	for _, r := range srv.probes.Returns {
		if err := a.uprobe(ex, srv.fn, r, a.objs.ServerReturn, self); err != nil {
			return err
		}
	}
	st := targets[statusFunc]
	if err := a.uprobe(ex, st.fn, st.probes.Entry, a.objs.StatusEnter, self); err != nil {
		return err
	}
	if h := targets[headersFunc]; h != nil && lay.metaHeaders == 0 && lay.metaFields == 8 && lay.fieldSize <= 64 {
		if err := a.uprobe(ex, h.fn, h.probes.Entry, a.objs.HeadersEnter, self); err != nil {
			return err
		}
		status.IncomingContext = true
	} else {
		status.Skipped = append(status.Skipped, "incoming trace context: "+headersFunc+" cannot be probed: traceparent metadata is ignored")
	}
	return a.uprobe(ex, srv.fn, srv.probes.Entry, a.objs.ServerEnter, self)
}

// attachClient attaches the client part's programs, returns first.
func (a *attachment) attachClient(ex *link.Executable, targets map[string]*target, self int) error {
	iv, ns, fin := targets[invokeFunc], targets[newStreamFunc], targets[finishFunc]
	for _, u := range []struct {
		t    *target
		at   []uint64
		prog *ebpf.Program
	}{
		{iv, iv.probes.Returns, a.objs.InvokeReturn},
		{ns, ns.probes.Returns, a.objs.StreamReturn},
		{fin, []uint64{fin.probes.Entry}, a.objs.FinishEnter},
		{iv, []uint64{iv.probes.Entry}, a.objs.InvokeEnter},
		{ns, []uint64{ns.probes.Entry}, a.objs.StreamEnter},
	} {
		for _, at := range u.at {
			if err := a.uprobe(ex, u.t.fn, at, u.prog, self); err != nil {
				return err
			}
		}
	}
	return nil
}

func (p *Probe) setStatus(s Status) {
	p.mu.Lock()
	p.status = s
	p.mu.Unlock()
}

type target struct {
	fn     goexe.Func
	probes goexe.Probes
}

// findTargets locates the probed functions in the executable. A function
// the linker left out (a program that serves no gRPC, or makes no RPC) is
// not in the map; a function that is present but cannot be analysed is an
// error.
func findTargets(path string) (map[string]*target, error) {
	exe, err := goexe.Open(path)
	if err != nil {
		return nil, err
	}
	defer exe.Close()
	out := map[string]*target{}
	for _, name := range []string{serverFunc, statusFunc, headersFunc, invokeFunc, newStreamFunc, finishFunc} {
		fn, ok, err := exe.Lookup(name)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		code, err := exe.Code(fn)
		if err != nil {
			return nil, err
		}
		pr, err := goexe.Analyze(code)
		if err != nil {
			return nil, fmt.Errorf("%w: disassembling %s: %v", probe.ErrMissingHook, name, err)
		}
		out[name] = &target{fn, pr}
	}
	return out, nil
}

type attachment struct {
	objs    grpcBPFObjects
	loaded  bool // objs hold a loaded object (not when both parts were skipped)
	links   []link.Link
	boot    func(uint64) time.Time
	servers *probe.Topic[ServerRPC]
	clients *probe.Topic[ClientRPC]

	ev   grpcBPFGrpcEvent // scratch: records need not be aligned
	strs goprobe.Interner

	malformed atomic.Uint64

	staleAfter time.Duration
	stop       chan struct{}

	statsMu    sync.Mutex // also held by the sweeper while it deletes
	swept      uint64
	evicted    uint64
	evictFloor int64
	wg         sync.WaitGroup
	closeOnce  sync.Once
	closeErr   error
}

func (a *attachment) uprobe(ex *link.Executable, fn goexe.Func, at uint64, prog *ebpf.Program, pid int) error {
	l, err := goprobe.Attach(ex, fn, at, prog, pid)
	if err != nil {
		return fmt.Errorf("grpc: %w", err)
	}
	a.links = append(a.links, l)
	return nil
}

func (a *attachment) Rings() []probe.Ring {
	if !a.loaded {
		return nil
	}
	return []probe.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

const eventSize = int(unsafe.Sizeof(grpcBPFGrpcEvent{}))

// handle decodes one record and publishes it. A record that cannot come
// from our programs (short, of an unknown kind) is dropped and counted as
// malformed. Nothing is decoded when nobody subscribes.
func (a *attachment) handle(raw []byte) {
	if len(raw) < eventSize {
		a.malformed.Add(1)
		return
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&a.ev)), eventSize), raw)
	e := &a.ev
	if e.Kind == kindClient {
		a.handleClient(e)
		return
	}
	if e.Kind != kindServer {
		a.malformed.Add(1)
		return
	}
	if !a.servers.Active() {
		return
	}
	full := a.strs.String(e.Method[:], e.MethodLen)
	r := ServerRPC{
		Start:       a.boot(e.StartNs),
		End:         a.boot(e.EndNs),
		FullMethod:  full,
		Code:        codes.Code(uint32(e.Code)),
		StatusKnown: e.Flags&flagStatus != 0,
		StreamID:    e.StreamId,
		Goroutine:   e.Goid,
		PID:         e.Pid,
		TID:         e.Tid,
	}
	r.Service, r.Method = splitMethod(full)
	r.Span = spanContext(e)
	switch {
	case e.Flags&flagPeer4 != 0:
		r.Peer = netip.AddrPortFrom(netip.AddrFrom4([4]byte(e.PeerIp[:4])), e.PeerPort)
	case e.Flags&flagPeer6 != 0:
		r.Peer = netip.AddrPortFrom(netip.AddrFrom16(e.PeerIp), e.PeerPort)
	}
	if e.Flags&flagLocal != 0 {
		r.ServerPort = int(e.LocalPort)
	}
	a.servers.Publish(&r)
}

func spanContext(e *grpcBPFGrpcEvent) SpanContext {
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

func (a *attachment) handleClient(e *grpcBPFGrpcEvent) {
	if !a.clients.Active() {
		return
	}
	full := a.strs.String(e.Method[:], e.MethodLen)
	r := ClientRPC{
		Start:      a.boot(e.StartNs),
		End:        a.boot(e.EndNs),
		FullMethod: full,
		Target:     a.strs.String(e.Target[:], e.TargetLen),
		Code:       codes.Code(uint32(e.Code)),
		Span:       spanContext(e),
		Goroutine:  e.Goid,
		PID:        e.Pid,
		TID:        e.Tid,
	}
	r.Service, r.Method = splitMethod(full)
	switch {
	case e.Flags&flagParentCtx != 0:
		r.Parent = ParentByContext
	case e.Flags&flagParentG != 0:
		r.Parent = ParentByGoroutine
	}
	r.ParentHTTP = e.ParentKind == parentHTTP
	a.clients.Publish(&r)
}

// sweep drops in-flight entries older than staleAfter: RPCs whose RET
// never came (a panicking handler).
func (a *attachment) sweep() { goprobe.Sweep(a.stop, a.staleAfter, a.sweepOnce) }

func (a *attachment) sweepOnce(cutoff uint64) {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	a.swept += goprobe.DeleteStale(a.objs.GrpcServers, func(v *grpcBPFGrpcServerState) bool { return v.Ev.StartNs < cutoff })
	for _, m := range []*ebpf.Map{a.objs.GrpcClients, a.objs.Streams} {
		a.swept += goprobe.DeleteStale(m, func(e *grpcBPFGrpcEvent) bool { return e.StartNs < cutoff })
	}
}

// Stats reports the RPCs not traced: lost in the kernel (ring full, a
// stream that could not be read, an entry overtaken on its CPU),
// unsupported (served through Server.ServeHTTP), records that did not
// decode (malformed), traceparent metadata that could not be read or
// parsed (incomplete: the RPC was traced as a new trace); and in-flight
// entries lost: removed by the sweeper as stale, or evicted by the LRU
// when more RPCs were in flight than WithMaxInFlight allows (inferred as
// in probes/http: inserts read before the walk, removals after it).
func (a *attachment) Stats() (probe.Stats, error) {
	if !a.loaded {
		return probe.Stats{}, nil
	}
	before, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
	}
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	inFlight := int64(before[ctrServersAdd]) - int64(before[ctrServersDel]) - int64(a.swept) - int64(a.evicted)
	if inFlight >= a.evictFloor {
		live, err := bpfload.CountKeys(a.objs.GrpcServers)
		if err != nil {
			return probe.Stats{}, err
		}
		after, err := bpfload.Counters(a.objs.Counters, nCounters)
		if err != nil {
			return probe.Stats{}, err
		}
		if n := int64(before[ctrServersAdd]) - int64(after[ctrServersDel]) - int64(a.swept) - live; n > int64(a.evicted) {
			a.evicted = uint64(n)
		}
	}
	return probe.Stats{
		Lost:        before[ctrLost] + before[ctrUnreadable] + before[ctrPreempted],
		Evicted:     a.swept + a.evicted,
		Missed:      bpfload.Missed(&a.objs.grpcBPFPrograms),
		Malformed:   a.malformed.Load(),
		Incomplete:  before[ctrTpBad],
		Unsupported: before[ctrUnsupported] + before[ctrStreamWrapped],
	}, nil
}

func (a *attachment) Close() error {
	a.closeOnce.Do(func() {
		close(a.stop)
		a.wg.Wait()
		a.closeErr = bpfload.CloseLinks(a.links)
		if !a.loaded {
			return
		}
		if err := a.objs.Close(); a.closeErr == nil {
			a.closeErr = err
		}
	})
	return a.closeErr
}
