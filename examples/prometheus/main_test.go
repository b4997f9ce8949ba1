package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// TestPrometheusScrapesTheExample runs the example on this test's process,
// has a real Prometheus server scrape it, moves N bytes over loopback and
// finds the byte counter with value N through Prometheus's HTTP API.
func TestPrometheusScrapesTheExample(t *testing.T) {
	testutil.RequireBPF(t)
	testutil.Need(t, exec.LookPath, "go", "prometheus")
	ex, m := testutil.StartExample(t, testprog.Prometheus, regexp.MustCompile(`observing process \d+ .*metrics on http://(\S+)/metrics`), nil,
		"-addr", "127.0.0.1:0", "-pid", strconv.Itoa(os.Getpid()), "-interval", "100ms")
	target := m[1]
	prom := startPrometheus(t, target)

	const n = 98765
	port, client, server := testutil.Transfer(t, n)
	client.Close()
	server.Close()

	// The client side, by the server port it connected to, and its
	// connection's duration, a native histogram with one sample. The bytes
	// may reach N from a periodic report before the close is scraped: wait
	// for both.
	qBytes := fmt.Sprintf(`tcp_bytes_total{network_peer_port="%d",network_io_direction="transmit",flowmill_tcp_role="client"}`, port)
	qCount := fmt.Sprintf(`histogram_count(tcp_connection_duration_seconds{network_peer_port="%d"})`, port)
	var bytes, count string
	for start := time.Now(); bytes != strconv.Itoa(n) || count != "1"; time.Sleep(250 * time.Millisecond) {
		if time.Since(start) > testutil.Timeout(30*time.Second) {
			t.Fatalf("after %v: %s = %q, want %d; %s = %q, want 1\nexample:\n%s", time.Since(start), qBytes, bytes, n, qCount, count, ex.Log())
		}
		bytes, count = query(t, prom, qBytes), query(t, prom, qCount)
	}
	if err := ex.Stop(); err != nil {
		t.Errorf("the example did not exit cleanly: %v\n%s", err, ex.Log())
	}
}

// startPrometheus runs a Prometheus server on a free loopback port that
// scrapes target every 200ms, and returns its address.
func startPrometheus(t *testing.T, target string) string {
	t.Helper()
	dir := t.TempDir()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\nscrape_configs:\n  - job_name: flowmill\n    static_configs:\n      - targets: [%q]\n", target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("prometheus",
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--enable-feature=native-histograms")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
	})
	for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		if r, err := http.Get("http://" + addr + "/-/ready"); err == nil {
			r.Body.Close()
			if r.StatusCode == http.StatusOK {
				return addr
			}
		}
		if time.Since(start) > testutil.Timeout(30*time.Second) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("prometheus not ready on %s within 30s:\n%s", addr, log)
		}
	}
}

// query evaluates an instant query that selects at most one series and
// returns its value ("" for none).
func query(t *testing.T, prom, q string) string {
	t.Helper()
	r, err := http.Get("http://" + prom + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	var resp struct {
		Status string
		Error  string
		Data   struct {
			Result []struct {
				Metric map[string]string
				Value  [2]any
			}
		}
	}
	if err := json.NewDecoder(r.Body).Decode(&resp); err != nil {
		t.Fatalf("decoding the answer to %s: %v", q, err)
	}
	if resp.Status != "success" {
		t.Fatalf("query %s: %s", q, resp.Error)
	}
	switch len(resp.Data.Result) {
	case 0:
		return ""
	case 1:
		v, _ := resp.Data.Result[0].Value[1].(string)
		return v
	}
	t.Fatalf("query %s selects %d series, want at most 1: %+v", q, len(resp.Data.Result), resp.Data.Result)
	return ""
}
