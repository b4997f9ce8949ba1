// Command autoinst is a plain net/http service that instruments itself only
// by starting flowmill with the HTTP probe: every request it serves or
// makes becomes a span, printed as JSON on stdout, or sent over OTLP/gRPC
// when OTEL_EXPORTER_OTLP_ENDPOINT is set.
//
//	sudo go run ./examples/autoinst [-addr 127.0.0.1:8080]
//	curl localhost:8080/proxy
package main

import (
	"context"
	"flag"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/flowmill/flowmill"
	fmhttp "github.com/flowmill/flowmill/probes/http"
	"github.com/flowmill/flowmill/probes/tcp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var exp sdktrace.SpanExporter
	var err error
	if os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" {
		exp, err = otlptracegrpc.New(ctx)
	} else {
		exp, err = stdouttrace.New(stdouttrace.WithPrettyPrint())
	}
	if err != nil {
		log.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(time.Second)))
	otel.SetTracerProvider(tp)

	// The TCP probe adds each connection's RTT and retransmissions to the
	// server spans.
	probe := fmhttp.New()
	s, err := flowmill.Start(ctx, flowmill.WithProbes(probe, tcp.New()))
	if err != nil {
		log.Fatal(err)
	}
	fexp, err := flowmill.NewExporter(s)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("instrumented: %+v", probe.Status())

	// Plain net/http from here on: no instrumentation code.
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "user "+r.PathValue("id")+"\n") })
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "failed", http.StatusInternalServerError) })
	mux.HandleFunc("GET /proxy", func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), "GET", "http://"+*addr+"/hello", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		resp.Body.Close()
	})
	srv := &http.Server{Addr: *addr, Handler: mux}
	go func() {
		<-ctx.Done()
		// Record what was observed while the connections are still
		// open (spans carry their TCP state), then stop serving.
		done, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close()
		fexp.Shutdown(done)
		tp.Shutdown(done)
		srv.Close()
	}()
	log.Printf("listening on %s", *addr)
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
