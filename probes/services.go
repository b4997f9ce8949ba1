package probes

import (
	"net/netip"
	"reflect"
	"time"
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
// seen from this host. ok is false when there is no such connection (it
// closed, or it is in another network namespace).
type TCPConns interface {
	TCPConn(local, remote netip.AddrPort) (info TCPConnInfo, ok bool)
}
