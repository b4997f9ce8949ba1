// Command cost measures, side by side in one run, the CPU a net/http server
// spends per request with no instrumentation, with empty uprobes where the
// HTTP probe attaches (the floor of any uprobe design), with the otelhttp
// middleware and with flowmill's HTTP probe and exporter, each at every
// request sampled and at 10 % (ParentBased(TraceIDRatioBased(0.1))), the
// same OpenTelemetry SDK set-up for both: a batch span processor and a
// periodic metric reader, their exporters discarding.
//
// Each server is a child process of its own; the driver sends the same
// load to each in turn (c keep-alive connections, n requests on
// /users/{id}), rounds rotating the order, and reads the child's CPU time
// (getrusage: user and system, the eBPF programs included) before and
// after. It prints the medians over rounds of the CPU per request and of
// the differences within a round.
//
//	go run . -rounds 7 -n 20000 -c 8     (as root, from this directory)
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/emptyuprobe"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

var modes = []string{"plain", "empty", "otelhttp", "flowmill", "otelhttp-0.1", "flowmill-0.1"}

func main() {
	serve := flag.String("serve", "", "child: serve in this mode ("+strings.Join(modes, ", ")+")")
	rounds := flag.Int("rounds", 7, "rounds")
	n := flag.Int("n", 20000, "requests per server per round")
	c := flag.Int("c", 8, "concurrent connections")
	only := flag.String("modes", strings.Join(modes, ","), "the servers to compare (plain first), and flowmill-noprop, flowmill-0.1-noprop: without trace context propagation")
	flag.Parse()
	modes = strings.Split(*only, ",")
	if *serve != "" {
		if err := child(*serve); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		return
	}
	if err := drive(*rounds, *n, *c); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// discard is a metric exporter that drops what it is given.
type discard struct{}

func (discard) Temporality(k sdkmetric.InstrumentKind) metricdata.Temporality {
	return sdkmetric.DefaultTemporalitySelector(k)
}
func (discard) Aggregation(k sdkmetric.InstrumentKind) sdkmetric.Aggregation {
	return sdkmetric.DefaultAggregationSelector(k)
}
func (discard) Export(context.Context, *metricdata.ResourceMetrics) error { return nil }
func (discard) ForceFlush(context.Context) error                          { return nil }
func (discard) Shutdown(context.Context) error                            { return nil }

func child(mode string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// COST_PROFILE=dir: each server writes its CPU profile there.
	if dir := os.Getenv("COST_PROFILE"); dir != "" {
		f, err := os.Create(filepath.Join(dir, mode+".pprof"))
		if err != nil {
			return err
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "user "+r.PathValue("id")+"\n")
	})
	mux.HandleFunc("GET /__cpu", func(w http.ResponseWriter, r *http.Request) {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		fmt.Fprintln(w, ru.Utime.Nano()+ru.Stime.Nano())
	})
	var h http.Handler = mux

	ratio := 1.0
	if strings.Contains(mode, "-0.1") {
		ratio = 0.1
	}
	sampler := sdktrace.ParentBased(sdktrace.TraceIDRatioBased(ratio))
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()), sdktrace.WithSampler(sampler),
		sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewPeriodicReader(discard{}, sdkmetric.WithInterval(time.Second))))
	defer tp.Shutdown(context.Background())
	defer mp.Shutdown(context.Background())
	switch {
	case mode == "plain":
	case mode == "empty":
		_, closeAll, err := emptyuprobe.ServeHTTP()
		if err != nil {
			return err
		}
		defer closeAll()
	case strings.HasPrefix(mode, "otelhttp"):
		h = otelhttp.NewHandler(mux, "server", otelhttp.WithTracerProvider(tp), otelhttp.WithMeterProvider(mp))
	case strings.HasPrefix(mode, "flowmill"):
		opts := []fmhttp.Option{fmhttp.WithSampling(ratio)}
		if strings.HasSuffix(mode, "-noprop") {
			opts = append(opts, fmhttp.WithoutPropagation())
		}
		s, err := flowmill.Start(ctx, flowmill.WithProbes(fmhttp.New(opts...)))
		if err != nil {
			return err
		}
		defer s.Close()
		exp, err := flowmill.NewExporter(s, flowmill.WithTracerProvider(tp), flowmill.WithMeterProvider(mp))
		if err != nil {
			return err
		}
		defer exp.Shutdown(context.Background())
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h}
	go func() { <-ctx.Done(); srv.Close() }()
	fmt.Println(ln.Addr())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}

type server struct {
	cmd  *exec.Cmd
	addr string
}

func drive(rounds, n, c int) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	servers := map[string]*server{}
	defer func() {
		for _, s := range servers {
			s.cmd.Process.Signal(os.Interrupt)
			s.cmd.Wait()
		}
	}()
	for _, m := range modes {
		cmd := exec.Command(self, "-serve", m)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			return err
		}
		if err := cmd.Start(); err != nil {
			return err
		}
		sc := bufio.NewScanner(out)
		if !sc.Scan() || strings.HasPrefix(sc.Text(), "error:") {
			cmd.Process.Kill()
			cmd.Wait()
			return fmt.Errorf("%s: %s", m, sc.Text())
		}
		servers[m] = &server{cmd, sc.Text()}
		go io.Copy(io.Discard, out)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: c, MaxConnsPerHost: c}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr}
	get := func(url string) error {
		resp, err := cl.Get(url)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	cpu := func(s *server) (int64, error) {
		resp, err := cl.Get("http://" + s.addr + "/__cpu")
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		var v int64
		_, err = fmt.Fscan(resp.Body, &v)
		return v, err
	}
	load := func(s *server, n int) error {
		var wg sync.WaitGroup
		errs := make(chan error, c)
		for w := range c {
			wg.Go(func() {
				for i := w; i < n; i += c {
					if err := get(fmt.Sprintf("http://%s/users/%d", s.addr, i)); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		return <-errs
	}
	for _, m := range modes { // warm up
		if err := load(servers[m], n/10); err != nil {
			return err
		}
	}
	per := map[string][]float64{} // CPU µs per request, by round
	for r := range rounds {
		for i := range modes {
			m := modes[(i+r)%len(modes)]
			c0, err := cpu(servers[m])
			if err != nil {
				return err
			}
			if err := load(servers[m], n); err != nil {
				return err
			}
			c1, err := cpu(servers[m])
			if err != nil {
				return err
			}
			per[m] = append(per[m], float64(c1-c0)/1e3/float64(n))
		}
	}
	median := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		return v[len(v)/2]
	}
	diff := func(a, b string) float64 {
		var d []float64
		for i := range per[a] {
			d = append(d, per[a][i]-per[b][i])
		}
		return median(d)
	}
	fmt.Printf("%d rounds of %d requests, %d connections; server CPU µs per request (median), added over plain (median of the differences within a round)\n", rounds, n, c)
	for _, m := range modes {
		fmt.Printf("%-14s %6.1f µs  %+6.1f µs\n", m, median(per[m]), diff(m, "plain"))
	}
	if per["flowmill"] != nil && per["otelhttp"] != nil {
		fmt.Printf("flowmill ÷ otelhttp, added, every request: %.2f\n", diff("flowmill", "plain")/diff("otelhttp", "plain"))
	}
	if per["flowmill-0.1"] != nil && per["otelhttp-0.1"] != nil {
		fmt.Printf("flowmill ÷ otelhttp, added, 10%%: %.2f\n", diff("flowmill-0.1", "plain")/diff("otelhttp-0.1", "plain"))
	}
	if per["flowmill-0.1"] != nil && per["empty"] != nil {
		fmt.Printf("flowmill-0.1 above the empty-uprobe floor: %+.1f µs\n", diff("flowmill-0.1", "empty"))
	}
	return nil
}
