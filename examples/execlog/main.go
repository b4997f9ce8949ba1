// Command execlog prints one line per exec and exit on the host, or in one
// process tree with -pid (then it stops when that process exits):
//
//	sudo go run ./examples/execlog [-pid N] [-json] [-seccomp FILE]
//
// -json prints one JSON object per line with the fields event ("exec",
// "exit"), time, pid, ppid, uid, comm, filename, argv, argv_truncated,
// exit_code and signal; fields that do not apply to the event are null.
// -seccomp FILE also counts system calls and, on exit, writes the seccomp
// profile that allows exactly those the observed processes made.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/probes/process"
	"github.com/flowmill/flowmill/probes/syscalls"
)

func main() {
	pid := flag.Int("pid", 0, "observe only this process and its descendants, until it exits (default: the whole host)")
	asJSON := flag.Bool("json", false, "print one JSON object per line")
	seccomp := flag.String("seccomp", "", "on exit, write the seccomp profile of the system calls observed to this `file`")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := []flowmill.Option{flowmill.WithHostScope(), flowmill.WithProbes(process.New())}
	if *pid != 0 {
		opts[0] = flowmill.WithProcessScope(*pid)
	}
	sc := syscalls.New()
	if *seccomp != "" {
		opts = append(opts, flowmill.WithProbes(sc))
	}
	s, err := flowmill.Start(ctx, opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	execs, _ := flowmill.Subscribe[process.Exec](s)
	exits, _ := flowmill.Subscribe[process.Exit](s)
	fmt.Fprintln(os.Stderr, "execlog: observing; Ctrl-C to stop")

	out := json.NewEncoder(os.Stdout)
	print := func(kind string, t time.Time, p process.Process, exec *process.Exec, exit *process.Exit) {
		if !*asJSON {
			if exec != nil {
				fmt.Printf("%s exec %d/%s ppid=%d uid=%d %s %q\n", t.Format(time.RFC3339Nano), p.PID, p.Comm, p.PPID, p.UID, exec.Filename, exec.Argv)
			} else {
				how := fmt.Sprintf("code=%d", exit.ExitCode)
				if exit.Signal != 0 {
					how = "signal=" + exit.Signal.String()
				}
				fmt.Printf("%s exit %d/%s ppid=%d uid=%d %s lifetime=%v\n", t.Format(time.RFC3339Nano), p.PID, p.Comm, p.PPID, p.UID, how, exit.Lifetime)
			}
			return
		}
		o := map[string]any{"event": kind, "time": t.Format(time.RFC3339Nano), "pid": p.PID, "ppid": p.PPID, "uid": p.UID, "comm": p.Comm,
			"filename": nil, "argv": nil, "argv_truncated": nil, "exit_code": nil, "signal": nil}
		if exec != nil {
			o["filename"], o["argv"], o["argv_truncated"] = exec.Filename, exec.Argv, exec.ArgvTruncated
		} else {
			o["exit_code"], o["signal"] = exit.ExitCode, int(exit.Signal)
		}
		out.Encode(o)
	}
loop:
	for {
		select {
		case e, ok := <-execs.Events():
			if !ok { // the session ended
				break loop
			}
			print("exec", e.Time, e.Process, &e, nil)
		case e, ok := <-exits.Events():
			if !ok {
				break loop
			}
			print("exit", e.Time, e.Process, nil, &e)
			if e.PID == uint32(*pid) {
				break loop
			}
		case <-ctx.Done():
			break loop
		}
	}
	if st, err := s.Stats(); err == nil && st.EventsLost+st.Dropped > 0 {
		fmt.Fprintf(os.Stderr, "lost events: %d in the kernel, %d dropped\n", st.EventsLost, st.Dropped)
	}
	s.Close() // the syscall probe makes its last read
	if *seccomp != "" {
		totals, err := sc.Totals()
		if err != nil {
			log.Fatal(err)
		}
		prof, unnamed := syscalls.SeccompProfile(totals)
		js, _ := json.MarshalIndent(prof, "", "  ")
		if err := os.WriteFile(*seccomp, append(js, '\n'), 0o644); err != nil {
			log.Fatal(err)
		}
		if len(unnamed) > 0 {
			fmt.Fprintf(os.Stderr, "execlog: system calls without a name, left out of the profile: %v\n", unnamed)
		}
		fmt.Fprintf(os.Stderr, "execlog: %d system calls allowed in %s\n", len(prof.Syscalls[0].Names), *seccomp)
	}
}
