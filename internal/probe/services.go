package probe

import (
	"net/netip"
	"reflect"
	"time"

	"github.com/cilium/ebpf"
)

// Families cooperate through services on the bus, never by importing each
// other: a family provides a service (an interface declared in this
// package) when it attaches, and another family looks it up when it needs
// it. A session without the providing family simply has no such service.

// Provide offers v as the session's service of type T, replacing any
// earlier one.
func Provide[T any](b *Bus, v T) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.services == nil {
		b.services = make(map[reflect.Type]any)
	}
	b.services[reflect.TypeFor[T]()] = v
}

// Lookup returns the session's service of type T, if a family provides it.
func Lookup[T any](b *Bus) (T, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	v, ok := b.services[reflect.TypeFor[T]()].(T)
	return v, ok
}

// TCPConnInfo is what the kernel knows of one TCP connection right now.
type TCPConnInfo struct {
	// SRTT, RTTVar and MinRTT are the smoothed round-trip time, its mean
	// deviation and the minimum observed (microsecond resolution).
	SRTT, RTTVar, MinRTT time.Duration
	// Retransmits is segments retransmitted since the connection began.
	Retransmits uint32
	// SegmentsOut and SegmentsIn count segments since it began.
	SegmentsOut, SegmentsIn uint32
}

// TCPConns is the service of a family that tracks TCP connections
// (probes/tcp): the current counters of a connection, by its addresses as
// seen from this host.
type TCPConns interface {
	// TCPConn returns the counters of one connection; a zero local matches
	// any connection to remote. ok is false when there is no such
	// connection (it closed, or it is in another network namespace). It
	// may read the kernel's state, wait for the session's records
	// (Env.Sync) and for a rate limit: a caller with many connections to
	// look up uses TCPConnBatch.
	TCPConn(local, remote netip.AddrPort) (info TCPConnInfo, ok bool)
	// TCPConnBatch answers every query of qs in place, as TCPConn would,
	// with one read of the kernel's state for all of them, at most one
	// wait for the session's records and no sleep. The error says the
	// kernel's state could not be read; queries answered from what the
	// family already knew are set all the same.
	TCPConnBatch(qs []TCPConnQuery) error
}

// TCPConnQuery is one question of TCPConns.TCPConnBatch, and its answer.
type TCPConnQuery struct {
	// Local and Remote are the connection's addresses as seen from this
	// host; a zero Local matches any connection to Remote. A query with
	// no valid Remote finds nothing.
	Local, Remote netip.AddrPort
	// Info is the connection's counters when OK.
	Info TCPConnInfo
	// OK reports whether the connection was found.
	OK bool
}

// HTTPServers is the service of a family that traces the requests the
// program serves (probes/http): its kernel maps of the requests being
// served (bpf/include/http_server.h: servers by goroutine, server_ctxs by
// request context), which another family's eBPF object shares (cilium/ebpf
// MapReplacements) to make its spans children of the served request. It is
// provided once the family attached: a family that uses it attaches after
// it (flowmill.WithProbes order).
type HTTPServers interface {
	// ServerMaps returns the maps; they stay valid while the session runs.
	ServerMaps() (servers, ctxs *ebpf.Map)
	// ContextRoot returns the data word of context.Background() in this
	// program (where a walk of context parents stops; 0: none shared),
	// and whether contexts may be walked at all (every std Context keeps
	// its parent first).
	ContextRoot() (root uint64, walk bool)
}
