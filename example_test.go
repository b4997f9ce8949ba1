package flowmill_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/probes/tcp"
)

// Observe the TCP connections of this process and print each one as it
// closes, with its exact byte counts and RTT.
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	s, err := flowmill.Start(ctx, flowmill.WithProbes(tcp.New()))
	if errors.Is(err, flowmill.ErrPermission) {
		log.Fatal("run as root, or grant CAP_BPF and CAP_PERFMON: ", err)
	} else if err != nil {
		log.Fatal(err)
	}
	defer s.Close()

	closed, err := flowmill.Subscribe[tcp.ConnClosed](s)
	if err != nil {
		log.Fatal(err)
	}
	// The channel closes when the session ends (here: on Ctrl-C).
	for c := range closed.Events() {
		fmt.Printf("%s %s -> %s: sent %d, received %d, srtt %v\n",
			c.Role, c.Local, c.Remote, c.BytesSent, c.BytesReceived, c.SRTT)
	}
}

// Subscribe before the probes attach, to receive every event of the
// session from the first one: New checks the options, Session.Start
// attaches.
func ExampleSession_Start() {
	s, err := flowmill.New(flowmill.WithProbes(tcp.New()))
	if err != nil {
		log.Fatal(err) // errors.Is(err, flowmill.ErrInvalidOption): the message names the option
	}
	defer s.Close()
	opened, err := flowmill.Subscribe[tcp.ConnOpened](s)
	if err != nil {
		log.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		log.Fatal(err)
	}
	for c := range opened.Events() {
		fmt.Println(c.Role, c.Local, c.Remote)
	}
}
