package http

import (
	"os"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/ringread"
	"github.com/flowmill/flowmill/internal/testutil"
)

// attachSelf attaches the probe to this test binary and subscribes to its
// events; with read, a reader drains the ring (otherwise the test hands
// records to the attachment itself). Everything is released in t.Cleanup.
func attachSelf(t *testing.T, read bool) (*attachment, *probe.Sub[ServerRequest], *probe.Sub[ClientRequest]) {
	t.Helper()
	testutil.RequireBPF(t)
	testutil.CheckStart(t, bpfload.Check())
	env := &probe.Env{Scope: probe.Scope{Kind: probe.ScopeProcess, PID: uint32(os.Getpid())}, Bus: probe.NewBus(), RingSize: 1 << 20,
		WakeupBytes: 64 << 10, BootTime: kclock.New().Time}
	att, err := New().Attach(env)
	testutil.CheckStart(t, err)
	a := att.(*attachment)
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Error(err)
		}
	})
	servers, err := probe.Subscribe[ServerRequest](env.Bus, 64)
	if err != nil {
		t.Fatal(err)
	}
	clients, err := probe.Subscribe[ClientRequest](env.Bus, 64)
	if err != nil {
		t.Fatal(err)
	}
	if read {
		var n atomic.Uint64
		rd, err := ringread.New(a.objs.Events, 10*time.Millisecond, a.handle, &n)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { rd.Run(); close(done) }()
		t.Cleanup(func() { rd.Close(); <-done })
	}
	return a, servers, clients
}

// record is an event as the kernel side writes it.
func record(e *httpBPFHttpEvent) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(e)), unsafe.Sizeof(*e))
}

// Records that cannot be decoded are dropped and counted as malformed; a
// client request whose error type does not resolve is delivered, with
// error type _OTHER, and counted as incomplete. None vanishes silently.
func TestMalformedRecords(t *testing.T) {
	a, servers, clients := attachSelf(t, false)
	good := httpBPFHttpEvent{Kind: kindServer, Status: 200, MethodLen: 3, PathLen: 2}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&good.Method[0])), 3), "GET")
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&good.Path[0])), 2), "/x")

	a.handle(record(&good)[:10]) // short
	unknown := good
	unknown.Kind = 9
	a.handle(record(&unknown))
	badRoute := good // a read-only string outside the executable
	badRoute.Flags |= flagRouteRO
	badRoute.RouteLen = 4
	*(*uint64)(unsafe.Pointer(&badRoute.Route[0])) = 0x10
	a.handle(record(&badRoute))
	badMethod := good
	badMethod.Kind = kindClient
	badMethod.Flags |= flagMethodRO
	*(*uint64)(unsafe.Pointer(&badMethod.Method[0])) = ^uint64(0) - 1
	a.handle(record(&badMethod))
	const malformed = 4

	badErr := good
	badErr.Kind = kindClient
	badErr.Status = 0
	badErr.ErrItab = 0xdeadbeef
	a.handle(record(&badErr))
	a.handle(record(&good))

	st, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Malformed != malformed || st.Incomplete != 1 {
		t.Errorf("stats %+v: want %d malformed, 1 incomplete", st, malformed)
	}
	select {
	case c := <-clients.C():
		if c.Error != "_OTHER" || c.Method != "GET" {
			t.Errorf("client request with a bad itab: %+v", c)
		}
	default:
		t.Error("the client request with a bad itab was not delivered")
	}
	select {
	case s := <-servers.C():
		if s.Method != "GET" || s.Path != "/x" {
			t.Errorf("server request %+v", s)
		}
	default:
		t.Error("the well-formed server record was not delivered")
	}
	if len(servers.C())+len(clients.C()) != 0 {
		t.Error("a malformed record was delivered")
	}
}
