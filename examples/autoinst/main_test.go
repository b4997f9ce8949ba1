package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// TestAutoinst runs the example, drives its four routes and checks the spans
// it prints: /proxy's server span is the parent of its client span, which
// is in the same trace as the traceparent sent.
func TestAutoinst(t *testing.T) {
	testutil.RequireBPF(t)
	bin := testutil.Program(t, testprog.Autoinst)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, "-addr", addr)
	cmd.Env = append(os.Environ(), "OTEL_EXPORTER_OTLP_ENDPOINT=")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(testutil.Timeout(10 * time.Second)):
			cmd.Process.Kill()
		}
	}()
	get := func(path string, hdr ...string) int {
		req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
		if len(hdr) == 2 {
			req.Header.Set(hdr[0], hdr[1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for deadline := time.Now().Add(testutil.Timeout(30 * time.Second)); get("/hello") != 200; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) || cmd.ProcessState != nil {
			if strings.Contains(stderr.String(), "insufficient privileges") {
				testutil.Unavailable(t, "%s", stderr.String())
			}
			t.Fatalf("example did not serve: %s", stderr.String())
		}
	}
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	for path, want := range map[string]int{"/users/7": 200, "/fail": 500} {
		if got := get(path); got != want {
			t.Errorf("%s: %d, want %d", path, got, want)
		}
	}
	if got := get("/proxy", "traceparent", tp); got != 200 {
		t.Errorf("/proxy: %d", got)
	}
	cmd.Process.Signal(os.Interrupt)
	select {
	case <-exited:
	case <-time.After(testutil.Timeout(15 * time.Second)):
		t.Fatal("example did not exit on SIGINT")
	}
	type span struct {
		Name        string
		SpanContext struct{ TraceID, SpanID string }
		Parent      struct{ TraceID, SpanID string }
		Attributes  []struct {
			Key   string
			Value struct{ Value any }
		}
	}
	spans := map[string][]span{}
	dec := json.NewDecoder(&stdout)
	for dec.More() {
		var s span
		if err := dec.Decode(&s); err != nil {
			t.Fatalf("decoding the spans printed: %v", err)
		}
		spans[s.Name] = append(spans[s.Name], s)
	}
	for _, n := range []string{"GET /hello", "GET /users/{id}", "GET /fail", "GET /proxy", "GET"} {
		if len(spans[n]) == 0 {
			t.Errorf("no span %q in %v", n, spans)
		}
	}
	if len(spans["GET /proxy"]) != 1 || len(spans["GET"]) != 1 {
		t.Fatalf("spans: %v", spans)
	}
	// Server spans carry their connection's RTT, from the TCP probe.
	for _, s := range spans["GET /users/{id}"] {
		srtt := -1.0
		for _, a := range s.Attributes {
			if a.Key == "flowmill.tcp.srtt" {
				srtt, _ = a.Value.Value.(float64)
			}
		}
		if srtt <= 0 || srtt > 1 {
			t.Errorf("span %s: flowmill.tcp.srtt %v, want the connection's RTT in seconds", s.Name, srtt)
		}
	}
	p, c := spans["GET /proxy"][0], spans["GET"][0]
	if p.SpanContext.TraceID != "4bf92f3577b34da6a3ce929d0e0e4736" || p.Parent.SpanID != "00f067aa0ba902b7" {
		t.Errorf("/proxy span %+v is not the child of the traceparent", p)
	}
	if c.SpanContext.TraceID != p.SpanContext.TraceID || c.Parent.SpanID != p.SpanContext.SpanID {
		t.Errorf("client span %+v is not the child of /proxy %+v", c, p)
	}
}
