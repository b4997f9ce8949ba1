package main

import (
	"io"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// TestAutoinstJaeger runs the example exporting over OTLP/gRPC to a real
// Jaeger v2 and reads its spans back through Jaeger's query API: service
// autoinst, one server span per request served (the test's and the one
// /proxy makes), named after the route, and /proxy's client span the child
// of its server span, itself the child of the traceparent sent, and the
// parent of the /hello it requested.
func TestAutoinstJaeger(t *testing.T) {
	testutil.RequireBPF(t)
	j := testutil.StartJaeger(t)
	ex, m := testutil.StartExample(t, testprog.Autoinst, regexp.MustCompile(`listening on (\S+)`),
		[]string{
			"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + j.OTLPGRPC,
			"OTEL_SERVICE_NAME=", // the example's own: autoinst
			"OTEL_RESOURCE_ATTRIBUTES=",
		},
		"-addr", "127.0.0.1:0")
	base := "http://" + m[1]

	const (
		traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
		remote  = "00f067aa0ba902b7"
	)
	requests := []struct {
		path, traceparent string
		status            int
	}{
		{"/hello", "", 200},
		{"/hello", "", 200},
		{"/users/7", "", 200},
		{"/users/8", "", 200},
		{"/fail", "", 500},
		{"/proxy", "00-" + traceID + "-" + remote + "-01", 200},
	}
	for _, r := range requests {
		req, _ := http.NewRequest("GET", base+r.path, nil)
		if r.traceparent != "" {
			req.Header.Set("traceparent", r.traceparent)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v\n%s", r.path, err, ex.Log())
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != r.status {
			t.Errorf("GET %s: %d, want %d", r.path, resp.StatusCode, r.status)
		}
	}
	// The example flushes its spans as it exits.
	if err := ex.Stop(); err != nil {
		t.Errorf("the example did not exit cleanly: %v\n%s", err, ex.Log())
	}

	// Server spans: the six requests above and /proxy's own GET /hello;
	// one client span, /proxy's.
	want := map[string]int{"GET /hello": 3, "GET /users/{id}": 2, "GET /fail": 1, "GET /proxy": 1, "GET": 1}
	total := 0
	for _, n := range want {
		total += n
	}
	spans := j.WaitSpans(t, "autoinst", total, 30*time.Second)
	got := map[string]int{}
	byName := map[string][]testutil.JaegerSpan{}
	for _, s := range spans {
		got[s.Operation]++
		byName[s.Operation] = append(byName[s.Operation], s)
		wantKind := "server"
		if s.Operation == "GET" {
			wantKind = "client"
		}
		if s.Kind() != wantKind || s.Service != "autoinst" {
			t.Errorf("span %s: kind %q, service %q; want %s, autoinst", s.Operation, s.Kind(), s.Service, wantKind)
		}
	}
	if len(spans) != total || !maps.Equal(got, want) {
		t.Fatalf("Jaeger has %d spans by name %v, want %d: %v\n%+v", len(spans), got, total, want, spans)
	}
	if s := j.Services(t); !slices.Equal(s, []string{"autoinst"}) {
		t.Errorf("services %v, want [autoinst]", s)
	}
	for _, s := range byName["GET /fail"] {
		if s.Tags["http.response.status_code"] != 500.0 || s.Tags["http.route"] != "/fail" {
			t.Errorf("GET /fail: tags %v, want http.response.status_code 500, http.route /fail", s.Tags)
		}
	}
	p, c := byName["GET /proxy"][0], byName["GET"][0]
	if p.TraceID != traceID || p.ParentSpanID != remote {
		t.Errorf("/proxy span %+v is not the child of the traceparent %s-%s", p, traceID, remote)
	}
	if c.TraceID != p.TraceID || c.ParentSpanID != p.SpanID {
		t.Errorf("client span %+v is not the child of /proxy %+v", c, p)
	}
	if c.Start.Before(p.Start) || c.Start.Add(c.Duration).After(p.Start.Add(p.Duration)) {
		t.Errorf("client span [%v, +%v] is not within /proxy's [%v, +%v]", c.Start, c.Duration, p.Start, p.Duration)
	}
	// The /hello it requested carried the trace context: the child of
	// the client span, in the same trace.
	if !slices.ContainsFunc(byName["GET /hello"], func(h testutil.JaegerSpan) bool {
		return h.TraceID == traceID && h.ParentSpanID == c.SpanID
	}) {
		t.Errorf("no GET /hello is the child of /proxy's client span %+v: %+v", c, byName["GET /hello"])
	}
}

// TestAutoinstJaegerChain: three instances of the example, a calling b
// calling c (-downstream), each instrumented by flowmill and exporting
// over OTLP to one Jaeger: a request to a's /proxy makes one trace in
// Jaeger holding the whole tree, each hop's server span the child of the
// previous hop's client span (whose traceparent flowmill added to the
// request):
//
//	a GET /proxy > a GET > b GET /proxy > b GET > c GET /proxy > c GET > c GET /hello
func TestAutoinstJaegerChain(t *testing.T) {
	testutil.RequireBPF(t)
	j := testutil.StartJaeger(t)
	ready := regexp.MustCompile(`listening on (\S+)`)
	run := func(name, downstream string) (*testutil.Example, string) {
		args := []string{"-addr", "127.0.0.1:0"}
		if downstream != "" {
			args = append(args, "-downstream", downstream)
		}
		ex, m := testutil.StartExample(t, testprog.Autoinst, ready,
			[]string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + j.OTLPGRPC, "OTEL_SERVICE_NAME=" + name, "OTEL_RESOURCE_ATTRIBUTES="}, args...)
		return ex, "http://" + m[1]
	}
	c, cURL := run("c", "")
	b, bURL := run("b", cURL)
	a, aURL := run("a", bURL)
	resp, err := http.Get(aURL + "/proxy")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET a/proxy: %d\n%s", resp.StatusCode, a.Log())
	}
	// Each flushes its spans as it exits.
	for _, ex := range []*testutil.Example{a, b, c} {
		if err := ex.Stop(); err != nil {
			t.Errorf("an example did not exit cleanly: %v\n%s", err, ex.Log())
		}
	}

	// Jaeger returns the traces a's spans are in, with every span of them.
	spans := j.WaitSpans(t, "a", 7, 30*time.Second)
	type hop struct{ service, kind, op string }
	chain := []hop{
		{"a", "server", "GET /proxy"}, {"a", "client", "GET"},
		{"b", "server", "GET /proxy"}, {"b", "client", "GET"},
		{"c", "server", "GET /proxy"}, {"c", "client", "GET"},
		{"c", "server", "GET /hello"},
	}
	if len(spans) != len(chain) {
		t.Fatalf("Jaeger has %d spans in a's traces, want %d: %+v", len(spans), len(chain), spans)
	}
	byParent := map[string]testutil.JaegerSpan{}
	var root testutil.JaegerSpan
	for _, s := range spans {
		if s.TraceID != spans[0].TraceID {
			t.Errorf("spans of two traces: %s and %s", spans[0].TraceID, s.TraceID)
		}
		if s.ParentSpanID == "" {
			root = s
			continue
		}
		if _, dup := byParent[s.ParentSpanID]; dup {
			t.Errorf("two children of %s", s.ParentSpanID)
		}
		byParent[s.ParentSpanID] = s
	}
	// Down the tree from the root, one child at each level.
	cur := root
	for i, h := range chain {
		if cur.Service != h.service || cur.Kind() != h.kind || cur.Operation != h.op {
			t.Fatalf("level %d of the trace: %s %s %q, want %s %s %q\n%+v", i, cur.Service, cur.Kind(), cur.Operation, h.service, h.kind, h.op, spans)
		}
		if i > 0 && cur.Start.Before(spans[0].Start) {
			t.Errorf("%s %q starts before the root", cur.Service, cur.Operation)
		}
		next, ok := byParent[cur.SpanID]
		if i == len(chain)-1 {
			if ok {
				t.Errorf("%s %q has a child %+v", cur.Service, cur.Operation, next)
			}
			break
		}
		if !ok {
			t.Fatalf("%s %s %q has no child in Jaeger: %+v", cur.Service, cur.Kind(), cur.Operation, spans)
		}
		cur = next
	}
	if s := j.Services(t); !slices.Equal(s, []string{"a", "b", "c"}) {
		t.Errorf("services %v, want [a b c]", s)
	}
}
