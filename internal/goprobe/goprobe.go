// Package goprobe is what the families that put uprobes on the Go program
// itself (probes/http, probes/grpc, probes/sql) share in user space:
// attaching a uprobe to a function of the executable, interning the short
// strings their records carry, and sweeping the in-flight entries whose
// return never came. bpf/include/goprobe.h is their shared C.
package goprobe

import (
	"fmt"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/kclock"
	"github.com/flowmill/flowmill/internal/probe"
)

// Attach attaches prog as a uprobe at byte at of fn in ex (0: its first
// instruction), for the process pid. A failure wraps probe.ErrMissingHook
// and names the hook; the caller prefixes its family.
func Attach(ex *link.Executable, fn goexe.Func, at uint64, prog *ebpf.Program, pid int) (link.Link, error) {
	l, err := ex.Uprobe(fn.Name, prog, &link.UprobeOptions{Address: fn.Offset, Offset: at, PID: pid})
	if err != nil {
		return nil, fmt.Errorf("%w: uprobe on %s+%#x: %w", probe.ErrMissingHook, fn.Name, at, bpfload.Explain(err))
	}
	return l, nil
}

// Interner interns the short strings that repeat from record to record
// (methods, hosts, routes): one allocation per distinct value. It is
// bounded: past 4096 values it starts afresh. Not safe for concurrent use:
// a ring's reader goroutine owns it.
type Interner struct{ m map[string]string }

// String returns the first n bytes of b (at most len(b)) as a string.
func (s *Interner) String(b []int8, n uint16) string {
	n = min(n, uint16(len(b)))
	k := unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(b))), n)
	if v, ok := s.m[string(k)]; ok { // no allocation: the compiler's map lookup by []byte
		return v
	}
	if s.m == nil || len(s.m) >= 4096 {
		s.m = make(map[string]string)
	}
	v := string(k)
	s.m[v] = v
	return v
}

// Sweep calls sweep every min(staleAfter/2, 30 s) until stop is closed,
// with a cutoff on the kernel's monotonic clock (kclock): in-flight
// entries started before it are stale, their return never came (a
// panicking handler, a call that never returned). A staleAfter of 0 or
// less disables it: Sweep returns at once.
func Sweep(stop <-chan struct{}, staleAfter time.Duration, sweep func(cutoff uint64)) {
	if staleAfter <= 0 {
		return
	}
	t := time.NewTicker(min(staleAfter/2, 30*time.Second))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		sweep(kclock.Now() - uint64(staleAfter))
	}
}

// DeleteStale deletes the entries of m (uint64 keys, values of type V) for
// which stale returns true, and returns how many it deleted (an entry the
// kernel removed meanwhile is not counted).
func DeleteStale[V any](m *ebpf.Map, stale func(*V) bool) uint64 {
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

// httpUnused are the maps of the HTTP family's declarations
// (bpf/include/http.h) that an object including http_server.h for
// parenting never uses.
var httpUnused = []string{"clients", "inject", "socks", "tracestates"}

// ShareHTTPServers readies spec, an object that includes
// bpf/include/http_server.h to parent its spans on the requests the HTTP
// family serves. When want is true and that family attached before
// (probe.HTTPServers on bus), the object is given its servers and
// server_ctxs maps (opts.MapReplacements, which must not be nil), and
// ShareHTTPServers returns the data word of context.Background() and
// whether contexts may be walked, with ok true. Otherwise the object's own
// copies stay empty, and shrink to one entry, as do the HTTP family's maps
// the object declares but never uses.
func ShareHTTPServers(bus *probe.Bus, spec *ebpf.CollectionSpec, opts *ebpf.CollectionOptions, want bool) (root uint64, walk, ok bool) {
	for _, m := range httpUnused {
		spec.Maps[m].MaxEntries = 1
	}
	hs, found := probe.Lookup[probe.HTTPServers](bus)
	if !want || !found {
		spec.Maps["servers"].MaxEntries = 1
		spec.Maps["server_ctxs"].MaxEntries = 1
		return 0, false, false
	}
	servers, ctxs := hs.ServerMaps()
	spec.Maps["servers"].MaxEntries = servers.MaxEntries()
	spec.Maps["server_ctxs"].MaxEntries = ctxs.MaxEntries()
	opts.MapReplacements["servers"] = servers
	opts.MapReplacements["server_ctxs"] = ctxs
	root, walk = hs.ContextRoot()
	return root, walk, true
}
