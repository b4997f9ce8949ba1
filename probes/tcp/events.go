package tcp

import (
	"net/netip"
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
}

// Stats are a connection's counters, from the kernel's own per-socket
// accounting (the numbers tcp_info and ss -ti show).
type Stats struct {
	// BytesSent is payload bytes the peer acknowledged (tcpi_bytes_acked,
	// without the SYN and FIN, which take a sequence number each).
	BytesSent uint64
	// BytesReceived is payload bytes received in order
	// (tcpi_bytes_received, without the FIN).
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

// ConnOpened reports an established connection.
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
type ConnStats struct {
	// Time the counters were read.
	Time time.Time
	Conn
	Stats
	// Duration is the time since the connection was established.
	Duration time.Duration
}

// ConnClosed reports a connection that ended, with its final counters.
type ConnClosed struct {
	// Time the connection was closed (its socket entered TCP_CLOSE).
	Time time.Time
	Conn
	Stats
	// Duration is the time from establishment to close.
	Duration time.Duration
}
