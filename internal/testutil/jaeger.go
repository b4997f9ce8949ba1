package testutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The Jaeger v2 server the tests export to: an OpenTelemetry Collector
// distribution with OTLP receivers, in-memory storage and Jaeger's query API.
// `make jaeger` (a dependency of `make test-tools`, run by .ci/run) builds
// JaegerVersion into JaegerCachePath() when it is not there yet.
const (
	// JaegerVersion is the version `make jaeger` builds; keep it equal to
	// JAEGER_VERSION in the Makefile (TestJaegerVersionInMakefile checks).
	JaegerVersion = "v1.76.0"
	// JaegerEnv names a Jaeger binary to use instead of the cached one.
	JaegerEnv = "FLOWMILL_JAEGER"
	// ToolsCacheEnv names the directory holding the built tools, by
	// version (default /var/cache/flowmill-tools); the Makefile reads it
	// too.
	ToolsCacheEnv = "FLOWMILL_TOOLS_CACHE"
)

// JaegerCachePath is where `make jaeger` keeps the binary:
// $FLOWMILL_TOOLS_CACHE/jaeger-VERSION/jaeger. It is outside the repository
// so that a fresh checkout (CI's) finds it built by an earlier run.
func JaegerCachePath() string {
	dir := os.Getenv(ToolsCacheEnv)
	if dir == "" {
		dir = "/var/cache/flowmill-tools"
	}
	return filepath.Join(dir, "jaeger-"+JaegerVersion, "jaeger")
}

// jaegerBinary finds the Jaeger binary: $FLOWMILL_JAEGER, else the cache,
// else jaeger on PATH.
func jaegerBinary() (string, error) {
	if p := os.Getenv(JaegerEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", JaegerEnv, p, err)
		}
		return p, nil
	}
	if p := JaegerCachePath(); fileExists(p) {
		return p, nil
	}
	if p, err := exec.LookPath("jaeger"); err == nil {
		return p, nil
	}
	return "", errJaegerMissing
}

var errJaegerMissing = errors.New("no Jaeger binary")

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// Jaeger is a Jaeger v2 server started by StartJaeger, listening on
// loopback only, with its traces in memory.
type Jaeger struct {
	// OTLPGRPC and OTLPHTTP are the host:port of its OTLP receivers
	// (gRPC, and HTTP with the /v1/traces path).
	OTLPGRPC, OTLPHTTP string
	// Query is the base URL of the query API and web UI
	// (http://127.0.0.1:PORT).
	Query string

	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	err     error // of Wait, once exited is closed
}

// jaegerConfig is the collector configuration: OTLP in, memory storage,
// the query extension and a health check, everything on loopback, and no
// telemetry of its own (no Prometheus endpoint on :8888, no traces of the
// query service sent anywhere).
const jaegerConfig = `service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: %[1]s
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: %[2]s
    grpc:
      endpoint: %[3]s
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %[4]s
      http:
        endpoint: %[5]s
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`

// StartJaeger starts a Jaeger v2 server for t on free loopback ports and
// waits until its receivers and query API are up; it is killed in
// t.Cleanup. Without a Jaeger binary ($FLOWMILL_JAEGER, the cache of
// `make jaeger`, or PATH) t is skipped, or failed under
// FLOWMILL_REQUIRE_BPF=1 (see Unavailable).
func StartJaeger(t testing.TB) *Jaeger {
	t.Helper()
	bin, err := jaegerBinary()
	if errors.Is(err, errJaegerMissing) {
		Unavailable(t, "needs the Jaeger %s binary: `make jaeger` (or `make test-tools`) builds it into %s; or set %s to one", JaegerVersion, JaegerCachePath(), JaegerEnv)
	} else if err != nil {
		t.Fatal(err)
	}
	// The ports are free when chosen, but another process may take one
	// before Jaeger binds it: then try again with new ones.
	for attempt := 1; ; attempt++ {
		j, err := startJaeger(t, bin)
		if err == nil {
			return j
		}
		if !errors.Is(err, errPortTaken) || attempt == 3 {
			t.Fatal(err)
		}
		t.Logf("starting Jaeger again: %v", err)
	}
}

var errPortTaken = errors.New("a port was taken before Jaeger could bind it")

func startJaeger(t testing.TB, bin string) (*Jaeger, error) {
	t.Helper()
	dir := t.TempDir()
	addrs, err := freePorts(5)
	if err != nil {
		return nil, err
	}
	health, query, queryGRPC, otlpGRPC, otlpHTTP := addrs[0], addrs[1], addrs[2], addrs[3], addrs[4]
	cfg := filepath.Join(dir, "jaeger.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, jaegerConfig, health, query, queryGRPC, otlpGRPC, otlpHTTP), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "jaeger.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Dir = dir
	// Jaeger's own OpenTelemetry SDK must not follow the test's OTEL_*
	// settings (and export somewhere).
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OTEL_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	j := &Jaeger{
		OTLPGRPC: otlpGRPC,
		OTLPHTTP: otlpHTTP,
		Query:    "http://" + query,
		cmd:      cmd,
		logPath:  logf.Name(),
		exited:   make(chan struct{}),
	}
	go func() { j.err = cmd.Wait(); close(j.exited) }()
	t.Cleanup(j.stop)

	// Healthy once every component has started (receivers start last);
	// the query API answering is checked too.
	deadline := time.After(Timeout(60 * time.Second))
	client := &http.Client{Timeout: 5 * time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if answers200(client, "http://"+health+"/status") && answers200(client, j.Query+"/api/services") {
			t.Logf("Jaeger %s: OTLP gRPC %s, OTLP HTTP %s, query %s", bin, j.OTLPGRPC, j.OTLPHTTP, j.Query)
			return j, nil
		}
		select {
		case <-j.exited:
			log := j.Log()
			if strings.Contains(log, "address already in use") {
				return nil, fmt.Errorf("%w:\n%s", errPortTaken, log)
			}
			return nil, fmt.Errorf("jaeger exited before it was ready: %v\n%s", j.err, log)
		case <-deadline:
			return nil, fmt.Errorf("jaeger not ready within %v:\n%s", Timeout(60*time.Second), j.Log())
		case <-tick.C:
		}
	}
}

// freePorts returns n distinct loopback addresses whose ports were free.
func freePorts(n int) ([]string, error) {
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer ln.Close() // held until all are chosen, so they differ
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs, nil
}

func answers200(c *http.Client, u string) bool {
	r, err := c.Get(u)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, r.Body)
	r.Body.Close()
	return r.StatusCode == http.StatusOK
}

func (j *Jaeger) stop() {
	_ = j.cmd.Process.Kill()
	<-j.exited
}

// Log is what Jaeger wrote so far.
func (j *Jaeger) Log() string {
	b, _ := os.ReadFile(j.logPath)
	return string(b)
}

// JaegerSpan is a span as Jaeger's query API returns it.
type JaegerSpan struct {
	TraceID string // 32 hex digits
	SpanID  string // 16 hex digits
	// ParentSpanID is the span of its CHILD_OF reference, "" for a root.
	// The parent need not be in Jaeger (a remote parent from a
	// traceparent header).
	ParentSpanID string
	Operation    string // the span's name
	Service      string // the service.name of its process (resource)
	Start        time.Time
	Duration     time.Duration
	// Tags are the span's attributes, and what Jaeger adds: span.kind
	// ("server", "client", ...), otel.status_code, otel.scope.name, ...
	// Numbers are float64, as encoding/json decodes them.
	Tags map[string]any
}

// Kind is the span's kind ("server", "client", ...).
func (s JaegerSpan) Kind() string { v, _ := s.Tags["span.kind"].(string); return v }

// Services lists the services Jaeger has spans of.
func (j *Jaeger) Services(t testing.TB) []string {
	t.Helper()
	var resp struct{ Data []string }
	j.get(t, "/api/services", &resp)
	slices.Sort(resp.Data)
	return resp.Data
}

// Spans returns every span of service that Jaeger has (GET
// /api/traces?service=NAME), in the order of their start, then name.
func (j *Jaeger) Spans(t testing.TB, service string) []JaegerSpan {
	t.Helper()
	var resp struct {
		Data []struct {
			TraceID string
			Spans   []struct {
				TraceID       string
				SpanID        string
				OperationName string
				References    []struct{ RefType, TraceID, SpanID string }
				StartTime     int64 // µs since the epoch
				Duration      int64 // µs
				Tags          []struct {
					Key   string
					Value any
				}
				ProcessID string
			}
			Processes map[string]struct{ ServiceName string }
		}
	}
	j.get(t, "/api/traces?limit=100000&service="+url.QueryEscape(service), &resp)
	var spans []JaegerSpan
	for _, tr := range resp.Data {
		for _, s := range tr.Spans {
			js := JaegerSpan{
				TraceID:   padHex(s.TraceID, 32),
				SpanID:    padHex(s.SpanID, 16),
				Operation: s.OperationName,
				Service:   tr.Processes[s.ProcessID].ServiceName,
				Start:     time.UnixMicro(s.StartTime),
				Duration:  time.Duration(s.Duration) * time.Microsecond,
				Tags:      map[string]any{},
			}
			for _, r := range s.References {
				if r.RefType == "CHILD_OF" {
					js.ParentSpanID = padHex(r.SpanID, 16)
					break
				}
			}
			for _, kv := range s.Tags {
				js.Tags[kv.Key] = kv.Value
			}
			spans = append(spans, js)
		}
	}
	slices.SortFunc(spans, func(a, b JaegerSpan) int {
		if c := a.Start.Compare(b.Start); c != 0 {
			return c
		}
		return strings.Compare(a.Operation, b.Operation)
	})
	return spans
}

// WaitSpans polls Jaeger until it has at least n spans of service, and
// returns them all; it fails t after d (scaled by Timeout).
func (j *Jaeger) WaitSpans(t testing.TB, service string, n int, d time.Duration) []JaegerSpan {
	t.Helper()
	deadline := time.Now().Add(Timeout(d))
	for {
		spans := j.Spans(t, service)
		if len(spans) >= n {
			return spans
		}
		if time.Now().After(deadline) {
			t.Fatalf("Jaeger has %d spans of service %q after %v, want %d: %v\nservices: %v", len(spans), service, Timeout(d), n, spans, j.Services(t))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// get decodes the JSON answer to GET path into v.
func (j *Jaeger) get(t testing.TB, path string, v any) {
	t.Helper()
	c := &http.Client{Timeout: Timeout(10 * time.Second)}
	r, err := c.Get(j.Query + path)
	if err != nil {
		t.Fatalf("Jaeger query: %v", err)
	}
	defer r.Body.Close()
	body, err := io.ReadAll(r.Body)
	if err != nil {
		t.Fatalf("Jaeger query %s: %v", path, err)
	}
	if r.StatusCode != http.StatusOK {
		t.Fatalf("Jaeger query %s: %s: %s", path, r.Status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("Jaeger query %s: decoding %q: %v", path, body, err)
	}
}

// padHex restores the leading zeros Jaeger drops from IDs.
func padHex(s string, n int) string {
	if len(s) < n {
		return strings.Repeat("0", n-len(s)) + s
	}
	return s
}
