//go:build linux

package flowmill

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testutil"
	"github.com/flowmill/flowmill/probes/tcp"
)

// A family that answers another's question first catches up with the
// records waiting in the rings (probe.Env.Sync): with reads on a timer of
// an hour, the TCP family still knows the final counters of a connection
// that closed a moment ago.
func TestSyncCatchesUp(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := Start(context.Background(), WithProbes(tcp.New(tcp.WithStatsInterval(0))), WithMaxLatency(time.Hour))
	testutil.CheckStart(t, err)
	defer s.Close()
	conns, ok := probe.Lookup[probe.TCPConns](s.bus)
	if !ok {
		t.Fatal("no probe.TCPConns in a session with the TCP probe")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("bye"))
			c.Close()
		}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	c.Read(buf)
	c.Close()
	time.Sleep(100 * time.Millisecond) // both sockets are gone: only the close records know them
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	info, ok := conns.TCPConn(netip.AddrPort{}, client)
	if !ok || info.SegmentsIn == 0 || info.SRTT == 0 {
		t.Fatalf("server side of a closed connection, by its peer %v: %+v, %v", client, info, ok)
	}
}
