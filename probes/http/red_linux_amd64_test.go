package http_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/testutil"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

// redLoad is what TestREDMetrics serves: n requests on /red/{id}, a third
// with a sampled traceparent, a third with one not sampled, a third
// without; every fifth sleeps a known time in its handler.
type redLoad struct {
	n            int
	handlerTotal time.Duration // the handlers' own time, measured in them
	clientTotal  time.Duration // the requests' time as the client saw it
	unsampled    map[trace.TraceID]bool
	sampled      map[trace.TraceID]bool
}

func serveRED(t *testing.T, n int) *redLoad {
	t.Helper()
	l := &redLoad{n: n, unsampled: map[trace.TraceID]bool{}, sampled: map[trace.TraceID]bool{}}
	var mu sync.Mutex
	mux := http.NewServeMux()
	mux.HandleFunc("GET /red/{id}", func(w http.ResponseWriter, r *http.Request) {
		t0 := time.Now()
		if r.PathValue("id") == "slow" {
			time.Sleep(2 * time.Millisecond)
		}
		w.WriteHeader(http.StatusAccepted)
		d := time.Since(t0)
		mu.Lock()
		l.handlerTotal += d
		mu.Unlock()
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	tr := &http.Transport{MaxIdleConnsPerHost: 8}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		id := fmt.Sprint(i)
		if i%5 == 0 {
			id = "slow"
		}
		req, _ := http.NewRequest("GET", srv.URL+"/red/"+id, nil)
		var tid trace.TraceID
		binary.BigEndian.PutUint64(tid[:8], uint64(i+1))
		binary.BigEndian.PutUint64(tid[8:], uint64(i+1)*0x9e3779b97f4a7c15)
		switch i % 3 {
		case 0:
			req.Header.Set("traceparent", fmt.Sprintf("00-%s-%016x-01", tid, i+1))
			l.sampled[tid] = true
		case 1:
			req.Header.Set("traceparent", fmt.Sprintf("00-%s-%016x-00", tid, i+1))
			l.unsampled[tid] = true
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			d := time.Since(t0)
			mu.Lock()
			l.clientTotal += d
			mu.Unlock()
			if resp.StatusCode != http.StatusAccepted {
				t.Errorf("status %d", resp.StatusCode)
			}
		})
	}
	wg.Wait()
	return l
}

// collect is one collection of reader.
func collect(t *testing.T, reader sdkmetric.Reader) *metricdata.ResourceMetrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	return &rm
}

// serverDuration returns the count and sum of http.server.request.duration
// over the series whose attributes match, explicit or exponential.
func serverDuration(rm *metricdata.ResourceMetrics, match func(attribute.Set) bool) (n uint64, sum float64) {
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "http.server.request.duration" {
				continue
			}
			switch h := m.Data.(type) {
			case metricdata.Histogram[float64]:
				for _, dp := range h.DataPoints {
					if match(dp.Attributes) {
						n, sum = n+dp.Count, sum+dp.Sum
					}
				}
			case metricdata.ExponentialHistogram[float64]:
				for _, dp := range h.DataPoints {
					if match(dp.Attributes) {
						n, sum = n+dp.Count, sum+dp.Sum
					}
				}
			}
		}
	}
	return n, sum
}

// is reports whether the attribute k of a is v.
func is(a attribute.Set, k attribute.Key, v string) bool {
	got, _ := a.Value(k)
	return got.Emit() == v
}

// serverHistogram returns the count and sum of http.server.request.duration
// for the route /red/{id} (status 202, GET).
func serverHistogram(t *testing.T, reader sdkmetric.Reader) (uint64, float64) {
	t.Helper()
	return serverDuration(collect(t, reader), func(a attribute.Set) bool {
		return is(a, semconv.HTTPRouteKey, "/red/{id}") && is(a, semconv.HTTPResponseStatusCodeKey, "202") &&
			is(a, semconv.HTTPRequestMethodKey, "GET")
	})
}

// TestREDMetrics: http.server.request.duration is aggregated in the kernel
// from every request: its count is the number of requests served and its
// sum their total duration, at every sampling ratio, exported as an
// exponential histogram where the view asks for one. With sampling, only
// sampled requests send a record (and make a span): none whose parent is
// not sampled, every one whose parent is, and of the traces flowmill
// starts, those whose trace ID the SDK's TraceIDRatioBased sampler of the
// same ratio samples.
func TestREDMetrics(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  []fmhttp.Option
		ratio float64 // < 0: no sampling in the kernel
	}{
		{"every-record", nil, -1},
		{"sampled-1", []fmhttp.Option{fmhttp.WithSampling(1)}, 1},
		{"sampled-0.1", []fmhttp.Option{fmhttp.WithSampling(0.1)}, 0.1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("OTEL_TRACES_SAMPLER", "") // the options alone decide
			testutil.RequireBPF(t)
			p := fmhttp.New(tc.opts...)
			s, err := flowmill.New(flowmill.WithProbes(p), flowmill.WithMaxLatency(10*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			records, err := flowmill.Subscribe[fmhttp.ServerRequest](s, flowmill.WithBuffer(1<<12))
			if err != nil {
				t.Fatal(err)
			}
			reader := sdkmetric.NewManualReader()
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader), sdkmetric.WithView(sdkmetric.NewView(
				sdkmetric.Instrument{Name: "http.server.request.duration"},
				sdkmetric.Stream{Aggregation: sdkmetric.AggregationBase2ExponentialHistogram{MaxSize: 160, MaxScale: 20}})))
			sr := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr), sdktrace.WithIDGenerator(flowmill.IDGenerator{}))
			exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp), flowmill.WithTracerProvider(tp))
			if err != nil {
				t.Fatal(err)
			}
			testutil.CheckStart(t, s.Start(context.Background()))
			t.Cleanup(func() { exp.Shutdown(context.Background()); s.Close() })
			if st := p.Status(); st.Sampling != (tc.ratio >= 0) || (tc.ratio >= 0 && st.SamplingRatio != tc.ratio) {
				t.Errorf("status: sampling %v ratio %v, want ratio %v", st.Sampling, st.SamplingRatio, tc.ratio)
			}
			before, _ := s.Stats()

			const n = 600
			load := serveRED(t, n)

			// The count reaches n (less what the session counted as
			// lost, on kernels that preempt uprobe programs), never more.
			var count uint64
			var sum float64
			for deadline := time.Now().Add(testutil.Timeout(20 * time.Second)); ; time.Sleep(20 * time.Millisecond) {
				count, sum = serverHistogram(t, reader)
				st, _ := s.Stats()
				lost := (st.EventsLost - before.EventsLost) + (st.Evicted - before.Evicted)
				if count > n {
					t.Fatalf("histogram count %d, more than the %d requests served", count, n)
				}
				if count == n || (count+lost >= n && lost > 0) {
					if count < n {
						t.Logf("%d requests not counted, counted as lost or evicted by the session", n-count)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("histogram count %d after 20s, want %d (session lost %d)", count, n, lost)
				}
			}
			// Durations: the kernel's, from the handler's call to its
			// return, so within the handlers' own time and the client's.
			if sum < load.handlerTotal.Seconds() || sum > load.clientTotal.Seconds() {
				t.Errorf("histogram sum %.6fs, want between the handlers' %.6fs and the client's %.6fs",
					sum, load.handlerTotal.Seconds(), load.clientTotal.Seconds())
			}

			// The records that came: all of them, or only the sampled.
			var got []fmhttp.ServerRequest
			var recSum time.Duration
			bound := uint64(math.Max(tc.ratio, 0) * (1 << 63))
			for len(got) < int(count) {
				select {
				case r := <-records.Events():
					if r.Route != "/red/{id}" {
						continue
					}
					got = append(got, r)
					recSum += r.Duration()
					continue
				case <-time.After(testutil.Timeout(2 * time.Second)):
				}
				break // no more within the wait: the rest were not sent
			}
			roots, sampledRoots, sampledParents := 0, 0, 0
			for _, r := range got {
				tid := r.Span.TraceID
				switch {
				case load.unsampled[tid]:
					if tc.ratio >= 0 {
						t.Errorf("a record for a request whose parent is not sampled")
					}
				case load.sampled[tid]:
					sampledParents++
				default:
					roots++
					x := binary.BigEndian.Uint64(tid[8:]) >> 1
					if r.Span.Sampled {
						sampledRoots++
					}
					if r.Span.Sampled != (tc.ratio < 0 || tc.ratio >= 1 || x < bound) {
						t.Errorf("root trace %s: sampled %v, against the TraceIDRatioBased rule at %v", tid, r.Span.Sampled, tc.ratio)
					}
					if tc.ratio >= 0 && !r.Span.Sampled {
						t.Errorf("a record for a root not sampled")
					}
				}
			}
			switch {
			case tc.ratio < 0:
				st, _ := s.Stats()
				lost := (st.EventsLost - before.EventsLost) + (st.Dropped - before.Dropped)
				if len(got) > int(count) || uint64(len(got))+lost < count {
					t.Errorf("%d records, want one per request counted (%d), less the %d the session counted lost", len(got), count, lost)
				}
				// The same kernel timestamps: the histogram's sum is
				// the records' total duration.
				if len(got) == int(count) && math.Abs(sum-recSum.Seconds()) > 1e-9*float64(n) {
					t.Errorf("histogram sum %.9fs, records' total %.9fs", sum, recSum.Seconds())
				}
			default:
				if count == n && sampledParents != len(load.sampled) {
					t.Errorf("%d records with a sampled parent, want %d", sampledParents, len(load.sampled))
				}
				t.Logf("ratio %v: %d records of %d requests (%d of %d roots sampled)", tc.ratio, len(got), n, sampledRoots, roots)
			}
			if tc.ratio == 0.1 && (sampledRoots == 0 || sampledRoots > n/3/2) {
				// n/3 roots, each sampled with probability 0.1: 20 on
				// average; none or more than 100 is (1-0.1)^200 or far
				// less likely.
				t.Errorf("%d sampled roots of about %d at 0.1", sampledRoots, n/3)
			}
		})
	}
}

// TestREDMadeUpMethods: methods the semantic conventions do not name are
// one series, _OTHER, in the kernel too: 600 requests with 600 made-up
// methods, more than the kernel's table of series holds (512), are all
// counted, none refused.
func TestREDMadeUpMethods(t *testing.T) {
	testutil.RequireBPF(t)
	s, err := flowmill.New(flowmill.WithProbes(fmhttp.New()), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	exp, err := flowmill.NewExporter(s, flowmill.WithMeterProvider(mp))
	if err != nil {
		t.Fatal(err)
	}
	testutil.CheckStart(t, s.Start(context.Background()))
	t.Cleanup(func() { exp.Shutdown(context.Background()); s.Close() })
	mux := http.NewServeMux()
	mux.HandleFunc("/any", func(w http.ResponseWriter, r *http.Request) {})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	const n = 600
	for i := range n {
		req, _ := http.NewRequest(fmt.Sprintf("X%04d", i), srv.URL+"/any", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	var other uint64
	var unaggregated int64
	for deadline := time.Now().Add(testutil.Timeout(20 * time.Second)); ; time.Sleep(20 * time.Millisecond) {
		rm := collect(t, reader)
		other, _ = serverDuration(rm, func(a attribute.Set) bool {
			return is(a, semconv.HTTPRouteKey, "/any") && is(a, semconv.HTTPRequestMethodKey, "_OTHER")
		})
		unaggregated = 0
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				if d, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == "flowmill.http.requests.unaggregated" {
					for _, dp := range d.DataPoints {
						unaggregated += dp.Value
					}
				}
			}
		}
		if other >= n || unaggregated > 0 || time.Now().After(deadline) {
			break
		}
	}
	if other != n || unaggregated != 0 {
		t.Errorf("_OTHER requests counted %d, want %d; unaggregated %d, want 0", other, n, unaggregated)
	}
}
