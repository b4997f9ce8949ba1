// Command autoinst is a plain net/http service that instruments itself only
// by starting flowmill with the HTTP probe: every request it serves or
// makes becomes a span, printed as JSON on stdout, or sent over OTLP/gRPC
// when OTEL_EXPORTER_OTLP_ENDPOINT is set (to Jaeger, for instance: see the
// README). Its service name is autoinst unless OTEL_SERVICE_NAME says
// otherwise.
//
// /proxy requests /hello of the service itself, or, with -downstream,
// /proxy of another service (another autoinst): the trace context goes
// along (W3C traceparent, added by flowmill), so a chain of them makes one
// trace.
//
//	sudo go run ./examples/autoinst [-addr 127.0.0.1:8080] [-downstream http://127.0.0.1:8081]
//	curl localhost:8080/proxy
package main

import (
	"context"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/flowmill/flowmill"
	fmhttp "github.com/flowmill/flowmill/probes/http"
	"github.com/flowmill/flowmill/probes/tcp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	downstream := flag.String("downstream", "", "base URL of the service /proxy calls (its /proxy); default: this one's /hello")
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
	// service.name autoinst; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
	// override it.
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName("autoinst")),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		log.Fatal(err)
	}
	// flowmill.IDGenerator: the exported spans carry the IDs flowmill
	// sends downstream in traceparent, so traces join across services.
	tp := sdktrace.NewTracerProvider(sdktrace.WithResource(res),
		sdktrace.WithIDGenerator(flowmill.IDGenerator{}),
		sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(time.Second)))
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

	// Listening first gives the port chosen for -addr 127.0.0.1:0.
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	next := "http://" + ln.Addr().String() + "/hello"
	if *downstream != "" {
		next = strings.TrimSuffix(*downstream, "/") + "/proxy"
	}

	// Plain net/http from here on: no instrumentation code.
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	mux.HandleFunc("GET /users/{id}", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "user "+r.PathValue("id")+"\n") })
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "failed", http.StatusInternalServerError) })
	mux.HandleFunc("GET /proxy", func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), "GET", next, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
	})
	srv := &http.Server{Handler: mux}
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
	log.Printf("listening on %s", ln.Addr())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
