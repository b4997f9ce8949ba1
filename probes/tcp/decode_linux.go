package tcp

import (
	"errors"
	"net/netip"
	"time"
	"unsafe"

	"github.com/flowmill/flowmill/internal/intern"
)

// Values of tcp_event.kind and .role (bpf/tcp.c).
const (
	kindOpen  = 1
	kindClose = 2

	afInet  = 2
	afInet6 = 10

	// enum tcp_missing: the same bits as Missing.
	missingAddresses = uint8(MissingAddresses)
	missingCounters  = uint8(MissingCounters)
)

var (
	errShort  = errors.New("tcp: record shorter than struct tcp_event")
	errKind   = errors.New("tcp: unknown event kind")
	errFamily = errors.New("tcp: unknown address family")
)

const eventSize = int(unsafe.Sizeof(tcpBPFTcpEvent{}))

// decoder turns ring-buffer records into events. It is used from one
// goroutine and does not allocate once the names it meets are interned.
type decoder struct {
	boot  func(uint64) time.Time
	comms intern.Comms
	ev    tcpBPFTcpEvent // scratch for unaligned records
}

// record returns raw as an event: in place when raw is aligned (ring-buffer
// records are), else copied into the decoder's scratch event.
func (d *decoder) record(raw []byte) (*tcpBPFTcpEvent, error) {
	if len(raw) < eventSize {
		return nil, errShort
	}
	var e *tcpBPFTcpEvent
	if p := unsafe.Pointer(unsafe.SliceData(raw)); uintptr(p)%unsafe.Alignof(d.ev) == 0 {
		e = (*tcpBPFTcpEvent)(p)
	} else {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&d.ev)), eventSize), raw)
		e = &d.ev
	}
	if e.Kind != kindOpen && e.Kind != kindClose {
		return nil, errKind
	}
	if e.Tuple.Family != afInet && e.Tuple.Family != afInet6 && e.Missing&missingAddresses == 0 {
		return nil, errFamily
	}
	return e, nil
}

func (d *decoder) conn(e *tcpBPFTcpEvent) Conn {
	return Conn{
		ID:       e.FlowId,
		PID:      e.Task.Pid,
		TID:      e.Task.Tid,
		Comm:     d.comms.String((*[16]byte)(unsafe.Pointer(&e.Task.Comm))),
		CgroupID: e.Task.CgroupId,
		Local:    addrPort(e.Tuple.Family, &e.Tuple.Laddr, e.Tuple.Lport),
		Remote:   addrPort(e.Tuple.Family, &e.Tuple.Raddr, e.Tuple.Rport),
		Role:     Role(e.Role),
		Missing:  Missing(e.Missing),
	}
}

// addrPort builds an address; IPv4-mapped IPv6 addresses (IPv4 peers of a
// dual-stack socket) are reported as IPv4. An address of no family (the
// kernel could not read it) is the zero AddrPort.
func addrPort(family uint16, a *[16]uint8, port uint16) netip.AddrPort {
	var ip netip.Addr
	switch family {
	case afInet:
		ip = netip.AddrFrom4([4]byte(a[:4]))
	case afInet6:
		ip = netip.AddrFrom16(*a).Unmap()
	default:
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ip, port)
}

func counters(c *tcpBPFTcpCounts, rstSent, rstRecv uint32) Counters {
	return Counters{
		BytesSent:      c.BytesSent,
		BytesReceived:  c.BytesReceived,
		SegmentsOut:    c.SegsOut,
		SegmentsIn:     c.SegsIn,
		Retransmits:    c.Retrans,
		ResetsSent:     rstSent,
		ResetsReceived: rstRecv,
		SRTT:           usec(c.SrttUs),
		RTTVar:         usec(c.RttvarUs),
		MinRTT:         usec(c.MinRttUs),
	}
}

// usec converts the kernel's microseconds; ~0 means "no sample".
func usec(v uint32) time.Duration {
	if v == ^uint32(0) {
		return 0
	}
	return time.Duration(v) * time.Microsecond
}
