// Command prometheus serves TCP flow metrics on /metrics through the
// OpenTelemetry Prometheus exporter. It observes the whole host unless
// -pid limits it to one process. Histograms are native (exponential):
// scrape with Prometheus's native-histograms feature to keep them.
//
//	sudo go run ./examples/prometheus [-addr 127.0.0.1:9464] [-pid N]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/otelviews"
	"github.com/flowmill/flowmill/probes/tcp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9464", "address to serve /metrics on (keep it on loopback)")
	pid := flag.Int("pid", 0, "observe only this process (default: the whole host)")
	interval := flag.Duration("interval", 5*time.Second, "stats interval for open connections")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	reader, err := prometheus.New()
	if err != nil {
		log.Fatal(err)
	}
	otel.SetMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader), sdkmetric.WithView(otelviews.Views()...)))

	scope, what := flowmill.WithHostScope(), "the whole host"
	if *pid != 0 {
		scope, what = flowmill.WithProcessScope(*pid), fmt.Sprintf("process %d", *pid)
	}
	s, err := flowmill.Start(ctx, scope, flowmill.WithProbes(tcp.New(tcp.WithStatsInterval(*interval))))
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	if _, err := flowmill.NewExporter(s); err != nil { // stops with the session
		log.Fatal(err)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	http.Handle("/metrics", promhttp.Handler())
	log.Printf("observing %s (-pid limits to one process); metrics on http://%s/metrics", what, ln.Addr())
	go http.Serve(ln, nil)
	<-ctx.Done()
}
