// Command flowlog prints one line per TCP connection event of the host (or
// of one process with -pid): open, periodic stats, and close.
//
//	sudo go run ./examples/flowlog [-pid N] [-json] [-interval 5s]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/probes/tcp"
)

func main() {
	pid := flag.Int("pid", 0, "observe only this process (default: the whole host)")
	asJSON := flag.Bool("json", false, "print one JSON object per line")
	interval := flag.Duration("interval", 5*time.Second, "stats interval for open connections")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	scope := flowmill.WithHostScope()
	if *pid != 0 {
		scope = flowmill.WithProcessScope(*pid)
	}
	// Not ctx: the session must outlive Ctrl-C long enough to report losses.
	s, err := flowmill.Start(context.Background(), scope, flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(*interval))))
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	opened, _ := flowmill.Subscribe[tcp.ConnOpened](s)
	stats, _ := flowmill.Subscribe[tcp.ConnStats](s)
	closed, _ := flowmill.Subscribe[tcp.ConnClosed](s)

	out := json.NewEncoder(os.Stdout)
	print := func(kind string, t time.Time, c tcp.Conn, st tcp.Counters, d time.Duration) {
		if !*asJSON {
			fmt.Printf("%s %-5s %d/%s %s %s -> %s sent=%d recv=%d segs=%d/%d retrans=%d rtt=%v dur=%v\n",
				t.Format(time.RFC3339Nano), kind, c.PID, c.Comm, c.Role, c.Local, c.Remote,
				st.BytesSent, st.BytesReceived, st.SegmentsOut, st.SegmentsIn, st.Retransmits, st.SRTT, d)
			return
		}
		out.Encode(map[string]any{
			"event": kind, "time": t.Format(time.RFC3339Nano), "pid": c.PID, "comm": c.Comm,
			"local": c.Local.String(), "remote": c.Remote.String(), "role": c.Role.String(),
			"bytes_sent": st.BytesSent, "bytes_received": st.BytesReceived,
			"segs_out": st.SegmentsOut, "segs_in": st.SegmentsIn, "retransmits": st.Retransmits,
			"srtt_us": st.SRTT.Microseconds(), "duration_us": d.Microseconds(),
		})
	}
	for {
		select {
		case e := <-opened.Events():
			print("open", e.Time, e.Conn, tcp.Counters{}, 0)
		case e := <-stats.Events():
			print("stats", e.Time, e.Conn, e.Counters, e.Duration)
		case e := <-closed.Events():
			print("close", e.Time, e.Conn, e.Counters, e.Duration)
		case <-ctx.Done():
			if st, err := s.Stats(); err == nil && st.EventsLost+st.Evicted+st.Dropped > 0 {
				fmt.Fprintf(os.Stderr, "lost events: %d in the kernel, %d flows evicted, %d dropped\n", st.EventsLost, st.Evicted, st.Dropped)
			}
			return
		}
	}
}
