package http_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
)

// BenchmarkOverhead measures, side by side in one run, a small loopback
// HTTP server (testdata/server, GET /hello, one keep-alive connection,
// sequential requests) in three configurations:
//
//	none   no uprobes
//	empty  an empty eBPF program at the HTTP probe's attach points
//	probe  flowmill with the HTTP probe, spans consumed by a subscriber
//
// and reports the time per request of each, the uprobe hits per request
// (counted by the kernel, BPF_ENABLE_STATS), the cost of an empty hit, the
// time the probe adds per request, and the ratio added / (hits × empty hit
// cost). Rounds are interleaved so that drift affects all three alike.
//
//	go test -run '^$' -bench Overhead -benchtime 1x ./probes/http/
func BenchmarkOverhead(b *testing.B) {
	const (
		rounds = 11
		perRun = 2000
	)
	modes := []string{"none", "empty", "probe"}
	children := map[string]*child{}
	for _, m := range modes {
		children[m] = start(b, testprog.HTTPServer, "-mode", m, "-quiet")
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr}
	get := func(url string) {
		resp, err := cl.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	stats := func(c *child) (hits, ns uint64) {
		resp, err := cl.Get(c.url("/__stats"))
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		fmt.Fscan(resp.Body, &hits, &ns)
		return
	}
	perReq := map[string][]float64{} // µs per request, per round
	hits := map[string]float64{}
	bpfNS := map[string]float64{}
	for _, m := range modes {
		for range 500 { // warm up: connections, caches, stacks
			get(children[m].url("/hello"))
		}
	}
	for r := range rounds {
		for i := range modes {
			m := modes[(i+r)%len(modes)]
			c := children[m]
			h0, ns0 := stats(c)
			url := c.url("/hello")
			start := time.Now()
			for range perRun {
				get(url)
			}
			el := time.Since(start)
			h1, ns1 := stats(c)
			perReq[m] = append(perReq[m], float64(el.Microseconds())/perRun)
			// Between the two reads: the first's RET, the second's
			// entry, and the requests.
			if h1 > h0+2 {
				hits[m] += float64(h1-h0-2) / perRun / rounds
				bpfNS[m] += float64(ns1-ns0) / float64(h1-h0) / rounds
			}
		}
	}
	// Hits of a request that makes a client request: /proxy on the probe.
	h0, _ := stats(children["probe"])
	for range 100 {
		get(children["probe"].url("/proxy"))
	}
	h1, _ := stats(children["probe"])
	proxyHits := float64(h1-h0-2) / 100

	median := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		return v[len(v)/2]
	}
	// Differences are taken within a round (adjacent in time), then the
	// median over rounds: the machine's drift cancels out.
	diff := func(m string) float64 {
		var d []float64
		for i := range perReq[m] {
			d = append(d, perReq[m][i]-perReq["none"][i])
		}
		return median(d)
	}
	none, empty, probe := median(perReq["none"]), median(perReq["empty"]), median(perReq["probe"])
	emptyHit := diff("empty") / hits["empty"]
	added := diff("probe")
	ratio := added / (hits["probe"] * emptyHit)
	// The same ratio from the kernel's own accounting of the programs: the
	// traps are equal, the programs differ by their run time.
	kratio := (emptyHit*1e3 + bpfNS["probe"] - bpfNS["empty"]) / (emptyHit * 1e3)
	b.ReportMetric(none, "µs/req-none")
	b.ReportMetric(empty, "µs/req-empty")
	b.ReportMetric(probe, "µs/req-probe")
	b.ReportMetric(1e6/none, "req/s-none")
	b.ReportMetric(1e6/probe, "req/s-probe")
	b.ReportMetric(hits["probe"], "hits/req")
	b.ReportMetric(proxyHits, "hits/proxy-req")
	b.ReportMetric(emptyHit, "µs/empty-hit")
	b.ReportMetric(added, "µs/req-added")
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(kratio, "ratio-kernel")
	b.ReportMetric(bpfNS["probe"], "bpf-ns/hit-probe")
	b.ReportMetric(bpfNS["empty"], "bpf-ns/hit-empty")
	b.Logf("µs per request by round: none %.1f, empty %.1f, probe %.1f", perReq["none"], perReq["empty"], perReq["probe"])
}

// BenchmarkPropagation measures, side by side in one run, what trace
// context propagation adds per outgoing request: testdata/server with the
// probe, propagation on and off (WithoutPropagation), each making
// sequential requests on one keep-alive connection to a plain server of
// this process (/call?n=...), small GETs and 300 KB POSTs. It reports the
// time per outgoing request of each, the difference (the median of the
// differences within each round, so that the machine's drift cancels
// out), and from the kernel's accounting the run time of each program
// propagation adds per hit and its hits per request (inject_msg runs on
// every write of a tracked connection: a 300 KB body is many writes).
//
//	go test -run '^$' -bench Propagation -benchtime 1x ./probes/http/
func BenchmarkPropagation(b *testing.B) {
	const (
		rounds = 11
		perRun = 400
	)
	modes := []string{"off", "on"}
	children := map[string]*child{
		"off": start(b, testprog.HTTPServer, "-quiet", "-propagate=false"),
		"on":  start(b, testprog.HTTPServer, "-quiet"),
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	}))
	defer srv.Close()
	cl := &http.Client{}
	get := func(u string) []byte {
		resp, err := cl.Get(u)
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			b.Fatalf("GET %s: %d %s", u, resp.StatusCode, body)
		}
		return body
	}
	progs := func(c *child) map[string][2]uint64 {
		var m map[string][2]uint64
		if err := json.Unmarshal(get(c.url("/__progstats")), &m); err != nil {
			b.Fatal(err)
		}
		return m
	}
	loads := []struct {
		name string
		q    url.Values
		n    int
	}{
		{"get", url.Values{"client": {"custom"}}, perRun},
		{"post300k", url.Values{"client": {"custom"}, "method": {"POST"}, "body": {"fixed"}, "size": {"307200"}}, perRun / 10},
	}
	for _, l := range loads {
		l.q.Set("url", srv.URL+"/b")
		l.q.Set("n", fmt.Sprint(l.n))
		call := func(c *child) time.Duration {
			start := time.Now()
			get(c.url("/call?" + l.q.Encode()))
			return time.Since(start)
		}
		for _, m := range modes { // warm up: connections, caches, stacks
			call(children[m])
		}
		perReq := map[string][]float64{}
		p0 := progs(children["on"])
		for r := range rounds {
			for i := range modes {
				m := modes[(i+r)%len(modes)]
				perReq[m] = append(perReq[m], float64(call(children[m]).Nanoseconds())/1e3/float64(l.n))
			}
		}
		p1 := progs(children["on"])
		median := func(v []float64) float64 {
			v = slices.Clone(v)
			slices.Sort(v)
			return v[len(v)/2]
		}
		var d []float64
		for i := range perReq["on"] {
			d = append(d, perReq["on"][i]-perReq["off"][i])
		}
		n := float64(rounds * l.n)
		b.ReportMetric(median(perReq["off"]), "µs/req-"+l.name+"-off")
		b.ReportMetric(median(perReq["on"]), "µs/req-"+l.name+"-on")
		b.ReportMetric(median(d), "µs/req-"+l.name+"-added")
		for _, name := range []string{"pconn_enter", "inject_msg", "track_sock", "track_state"} {
			runs, ns := p1[name][0]-p0[name][0], p1[name][1]-p0[name][1]
			if runs == 0 {
				continue
			}
			b.ReportMetric(float64(runs)/n, name+"-hits/req-"+l.name)
			b.ReportMetric(float64(ns)/float64(runs), name+"-ns/hit-"+l.name)
		}
		b.Logf("%s: µs per request by round: off %.1f, on %.1f", l.name, perReq["off"], perReq["on"])
	}
}
