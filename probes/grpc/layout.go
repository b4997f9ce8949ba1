//go:build linux && amd64

package grpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"reflect"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	ggrpc "google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// layout is where the fields the probe reads are in this program. Every
// value comes from the types compiled into the running program (the binary
// the uprobes attach to): unsafe.Offsetof for exported fields, reflect for
// unexported ones, and the program's own type descriptors (the runtime's
// type links) for grpc-go's unexported types and the interface tables
// behind its interfaces. Nothing is served or called to learn them, so the
// library links none of grpc-go's server: a program that is only a gRPC
// client has none. No per-version offsets table, no DWARF.
type layout struct {
	// For both parts.
	statusS uint64 // status.Status.s (*spb.Status)
	spbCode uint64 // spb.Status.Code (int32)

	// For served RPCs.
	streamInner    uint64 // transport.ServerStream's embedded Stream
	streamIndirect bool   // ... is a pointer (grpc-go before 1.7x) rather than a value
	streamMethod   uint64 // transport.Stream.method (string)
	streamID       uint64 // transport.Stream.id (uint32)
	streamCtx      uint64 // transport.Stream.ctx (context.Context)
	streamSt       uint64 // transport.ServerStream.st (interface)
	stItab         uint64 // itab of (*http2Server, internalServerTransport): runtime address
	peerAddr       uint64 // http2Server.peer.Addr (net.Addr)
	localAddr      uint64 // http2Server.peer.LocalAddr (net.Addr)
	tcpAddrItab    uint64 // itab of (*net.TCPAddr, net.Addr)
	tcpAddrIP      uint64 // net.TCPAddr.IP ([]byte)
	tcpAddrPort    uint64 // net.TCPAddr.Port (int)
	serverErr      error  // why served RPCs cannot be traced, if they cannot

	// For incoming trace context, at operateHeaders.
	metaHeaders   uint64 // http2.MetaHeadersFrame.HeadersFrame (*HeadersFrame)
	metaFields    uint64 // http2.MetaHeadersFrame.Fields ([]hpack.HeaderField)
	frameStreamID uint64 // http2.HeadersFrame's FrameHeader.StreamID (uint32)
	fieldSize     uint64 // size of hpack.HeaderField
	fieldName     uint64 // hpack.HeaderField.Name (string)
	fieldValue    uint64 // hpack.HeaderField.Value (string)

	// For client RPCs and their parents.
	ctxWalk   bool   // every std Context keeps its parent first
	ctxRoot   uint64 // data word of context.Background()
	ccTarget  uint64 // grpc.ClientConn.target (string)
	csItab    uint64 // itab of (*grpc.clientStream, grpc.ClientStream)
	csWrap    uint64 // itab of (*grpc.clientStreamWrapper, grpc.ClientStream); 0: none
	csInner   uint64 // clientStreamWrapper's embedded ClientStream (interface)
	errItab   uint64 // itab of (*status.Error, error)
	errS      uint64 // status.Error.s (*status.Status)
	eofData   uint64 // data word of io.EOF
	clientErr error  // why client RPCs cannot be traced, if they cannot
}

var (
	layoutOnce sync.Once
	layoutVal  layout
)

// errLayout is wrapped by every layout error: grpc-go's internals are not
// what the probe knows how to read.
var errLayout = errors.New("grpc-go's internal layout is not one the probe knows: please report it with your grpc-go version")

// programLayout computes the layout once per process. Its serverErr and
// clientErr say which part cannot be traced; neither stops the other.
func programLayout() layout {
	layoutOnce.Do(func() { layoutVal = computeLayout() })
	return layoutVal
}

// iface is the layout of a non-empty interface value.
type iface struct {
	tab  unsafe.Pointer
	data unsafe.Pointer
}

func field(t reflect.Type, name string, kind reflect.Kind) (reflect.StructField, error) {
	if t.Kind() != reflect.Struct {
		return reflect.StructField{}, fmt.Errorf("%v is not a struct (%w)", t, errLayout)
	}
	sf, ok := t.FieldByName(name)
	if !ok || sf.Type.Kind() != kind || len(sf.Index) != 1 {
		return sf, fmt.Errorf("%v.%s is not a %v field (%w)", t, name, kind, errLayout)
	}
	return sf, nil
}

// typesByString is the runtime's index of the type descriptors compiled
// into the program that reflect may look up (pointer types among them),
// by their string ("*transport.ServerStream"). The standard library keeps
// it for linkname users (go.dev/issue/67401).
//
//go:linkname typesByString reflect.typesByString
func typesByString(s string) []unsafe.Pointer

// programPointerType returns the type *pkg.name compiled into the program,
// of a package the probe cannot name (grpc-go's unexported types), or an
// error if the program has none.
func programPointerType(pkg, name string) (reflect.Type, error) {
	str := "*" + path.Base(pkg) + "." + name
	for _, d := range typesByString(str) {
		var v any // a nil pointer of that type: only its type word is read
		(*[2]unsafe.Pointer)(unsafe.Pointer(&v))[0] = d
		t := reflect.TypeOf(v)
		if t.Kind() == reflect.Pointer && t.Elem().PkgPath() == pkg && t.Elem().Name() == name {
			return t, nil
		}
	}
	return nil, fmt.Errorf("%s.%s is not in the program (%w)", pkg, name, errLayout)
}

// itabOf returns the address of the interface table of (t, it) that
// values of interface type it holding a t carry: the runtime hands out the
// one the linker compiled into the program (it keeps one per pair).
func itabOf(it, t reflect.Type) (uint64, error) {
	if it.Kind() != reflect.Interface || !t.Implements(it) {
		return 0, fmt.Errorf("%v does not implement %v (%w)", t, it, errLayout)
	}
	v := reflect.New(it).Elem()
	v.Set(reflect.Zero(t))
	return uint64(uintptr((*iface)(v.Addr().UnsafePointer()).tab)), nil
}

func computeLayout() layout {
	var l layout
	var mh http2.MetaHeadersFrame
	var hf http2.HeadersFrame
	var f hpack.HeaderField
	l.metaHeaders = uint64(unsafe.Offsetof(mh.HeadersFrame))
	l.metaFields = uint64(unsafe.Offsetof(mh.Fields))
	l.frameStreamID = uint64(unsafe.Offsetof(hf.FrameHeader) + unsafe.Offsetof(hf.FrameHeader.StreamID))
	l.fieldSize = uint64(unsafe.Sizeof(f))
	l.fieldName = uint64(unsafe.Offsetof(f.Name))
	l.fieldValue = uint64(unsafe.Offsetof(f.Value))

	// status.Status{s *spb.Status}; spb.Status.Code: the code either part
	// reads.
	if err := statusLayout(&l); err != nil {
		l.serverErr, l.clientErr = err, err
		return l
	}
	l.serverErr = serverLayout(&l)
	l.clientErr = clientLayout(&l)
	return l
}

func statusLayout(l *layout) error {
	st := reflect.TypeFor[status.Status]()
	s, err := field(st, "s", reflect.Pointer)
	if err != nil {
		return err
	}
	l.statusS = uint64(s.Offset)
	code, err := field(s.Type.Elem(), "Code", reflect.Int32)
	if err != nil {
		return err
	}
	l.spbCode = uint64(code.Offset)
	return nil
}

const transportPkg = "google.golang.org/grpc/internal/transport"

// serverLayout completes l with what served RPCs need: the stream grpc-go
// hands its handlers (*transport.ServerStream, what
// grpc.ServerTransportStreamFromContext returns) and its HTTP/2 transport
// (*transport.http2Server). A program that serves no gRPC has neither: an
// error leaves served RPCs out.
func serverLayout(l *layout) error {
	var ta net.TCPAddr
	l.tcpAddrIP = uint64(unsafe.Offsetof(ta.IP))
	l.tcpAddrPort = uint64(unsafe.Offsetof(ta.Port))
	var a net.Addr = &ta
	l.tcpAddrItab = uint64(uintptr((*iface)(unsafe.Pointer(&a)).tab))

	ssp, err := programPointerType(transportPkg, "ServerStream")
	if err != nil {
		return err
	}
	if !ssp.Implements(reflect.TypeFor[ggrpc.ServerTransportStream]()) {
		return fmt.Errorf("%v is not a grpc.ServerTransportStream (%w)", ssp, errLayout)
	}
	sst := ssp.Elem() // transport.ServerStream
	inner, ok := sst.FieldByName("Stream")
	if !ok || len(inner.Index) != 1 || !inner.Anonymous {
		return fmt.Errorf("%v embeds no Stream (%w)", sst, errLayout)
	}
	l.streamInner = uint64(inner.Offset)
	it := inner.Type
	switch it.Kind() {
	case reflect.Pointer:
		l.streamIndirect = true
		it = it.Elem()
	case reflect.Struct:
	default:
		return fmt.Errorf("%v.Stream is a %v (%w)", sst, it.Kind(), errLayout)
	}
	m, err := field(it, "method", reflect.String)
	if err != nil {
		return err
	}
	l.streamMethod = uint64(m.Offset)
	id, err := field(it, "id", reflect.Uint32)
	if err != nil {
		return err
	}
	l.streamID = uint64(id.Offset)
	sc, err := field(it, "ctx", reflect.Interface)
	if err != nil {
		return err
	}
	l.streamCtx = uint64(sc.Offset)
	stf, err := field(sst, "st", reflect.Interface)
	if err != nil {
		return err
	}
	l.streamSt = uint64(stf.Offset)
	tt, err := programPointerType(transportPkg, "http2Server")
	if err != nil {
		return err
	}
	if l.stItab, err = itabOf(stf.Type, tt); err != nil {
		return err
	}
	pf, err := field(tt.Elem(), "peer", reflect.Struct)
	if err != nil {
		return err
	}
	pa, err := field(pf.Type, "Addr", reflect.Interface)
	if err != nil {
		return err
	}
	l.peerAddr = uint64(pf.Offset + pa.Offset)
	if la, err := field(pf.Type, "LocalAddr", reflect.Interface); err == nil {
		l.localAddr = uint64(pf.Offset + la.Offset)
	} else {
		l.localAddr = ^uint64(0) // grpc-go without Peer.LocalAddr: no server.port
	}
	return nil
}

// clientLayout completes l with what client RPCs need; an error leaves
// them out.
func clientLayout(l *layout) error {
	l.ctxWalk = contextParentsFirst()
	bg, todo := context.Background(), context.TODO()
	l.ctxRoot = uint64(uintptr((*iface)(unsafe.Pointer(&bg)).data))
	if t := uint64(uintptr((*iface)(unsafe.Pointer(&todo)).data)); t != l.ctxRoot {
		l.ctxRoot = 0 // not a shared zero-size value: walk to the end
	}
	eof := io.EOF
	l.eofData = uint64(uintptr((*[2]unsafe.Pointer)(unsafe.Pointer(&eof))[1]))
	serr := status.Error(codes.NotFound, "")
	l.errItab = uint64(uintptr((*iface)(unsafe.Pointer(&serr)).tab))
	et := reflect.TypeOf(serr)
	if et.Kind() != reflect.Pointer {
		return fmt.Errorf("a status error is a %v (%w)", et, errLayout)
	}
	es, err := field(et.Elem(), "s", reflect.Pointer)
	if err != nil {
		return err
	}
	if es.Type != reflect.TypeFor[*status.Status]() {
		return fmt.Errorf("%v.s is a %v (%w)", et.Elem(), es.Type, errLayout)
	}
	l.errS = uint64(es.Offset)
	tg, err := field(reflect.TypeFor[ggrpc.ClientConn](), "target", reflect.String)
	if err != nil {
		return err
	}
	l.ccTarget = uint64(tg.Offset)
	// The ClientStream NewStream returns (and Invoke uses).
	cs, err := programPointerType("google.golang.org/grpc", "clientStream")
	if err != nil {
		return err
	}
	cst := reflect.TypeFor[ggrpc.ClientStream]()
	if l.csItab, err = itabOf(cst, cs); err != nil {
		return err
	}
	// Newer grpc-go (v1.85.0, not v1.83.2) returns it inside a
	// *clientStreamWrapper; older ones have none.
	if w, err := programPointerType("google.golang.org/grpc", "clientStreamWrapper"); err == nil {
		in, ok := w.Elem().FieldByName("ClientStream")
		if !ok || !in.Anonymous || len(in.Index) != 1 || in.Type != cst {
			return fmt.Errorf("%v embeds no grpc.ClientStream (%w)", w.Elem(), errLayout)
		}
		if l.csWrap, err = itabOf(cst, w); err != nil {
			return err
		}
		l.csInner = uint64(in.Offset)
	}
	return nil
}

// contextParentsFirst checks, on real values, what the kernel side relies
// on to find the served RPC a client's context derives from: every context
// type of the standard library keeps its parent Context as its first word
// pair, so the parent's data pointer is at +8.
func contextParentsFirst() bool {
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	type key struct{}
	derive := []func(context.Context) (context.Context, context.CancelFunc){
		func(p context.Context) (context.Context, context.CancelFunc) { return context.WithCancel(p) },
		func(p context.Context) (context.Context, context.CancelFunc) {
			return context.WithDeadline(p, time.Now().Add(time.Hour))
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
