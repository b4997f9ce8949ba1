// Command otlp exports TCP flow metrics, and with -spans one span per
// connection, over OTLP/gRPC. The exporters read the standard environment
// variables: OTEL_EXPORTER_OTLP_ENDPOINT (default localhost:4317; an
// http:// URL means no TLS), OTEL_EXPORTER_OTLP_HEADERS, ..._INSECURE,
// OTEL_METRIC_EXPORT_INTERVAL (ms), OTEL_SERVICE_NAME. It observes the
// whole host unless -pid limits it to one process.
//
//	sudo OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 go run ./examples/otlp [-pid N] [-spans]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/otelviews"
	"github.com/flowmill/flowmill/probes/tcp"
)

func main() {
	pid := flag.Int("pid", 0, "observe only this process (default: the whole host)")
	spans := flag.Bool("spans", false, "also export one span per TCP connection")
	interval := flag.Duration("interval", 5*time.Second, "stats interval for open connections")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	mexp, err := otlpmetricgrpc.New(ctx)
	if err != nil {
		log.Fatal(err)
	}
	texp, err := otlptracegrpc.New(ctx)
	if err != nil {
		log.Fatal(err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewPeriodicReader(mexp)), sdkmetric.WithView(otelviews.Views()...))
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(texp))
	otel.SetMeterProvider(mp)
	otel.SetTracerProvider(tp)

	scope, what := flowmill.WithHostScope(), "the whole host"
	if *pid != 0 {
		scope, what = flowmill.WithProcessScope(*pid), fmt.Sprintf("process %d", *pid)
	}
	opts := []tcp.Option{tcp.WithStatsInterval(*interval)}
	if *spans {
		opts = append(opts, tcp.WithSpans())
	}
	s, err := flowmill.Start(ctx, scope, flowmill.WithProbes(tcp.New(opts...)))
	if err != nil {
		log.Fatal(err)
	}
	exp, err := flowmill.NewExporter(s)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("observing %s (-pid limits to one process); exporting over OTLP/gRPC", what)
	<-ctx.Done()

	// Stop reading, record what was read, then send the rest.
	done, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.Close()
	if err := exp.Shutdown(done); err != nil {
		log.Print(err)
	}
	if err := mp.Shutdown(done); err != nil {
		log.Print(err)
	}
	if err := tp.Shutdown(done); err != nil {
		log.Print(err)
	}
}
