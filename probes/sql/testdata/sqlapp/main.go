// Command sqlapp is the database/sql probe's test program: a module of its
// own, so that the drivers it uses (pgx, modernc.org/sqlite) never enter
// flowmill's go.mod. It starts a flowmill session with the HTTP and SQL
// probes, runs a workload through the driver named by -driver against
// -dsn, and prints every span as a JSON line on stdout, then "done".
//
//	sqlapp -driver pgx -dsn 'host=/tmp/x port=5432 user=postgres'
//	sqlapp -driver sqlite -dsn 'file:/tmp/x.db'
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	_ "modernc.org/sqlite"

	"github.com/flowmill/flowmill"
	fmhttp "github.com/flowmill/flowmill/probes/http"
	fmsql "github.com/flowmill/flowmill/probes/sql"
)

// Span is what the test reads of a span.
type Span struct {
	Name     string            `json:"name"`
	Kind     string            `json:"kind"`
	TraceID  string            `json:"trace_id"`
	SpanID   string            `json:"span_id"`
	ParentID string            `json:"parent_id"`
	Start    time.Time         `json:"start"`
	End      time.Time         `json:"end"`
	Error    bool              `json:"error"`
	Attrs    map[string]string `json:"attrs"`
}

func main() {
	drv := flag.String("driver", "sqlite", "pgx or sqlite")
	dsn := flag.String("dsn", "", "data source name")
	flag.Parse()
	if err := run(*drv, *dsn); err != nil {
		fmt.Fprintln(os.Stderr, "sqlapp:", err)
		os.Exit(1)
	}
}

func run(drv, dsn string) error {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr), sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	defer mp.Shutdown(context.Background())
	defer tp.Shutdown(context.Background())
	p := fmsql.New()
	s, err := flowmill.New(flowmill.WithProbes(fmhttp.New(fmhttp.WithoutPropagation()), p), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		return err
	}
	defer s.Close()
	exp, err := flowmill.NewExporter(s, flowmill.WithTracerProvider(tp), flowmill.WithMeterProvider(mp))
	if err != nil {
		return err
	}
	defer exp.Close()
	if err := s.Start(context.Background()); err != nil {
		return fmt.Errorf("start: %w", err)
	}
	st, _ := json.Marshal(p.Status())
	fmt.Fprintf(os.Stderr, "status %s\n", st)

	name := map[string]string{"pgx": "pgx", "sqlite": "sqlite"}[drv]
	if name == "" {
		return fmt.Errorf("unknown driver %q", drv)
	}
	db, err := sql.Open(name, dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	ph := func(i int) string {
		if drv == "pgx" {
			return fmt.Sprintf("$%d", i)
		}
		return "?"
	}
	if err := db.Ping(); err != nil {
		return fmt.Errorf("ping: %w", err)
	}

	// One served request running the statements with its context.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	errs := make(chan error, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		errs <- inRequest(r.Context(), db, ph)
	})}
	go srv.Serve(ln)
	resp, err := http.Get("http://" + ln.Addr().String() + "/work")
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	srv.Close()
	if err := <-errs; err != nil {
		return fmt.Errorf("in request: %w", err)
	}

	// 200 statements from 20 goroutines, each with an alias of its own.
	if drv == "sqlite" {
		db.SetMaxOpenConns(4)
	}
	var wg sync.WaitGroup
	cerrs := make(chan error, 20)
	for g := range 20 {
		wg.Go(func() {
			for i := range 10 {
				var v int
				q := fmt.Sprintf("SELECT %s AS c_%d_%d", cast(ph(1), drv), g, i)
				if err := db.QueryRow(q, g*1000+i).Scan(&v); err != nil {
					cerrs <- fmt.Errorf("%s: %w", q, err)
					return
				}
				if v != g*1000+i {
					cerrs <- fmt.Errorf("%s: got %d", q, v)
					return
				}
			}
		})
	}
	wg.Wait()
	close(cerrs)
	for err := range cerrs {
		return err
	}

	if err := s.Close(); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	if err := exp.Shutdown(context.Background()); err != nil {
		return fmt.Errorf("exporter: %w", err)
	}
	stats, _ := s.Stats()
	sj, _ := json.Marshal(stats)
	fmt.Fprintf(os.Stderr, "stats %s\n", sj)
	enc := json.NewEncoder(os.Stdout)
	for _, sp := range sr.Ended() {
		out := Span{Name: sp.Name(), Kind: sp.SpanKind().String(), TraceID: sp.SpanContext().TraceID().String(),
			SpanID: sp.SpanContext().SpanID().String(), Start: sp.StartTime(), End: sp.EndTime(),
			Error: sp.Status().Code.String() == "Error", Attrs: map[string]string{}}
		if sp.Parent().IsValid() {
			out.ParentID = sp.Parent().SpanID().String()
		}
		for _, kv := range sp.Attributes() {
			out.Attrs[string(kv.Key)] = kv.Value.Emit()
		}
		if err := enc.Encode(out); err != nil {
			return err
		}
	}
	fmt.Println("done")
	return nil
}

func cast(p, drv string) string {
	if drv == "pgx" {
		return p + "::int"
	}
	return p
}

func inRequest(ctx context.Context, db *sql.DB, ph func(int) string) error {
	var one int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		return fmt.Errorf("select 1: %w", err)
	}
	if _, err := db.ExecContext(ctx, "CREATE TABLE accounts (id bigint, owner text DEFAULT 'sekrit-4711', balance bigint)"); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	if _, err := db.ExecContext(ctx, "INSERT INTO accounts (id, owner, balance) VALUES ("+ph(1)+", "+ph(2)+", "+ph(3)+")",
		1, "sekrit-4711", 987654321); err != nil {
		return fmt.Errorf("insert: %w", err)
	}
	if _, err := db.ExecContext(ctx, "SELEKT owner FROM accounts WHERE owner = 'sekrit-4711'"); err == nil {
		return errors.New("the syntax error did not fail")
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = 987654321 WHERE owner = 'sekrit-4711'"); err != nil {
		tx.Rollback()
		return fmt.Errorf("update: %w", err)
	}
	return tx.Commit()
}
