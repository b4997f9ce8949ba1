package tcp

import (
	"net/netip"
	"strings"
	"time"
)

// Role is the side of a connection a process is on.
type Role uint8

const (
	// RoleClient opened the connection (active open, connect()).
	RoleClient Role = 1
	// RoleServer accepted it (passive open, accept()).
	RoleServer Role = 2
)

// String returns "client", "server" or "unknown".
func (r Role) String() string {
	switch r {
	case RoleClient:
		return "client"
	case RoleServer:
		return "server"
	}
	return "unknown"
}

// Conn identifies a connection and the process that owns its socket.
//
// A client connection belongs to the thread that called connect(); a server
// connection to the process that owns the listening socket it was accepted
// from (its handshake completes in softirq context, not in the owner's).
type Conn struct {
	// ID is unique within a session; the ConnOpened, ConnStats and
	// ConnClosed of one connection share it.
	ID       uint64
	PID      uint32 // thread group ID
	TID      uint32 // thread that called connect() or listen()
	Comm     string // the task's name, at most 15 bytes
	CgroupID uint64 // cgroup v2 ID (the inode number of its directory)
	Local    netip.AddrPort
	Remote   netip.AddrPort
	Role     Role
	// Missing says what the kernel could not read of the socket; zero
	// normally. Events with something missing are counted in the
	// session's Stats.Incomplete.
	Missing Missing
}

// Missing lists the parts of a connection's events that are unknown
// because the kernel could not read them from its socket (a failed read of
// kernel memory, which a live socket should not cause).
type Missing uint8

const (
	// MissingAddresses: Local and Remote are unknown (the zero
	// netip.AddrPort). Such a connection gets no ConnStats.
	MissingAddresses Missing = 1 << iota
	// MissingCounters: the socket's counters could not be read when the
	// connection was established or when it closed; every field of
	// Counters but ResetsSent and ResetsReceived is zero.
	MissingCounters
)

// String returns the missing parts separated by "|" ("addresses|counters"),
// or "none".
func (m Missing) String() string {
	if m == 0 {
		return "none"
	}
	var parts []string
	for _, p := range []struct {
		bit  Missing
		name string
	}{{MissingAddresses, "addresses"}, {MissingCounters, "counters"}} {
		if m&p.bit != 0 {
			parts = append(parts, p.name)
			m &^= p.bit
		}
	}
	if m != 0 {
		parts = append(parts, "unknown")
	}
	return strings.Join(parts, "|")
}

// Counters are a connection's counters, from the kernel's own per-socket
// accounting (the numbers tcp_info and ss -ti show).
type Counters struct {
	// BytesSent is payload bytes the peer acknowledged (tcpi_bytes_acked,
	// without the SYN and FIN, which take a sequence number each).
	BytesSent uint64
	// BytesReceived is payload bytes received in order
	// (tcpi_bytes_received, without the FIN). In a ConnStats it can, when
	// the peer's FIN arrives while the kernel assembles the reading, count
	// that FIN; a ConnClosed's never does.
	BytesReceived uint64
	// SegmentsOut and SegmentsIn count all segments, including pure ACKs
	// and retransmissions (tcpi_segs_out, tcpi_segs_in).
	SegmentsOut uint32
	SegmentsIn  uint32
	// Retransmits is segments retransmitted (tcpi_total_retrans).
	Retransmits uint32
	// ResetsSent and ResetsReceived count RST segments.
	ResetsSent     uint32
	ResetsReceived uint32
	// SRTT, RTTVar and MinRTT are the kernel's smoothed round-trip time,
	// its mean deviation and the minimum observed, at microsecond
	// resolution (tcpi_rtt, tcpi_rttvar, tcpi_min_rtt). Zero when no
	// sample was taken.
	SRTT   time.Duration
	RTTVar time.Duration
	MinRTT time.Duration
}

// ConnOpened reports an established connection. It is published on the
// goroutine that reads the kernel's ring buffer, as ConnClosed is.
type ConnOpened struct {
	// Time the connection was established.
	Time time.Time
	Conn
}

// ConnStats reports the counters of a connection that is still open. It is
// sent for every open connection once per stats interval, read from the
// kernel's tcp_info through sock_diag in the connection's network
// namespace. Resets are known only at close: ResetsSent and ResetsReceived
// are zero here.
//
// ConnStats are published from the probe's poller goroutine, not from the
// goroutine that reads the kernel's ring buffer: a function subscribed with
// flowmill.SubscribeFunc runs there. No ConnStats of a connection is
// published after its ConnClosed, so while such a function runs, the ring
// reader waits when it comes to a close: keep it quick. A round skips the
// network namespaces it cannot read (see the package documentation),
// counted in the session's Stats.PollsFailed.
type ConnStats struct {
	// Time the counters were read.
	Time time.Time
	Conn
	Counters
	// Duration is the time since the connection was established.
	Duration time.Duration
}

// ConnClosed reports a connection that ended, with its final counters.
type ConnClosed struct {
	// Time the connection was closed (its socket entered TCP_CLOSE).
	Time time.Time
	Conn
	Counters
	// Duration is the time from establishment to close.
	Duration time.Duration
}
