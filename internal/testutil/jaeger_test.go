package testutil

import (
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestJaeger sends a server span and its client child over OTLP/HTTP
// (OTLP's JSON encoding) to a Jaeger started by StartJaeger and reads them
// back through the query API: service, names, kinds, parent, times and
// attributes. It needs no privileges, only the Jaeger binary.
func TestJaeger(t *testing.T) {
	j := StartJaeger(t)
	const (
		service = "flowmill-testutil"
		trace   = "4bf92f3577b34da6a3ce929d0e0e4736"
		remote  = "00f067aa0ba902b7" // the server span's parent, not sent
		server  = "1000000000000001"
		client  = "0000000000000002" // Jaeger drops leading zeros
	)
	start := time.Now().Add(-time.Second).Truncate(time.Microsecond)
	span := func(id, parent, name string, kind int, begin, end time.Duration, attrs string) string {
		return fmt.Sprintf(`{"traceId":%q,"spanId":%q,"parentSpanId":%q,"name":%q,"kind":%d,"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":[%s]}`,
			trace, id, parent, name, kind, start.Add(begin).UnixNano(), start.Add(end).UnixNano(), attrs)
	}
	body := `{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"` + service + `"}}]},` +
		`"scopeSpans":[{"scope":{"name":"testutil"},"spans":[` +
		span(server, remote, "GET /proxy", 2, 0, 30*time.Millisecond, `{"key":"http.response.status_code","value":{"intValue":"200"}}`) + "," +
		span(client, server, "GET", 3, 10*time.Millisecond, 20*time.Millisecond, `{"key":"url.full","value":{"stringValue":"http://127.0.0.1/hello"}}`) +
		`]}]}]}`
	r, err := http.Post("http://"+j.OTLPHTTP+"/v1/traces", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusOK {
		t.Fatalf("OTLP/HTTP export: %s\n%s", r.Status, j.Log())
	}

	spans := j.WaitSpans(t, service, 2, 10*time.Second)
	if len(spans) != 2 {
		t.Fatalf("spans: %+v, want 2", spans)
	}
	if got := j.Services(t); len(got) != 1 || got[0] != service {
		t.Errorf("services %v, want [%s]", got, service)
	}
	want := []struct {
		id, parent, name, kind string
		begin, dur             time.Duration
		key                    string
		value                  any
	}{
		{server, remote, "GET /proxy", "server", 0, 30 * time.Millisecond, "http.response.status_code", 200.0},
		{client, server, "GET", "client", 10 * time.Millisecond, 10 * time.Millisecond, "url.full", "http://127.0.0.1/hello"},
	}
	for i, w := range want {
		s := spans[i]
		if s.TraceID != trace || s.SpanID != w.id || s.ParentSpanID != w.parent || s.Operation != w.name || s.Kind() != w.kind || s.Service != service {
			t.Errorf("span %d: %+v, want trace %s, span %s, parent %s, name %q, kind %s, service %s", i, s, trace, w.id, w.parent, w.name, w.kind, service)
		}
		if !s.Start.Equal(start.Add(w.begin)) || s.Duration != w.dur {
			t.Errorf("span %s: start %v, duration %v; want %v, %v", w.name, s.Start, s.Duration, start.Add(w.begin), w.dur)
		}
		if s.Tags[w.key] != w.value {
			t.Errorf("span %s: %s = %#v, want %#v (tags %v)", w.name, w.key, s.Tags[w.key], w.value, s.Tags)
		}
	}
	if s := j.Spans(t, "no-such-service"); len(s) != 0 {
		t.Errorf("spans of an unknown service: %v", s)
	}
}

// TestJaegerVersionInMakefile checks that `make jaeger` builds the version
// StartJaeger looks for.
func TestJaegerVersionInMakefile(t *testing.T) {
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^JAEGER_VERSION \?= (\S+)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("no JAEGER_VERSION ?= ... line in the Makefile")
	}
	if string(m[1]) != JaegerVersion {
		t.Errorf("the Makefile's JAEGER_VERSION is %s, want %s (testutil.JaegerVersion)", m[1], JaegerVersion)
	}
}
