//go:build linux

// Package sockdiag reads the kernel's tcp_info of TCP sockets through
// NETLINK_SOCK_DIAG: the interface ss uses, so the numbers are exactly the
// ones ss -ti shows. It reads the network namespace of the calling thread.
package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TCP states (include/net/tcp_states.h), as reported in Socket.State.
const (
	StateEstablished = 1
	StateFinWait1    = 4
	StateFinWait2    = 5
	StateTimeWait    = 6
	StateCloseWait   = 8
	StateLastAck     = 9
	StateListen      = 10
	StateClosing     = 11
)

// Socket is one TCP socket as the kernel reports it.
type Socket struct {
	Local, Remote netip.AddrPort // IPv4-mapped addresses are unmapped
	State         uint8
	// Cookie is the socket's cookie, the kernel's unique identifier of
	// it (SO_COOKIE, bpf_get_socket_cookie); asking for it makes the
	// kernel assign one.
	Cookie uint64
	// Inode is the inode number of the socket's file (socket:[N] in
	// /proc/PID/fd), 0 for sockets no file refers to.
	Inode uint32
	// Info is the socket's tcp_info; nil for sockets that have none
	// (TIME_WAIT, request and listening sockets, and those of
	// DumpListening).
	Info *unix.TCPInfo
	// InfoLen is how many bytes of tcp_info the kernel sent: fields past
	// it are zero because the kernel does not have them, not because
	// they are.
	InfoLen int
}

// UAPI layouts (include/uapi/linux/inet_diag.h).
type sockID struct {
	Sport, Dport [2]byte // big endian
	Src, Dst     [16]byte
	If           uint32
	Cookie       [2]uint32
}

type reqV2 struct {
	Family   uint8
	Protocol uint8
	Ext      uint8
	Pad      uint8
	States   uint32
	ID       sockID
}

type diagMsg struct {
	Family  uint8
	State   uint8
	Timer   uint8
	Retrans uint8
	ID      sockID
	Expires uint32
	RQueue  uint32
	WQueue  uint32
	UID     uint32
	Inode   uint32
}

const (
	inetDiagInfo = 2 // INET_DIAG_INFO attribute
	noCookie     = ^uint32(0)
	allStates    = 0xfff
)

// ErrNotFound: no socket with those addresses.
var ErrNotFound = errors.New("sockdiag: no such socket")

// Dump calls fn for every TCP socket (IPv4 and IPv6) in the namespace. The
// Socket, and its Info, are valid only during the call.
func Dump(fn func(*Socket)) error { return DumpIn("", fn) }

// DumpIn is Dump in the network namespace at netns (a path such as
// /proc/PID/ns/net); "" is the calling thread's. Entering another
// namespace needs CAP_SYS_ADMIN.
func DumpIn(netns string, fn func(*Socket)) error {
	return dump(netns, allStates, 1<<(inetDiagInfo-1), fn)
}

// DumpListening calls fn for every listening TCP socket (IPv4 and IPv6)
// in the network namespace at netns, as DumpIn does, without tcp_info.
func DumpListening(netns string, fn func(*Socket)) error {
	return dump(netns, 1<<StateListen, 0, fn)
}

func dump(netns string, states uint32, ext uint8, fn func(*Socket)) error {
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		fd, err := socketIn(netns)
		if err != nil {
			return err
		}
		req := reqV2{Family: fam, Protocol: unix.IPPROTO_TCP, Ext: ext, States: states}
		err = query(fd, &req, unix.NLM_F_DUMP, fn)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

func newSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return -1, fmt.Errorf("sockdiag: %w", err)
	}
	return fd, nil
}

// socketIn opens a sock_diag socket in the network namespace at netns. A
// socket answers for the namespace it was created in, so only its creation
// happens there: on a thread of its own, locked and moved into the
// namespace and back. A thread that cannot be moved back is never
// unlocked, so the runtime discards it rather than reuse it.
func socketIn(netns string) (int, error) {
	if netns == "" {
		return newSocket()
	}
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, restored, err := createIn(netns)
		if restored {
			runtime.UnlockOSThread()
		}
		done <- result{fd, err}
	}()
	r := <-done
	return r.fd, r.err
}

func createIn(netns string) (fd int, restored bool, err error) {
	self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, fmt.Errorf("sockdiag: %w", err)
	}
	defer unix.Close(self)
	target, err := unix.Open(netns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, fmt.Errorf("sockdiag: %w", err)
	}
	defer unix.Close(target)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		return -1, true, fmt.Errorf("sockdiag: entering %s: %w", netns, err)
	}
	fd, err = newSocket()
	if rerr := unix.Setns(self, unix.CLONE_NEWNET); rerr != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return -1, false, fmt.Errorf("sockdiag: leaving %s: %w", netns, rerr)
	}
	return fd, true, err
}

// Get returns the TCP socket with these local and remote addresses, or
// ErrNotFound. Sockets of dual-stack IPv6 listeners with IPv4 peers are
// found with IPv4 addresses too.
func Get(local, remote netip.AddrPort) (Socket, error) {
	var out Socket
	found := false
	keep := func(s *Socket) {
		if found || s.Info == nil {
			return
		}
		found = true
		info := *s.Info
		out = *s
		out.Info = &info
	}
	req := reqV2{Protocol: unix.IPPROTO_TCP, Ext: 1 << (inetDiagInfo - 1), States: allStates}
	binary.BigEndian.PutUint16(req.ID.Sport[:], local.Port())
	binary.BigEndian.PutUint16(req.ID.Dport[:], remote.Port())
	req.ID.Cookie = [2]uint32{noCookie, noCookie}
	l, r := local.Addr(), remote.Addr()
	if l.Is4() && r.Is4() {
		req.Family = unix.AF_INET
		a, b := l.As4(), r.As4()
		copy(req.ID.Src[:], a[:])
		copy(req.ID.Dst[:], b[:])
		err := queryOnce(&req, keep)
		if found || (err != nil && !errors.Is(err, unix.ENOENT)) {
			return out, err
		}
		// An IPv6 socket talking to an IPv4 peer.
		l, r = netip.AddrFrom16(l.As16()), netip.AddrFrom16(r.As16())
	}
	req.Family = unix.AF_INET6
	req.ID.Src, req.ID.Dst = l.As16(), r.As16()
	if err := queryOnce(&req, keep); err != nil && !errors.Is(err, unix.ENOENT) {
		return out, err
	}
	if !found {
		return out, ErrNotFound
	}
	return out, nil
}

// queryOnce sends one request for one socket on a socket of its own.
func queryOnce(req *reqV2, fn func(*Socket)) error {
	fd, err := newSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return query(fd, req, 0, fn)
}

// query sends one request on fd and calls fn for each socket in the answer.
func query(fd int, req *reqV2, flags uint16, fn func(*Socket)) error {
	const hdr = unix.SizeofNlMsghdr
	msg := make([]byte, hdr+int(unsafe.Sizeof(*req)))
	*(*unix.NlMsghdr)(unsafe.Pointer(&msg[0])) = unix.NlMsghdr{
		Len:   uint32(len(msg)),
		Type:  unix.SOCK_DIAG_BY_FAMILY,
		Flags: unix.NLM_F_REQUEST | flags,
		Seq:   1,
	}
	copy(msg[hdr:], unsafe.Slice((*byte)(unsafe.Pointer(req)), unsafe.Sizeof(*req)))
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sockdiag: %w", err)
	}

	buf := make([]byte, 64<<10)
	var s Socket
	var info unix.TCPInfo
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("sockdiag: %w", err)
		}
		for b := buf[:n]; len(b) >= hdr; {
			h := (*unix.NlMsghdr)(unsafe.Pointer(&b[0]))
			if int(h.Len) < hdr || int(h.Len) > len(b) {
				return fmt.Errorf("sockdiag: malformed netlink message")
			}
			data := b[hdr:h.Len]
			b = b[min((int(h.Len)+3)&^3, len(b)):]
			switch h.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(data) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(data)); errno != 0 {
						return fmt.Errorf("sockdiag: %w", unix.Errno(errno))
					}
				}
				return nil
			case unix.SOCK_DIAG_BY_FAMILY:
				if parse(data, &s, &info) {
					fn(&s)
				}
			}
		}
		if flags&unix.NLM_F_DUMP == 0 {
			return nil // a single answer
		}
	}
}

// parse decodes an inet_diag_msg and its INET_DIAG_INFO attribute.
func parse(data []byte, s *Socket, info *unix.TCPInfo) bool {
	const msgSize = int(unsafe.Sizeof(diagMsg{}))
	if len(data) < msgSize {
		return false
	}
	var m diagMsg
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&m)), msgSize), data)
	s.State = m.State
	s.Cookie = uint64(m.ID.Cookie[0]) | uint64(m.ID.Cookie[1])<<32
	s.Inode = m.Inode
	s.Local = addrPort(m.Family, &m.ID.Src, m.ID.Sport)
	s.Remote = addrPort(m.Family, &m.ID.Dst, m.ID.Dport)
	s.Info = nil
	s.InfoLen = 0
	for a := data[msgSize:]; len(a) >= unix.SizeofRtAttr; {
		l := int(binary.NativeEndian.Uint16(a[0:2]))
		typ := binary.NativeEndian.Uint16(a[2:4])
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		if typ == inetDiagInfo {
			*info = unix.TCPInfo{}
			copy(unsafe.Slice((*byte)(unsafe.Pointer(info)), unsafe.Sizeof(*info)), a[unix.SizeofRtAttr:l])
			s.Info = info
			s.InfoLen = min(l-unix.SizeofRtAttr, int(unsafe.Sizeof(*info)))
		}
		a = a[min((l+3)&^3, len(a)):]
	}
	return true
}

func addrPort(family uint8, a *[16]byte, port [2]byte) netip.AddrPort {
	var ip netip.Addr
	if family == unix.AF_INET {
		ip = netip.AddrFrom4([4]byte(a[:4]))
	} else {
		ip = netip.AddrFrom16(*a).Unmap()
	}
	return netip.AddrPortFrom(ip, binary.BigEndian.Uint16(port[:]))
}
