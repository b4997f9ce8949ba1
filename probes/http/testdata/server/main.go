// Command server is the program the HTTP probe's tests build and run: a
// net/http service that starts flowmill with the HTTP probe on itself and
// writes every span it receives as a JSON line to stdout. Its first line is
// {"listen": "host:port"} once it serves, or {"error": ...}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/emptyuprobe"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

type line struct {
	Listen string                `json:"listen,omitempty"`
	Error  string                `json:"error,omitempty"`
	Status *fmhttp.Status        `json:"status,omitempty"`
	Server *fmhttp.ServerRequest `json:"server,omitempty"`
	Client *fmhttp.ClientRequest `json:"client,omitempty"`
}

// timeout scales d by $FLOWMILL_TEST_TIMEOUT_SCALE, as the tests' own
// deadlines are (testutil.Timeout): the kernel matrix runs this program
// under emulation, many times slower.
func timeout(d time.Duration) time.Duration {
	if s, err := strconv.ParseFloat(os.Getenv("FLOWMILL_TEST_TIMEOUT_SCALE"), 64); err == nil && s > 1 {
		return time.Duration(float64(d) * s)
	}
	return d
}

func main() {
	mode := flag.String("mode", "probe", "probe: flowmill with the HTTP probe; empty: empty uprobes where the probe attaches (the benchmark's baseline); none: no uprobes")
	quiet := flag.Bool("quiet", false, "consume spans without writing them (benchmarks)")
	propagate := flag.Bool("propagate", true, "probe mode: propagate trace context (off: http.WithoutPropagation)")
	pre := flag.String("pre", "", "a URL requested before flowmill starts, on a connection kept for /call?client=pre")
	flag.Parse()
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(l line) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(l)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		emit(line{Error: err.Error()})
		os.Exit(1)
	}
	base := "http://" + ln.Addr().String()
	client := &http.Client{Timeout: timeout(10 * time.Second)}
	get := func(ctx context.Context, url string) (int, error) {
		req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
		if err != nil {
			return 0, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "user %s\n", r.PathValue("id"))
	})
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "failed", http.StatusInternalServerError)
	})
	mux.HandleFunc("GET /sleep/{ms}", func(w http.ResponseWriter, r *http.Request) {
		var ms int
		fmt.Sscan(r.PathValue("ms"), &ms)
		time.Sleep(time.Duration(ms) * time.Millisecond)
		w.WriteHeader(http.StatusAccepted)
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) })
	// The outgoing request is made on the handler's goroutine with a
	// background context: the parent is found by goroutine.
	mux.HandleFunc("GET /proxy", func(w http.ResponseWriter, r *http.Request) {
		code, err := get(context.Background(), base+"/hello")
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		w.WriteHeader(code)
	})
	// The outgoing request is made on another goroutine with a context
	// derived from the request's: the parent is found by context.
	mux.HandleFunc("GET /fanout", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		done := make(chan int)
		go func() {
			code, _ := get(ctx, base+"/hello")
			done <- code
		}()
		w.WriteHeader(<-done)
	})
	mux.HandleFunc("GET /refused", func(w http.ResponseWriter, r *http.Request) {
		_, err := get(r.Context(), "http://127.0.0.1:1/nothing")
		if err == nil {
			w.WriteHeader(http.StatusOK)
			return
		}
		w.WriteHeader(http.StatusBadGateway)
	})
	mux.HandleFunc("GET /empty", func(w http.ResponseWriter, r *http.Request) {})
	// A connection opened before flowmill starts (propagation does not
	// track it).
	preClient := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}, Timeout: timeout(10 * time.Second)}
	if *pre != "" {
		resp, err := preClient.Get(*pre)
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(1)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// /call makes outgoing requests as asked (see call.go).
	mux.HandleFunc("GET /call", callHandler(preClient))

	var counted []*ebpf.Program
	mux.HandleFunc("GET /__stats", func(w http.ResponseWriter, r *http.Request) {
		var hits, ns uint64
		for _, p := range counted {
			if st, err := p.Stats(); err == nil {
				hits += st.RunCount
				ns += uint64(st.Runtime)
			}
		}
		fmt.Fprintf(w, "%d %d\n", hits, ns)
	})
	// Every program's run count and time, by name (see progStats).
	mux.HandleFunc("GET /__progstats", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(progStats())
	})
	switch *mode {
	case "empty":
		stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		defer stats.Close()
		prog, closeAll, err := emptyuprobe.ServeHTTP()
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		defer closeAll()
		counted = append(counted, prog)
	case "none":
	case "probe":
		stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		defer stats.Close()
		var opts []fmhttp.Option
		if !*propagate {
			opts = append(opts, fmhttp.WithoutPropagation())
		}
		p := fmhttp.New(opts...)
		sess, err := flowmill.Start(ctx, flowmill.WithProbes(p), flowmill.WithMaxLatency(10*time.Millisecond))
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		defer sess.Close()
		counted = append(counted, probePrograms()...)
		st := p.Status()
		emit(line{Status: &st})
		srv, err := flowmill.Subscribe[fmhttp.ServerRequest](sess, flowmill.WithBuffer(1<<16))
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		cli, err := flowmill.Subscribe[fmhttp.ClientRequest](sess, flowmill.WithBuffer(1<<16))
		if err != nil {
			emit(line{Error: err.Error()})
			os.Exit(2)
		}
		// What the session counted, for a test that misses spans.
		mux.HandleFunc("GET /__losses", func(w http.ResponseWriter, r *http.Request) {
			st, err := sess.Stats()
			json.NewEncoder(w).Encode(map[string]any{"session": st, "error": fmt.Sprint(err),
				"server_dropped": srv.Dropped(), "client_dropped": cli.Dropped(),
				"propagation": p.PropagationStats()})
		})
		go func() {
			for r := range srv.Events() {
				if *quiet {
					continue
				}
				emit(line{Server: &r})
			}
		}()
		go func() {
			for r := range cli.Events() {
				if *quiet {
					continue
				}
				emit(line{Client: &r})
			}
		}()
	default:
		emit(line{Error: "unknown -mode " + *mode})
		os.Exit(2)
	}
	// HTTP/1 and h2c (HTTP/2 with prior knowledge) on the same port.
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	hs := &http.Server{Handler: mux, Protocols: &protos}
	go hs.Serve(ln)
	emit(line{Listen: ln.Addr().String()})
	<-ctx.Done()
	hs.Close()
}
