// Command listener is a test peer of probes/tcp, run as a process of its
// own: it listens on -addr (sharing the port with SO_REUSEPORT if
// -reuseport), prints "listening ADDR", then "accepted REMOTE" for each
// connection it accepts, and reads each connection until EOF. The line
// "close" on its standard input makes it close the listening socket and
// print "closed"; the end of its standard input makes it exit.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	reuseport := flag.Bool("reuseport", false, "set SO_REUSEPORT, to share the port with other listeners")
	flag.Parse()
	lc := net.ListenConfig{}
	if *reuseport {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp4", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening", ln.Addr())
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			fmt.Println("accepted", c.RemoteAddr())
			go func() {
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "close" {
			ln.Close()
			fmt.Println("closed")
		}
	}
}
