//go:build linux

package sockdiag

import (
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Get and Dump agree with getsockopt(TCP_INFO) on the socket itself.
func TestGetMatchesGetsockopt(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{
		{"tcp4", "127.0.0.1:0"},
		{"tcp6", "[::1]:0"},
	} {
		ln, err := net.Listen(tc.network, tc.addr)
		if err != nil {
			t.Skipf("%s: %v", tc.network, err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err == nil {
				io.Copy(io.Discard, c)
				c.Close()
			}
		}()
		c, err := net.Dial(tc.network, ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(make([]byte, 12345))
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
		remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())

		s, err := Get(local, remote)
		if err != nil {
			t.Fatalf("%s: Get(%v, %v): %v", tc.network, local, remote, err)
		}
		want := getsockopt(t, c.(*net.TCPConn))
		if s.State != StateEstablished || s.Info.Segs_out != want.Segs_out || s.Info.Bytes_acked != want.Bytes_acked {
			t.Errorf("%s: Get says state %d segs_out %d acked %d; getsockopt says segs_out %d acked %d",
				tc.network, s.State, s.Info.Segs_out, s.Info.Bytes_acked, want.Segs_out, want.Bytes_acked)
		}
		found := false
		if err := Dump(func(d *Socket) {
			if d.Local == local && d.Remote == remote {
				found = d.Info != nil && d.Info.Segs_out == want.Segs_out
			}
		}); err != nil {
			t.Fatal(err)
		}
		if !found {
			t.Errorf("%s: Dump did not list %v -> %v with the same counters", tc.network, local, remote)
		}
		if _, err := Get(local, netip.AddrPortFrom(remote.Addr(), 1)); err != ErrNotFound {
			t.Errorf("Get of a socket that does not exist: %v", err)
		}
	}
}

func getsockopt(t *testing.T, c *net.TCPConn) unix.TCPInfo {
	raw, _ := c.SyscallConn()
	var info unix.TCPInfo
	raw.Control(func(fd uintptr) {
		size := uint32(unsafe.Sizeof(info))
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			t.Fatal(errno)
		}
	})
	return info
}

// A dual-stack listener's accepted socket is IPv6 with IPv4-mapped
// addresses; it is found with the IPv4 addresses its peer sees.
func TestGetDualStack(t *testing.T) {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().(*net.TCPAddr).IP.To4() != nil {
		t.Skip("no dual-stack sockets here")
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	c, err := net.Dial("tcp4", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc := <-accepted
	defer sc.Close()
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
	remote := c.LocalAddr().(*net.TCPAddr).AddrPort()
	s, err := Get(local, remote)
	if err != nil {
		t.Fatalf("Get(%v, %v): %v", local, remote, err)
	}
	if s.Local != local || s.Remote != remote || s.Info == nil {
		t.Errorf("got %+v", s)
	}
}

// DumpListening lists listening sockets with their cookie (as SO_COOKIE
// says) and the inode of their file, also for an MPTCP listener (Go's
// default where the kernel has MPTCP), whose listening TCP socket is not
// the one its file descriptor refers to but has its inode.
func TestDumpListening(t *testing.T) {
	for _, mptcp := range []bool{false, true} {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(mptcp)
		ln, err := lc.Listen(t.Context(), "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		addr := ln.Addr().(*net.TCPAddr).AddrPort()
		raw, _ := ln.(*net.TCPListener).SyscallConn()
		var cookie uint64
		var st unix.Stat_t
		raw.Control(func(fd uintptr) {
			if err := unix.Fstat(int(fd), &st); err != nil {
				t.Fatal(err)
			}
			if !mptcp {
				if cookie, err = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
					t.Fatal(err)
				}
			}
		})
		var got []Socket
		if err := DumpListening("", func(s *Socket) {
			if s.Local == addr {
				got = append(got, *s)
			}
		}); err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].State != StateListen || got[0].Inode != uint32(st.Ino) || got[0].Cookie == 0 || got[0].Info != nil ||
			(!mptcp && got[0].Cookie != cookie) {
			t.Errorf("MPTCP %v: listening on %v (inode %d, cookie %d): DumpListening listed %+v", mptcp, addr, st.Ino, cookie, got)
		}
	}
}
