package http

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// The request metrics are aggregated in the kernel (bpf/http.c, red): for
// every request, sampled or not, the series of its metric attributes gets
// its duration in a log-linear histogram whose buckets each keep a count
// and a sum. Nothing is sent per request for metrics.

// redBucketCount is RED_BUCKETS of bpf/http.c.
const redBucketCount = 256

// redBucket is one bucket of a series: how many requests fell in it and
// the sum of their durations, in nanoseconds. Cumulative.
type redBucket struct {
	Count, SumNs uint64
}

// redBuckets is the histogram of a series (struct red_hist).
type redBuckets [redBucketCount]redBucket

// requestSeries is what the metric attributes of a series are made from:
// a served request's fields (Server set) or a sent one's.
type requestSeries struct {
	IsServer bool
	Server   ServerRequest
	Client   ClientRequest
}

// requestTotals is where the recorder reads the kernel's series: the
// probe's attachment, or a test's fake.
type requestTotals interface {
	// eachSeries calls fn for every series with an ID that stays the
	// same for the series while the attachment lives, its attribute
	// fields (decoded at the first call for the ID) and its cumulative
	// buckets (valid during the call only).
	eachSeries(fn func(id string, s func() (requestSeries, bool), b *redBuckets)) error
	// unaggregated counts the requests not counted in any series: the
	// kernel's table of series was full.
	unaggregated() uint64
}

// Metric of the requests the kernel could not aggregate.
const metricUnaggregated = "flowmill.http.requests.unaggregated"

// redState is the recorder's side of the kernel's series: the last
// cumulative buckets seen of each, to record the growth since.
type redState struct {
	mu     sync.Mutex
	src    func() requestTotals // the attachment now; nil: none
	series map[string]*seriesState
	reg    metric.Registration
	lost   metric.Int64ObservableCounter
}

type seriesState struct {
	server bool
	set    metric.MeasurementOption
	last   redBuckets
}

// maxSeries bounds what the recorder keeps of the series (the kernel's
// table holds 512).
const maxSeries = 4096

// registerRED makes the metrics' collection pull the kernel's series: the
// SDK runs callbacks before it reads the synchronous instruments, so the
// growth recorded from the callback is in the same collection.
func (r *recorder) registerRED(m metric.Meter) error {
	var err error
	r.red.series = make(map[string]*seriesState)
	r.red.lost, err = m.Int64ObservableCounter(metricUnaggregated, metric.WithUnit("{request}"),
		metric.WithDescription("HTTP requests not counted in the request metrics: the kernel's table of series was full."))
	if err != nil {
		return err
	}
	r.red.reg, err = m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		src, err := r.pull(ctx)
		if src != nil {
			o.ObserveInt64(r.red.lost, int64(src.unaggregated()))
		}
		return err
	}, r.red.lost)
	return err
}

// pull records the growth of every series since the last pull: each
// bucket's new requests at the mean of their durations, which lies in
// the bucket, so that the count and the sum are exact and each request
// is in its bucket at the kernel's resolution (1/8 of a power of two).
func (r *recorder) pull(ctx context.Context) (requestTotals, error) {
	r.red.mu.Lock()
	defer r.red.mu.Unlock()
	if r.red.src == nil {
		return nil, nil
	}
	src := r.red.src()
	if src == nil {
		return nil, nil
	}
	err := src.eachSeries(func(id string, decode func() (requestSeries, bool), b *redBuckets) {
		st := r.red.series[id]
		if st == nil {
			s, ok := decode()
			if !ok {
				return
			}
			if len(r.red.series) >= maxSeries {
				return // counted by none: the kernel holds far fewer
			}
			st = &seriesState{server: s.IsServer}
			if s.IsServer {
				st.set = metric.WithAttributeSet(attribute.NewSet(serverMetricAttrs(&s.Server)...))
			} else {
				st.set = metric.WithAttributeSet(attribute.NewSet(clientMetricAttrs(&s.Client)...))
			}
			r.red.series[id] = st
		}
		h := r.client
		if st.server {
			h = r.server
		}
		for i := range b {
			n, sum := b[i].Count-st.last[i].Count, b[i].SumNs-st.last[i].SumNs
			if b[i].Count < st.last[i].Count || n == 0 {
				continue
			}
			v := float64(sum) / float64(n) / 1e9
			for range n {
				h.Record(ctx, v, st.set)
			}
		}
		st.last = *b
	})
	if err != nil {
		return src, fmt.Errorf("http: reading the request metrics: %w", err)
	}
	return src, nil
}

// Sampling from the environment, as the OpenTelemetry SDKs read it.
const (
	envSampler    = "OTEL_TRACES_SAMPLER"
	envSamplerArg = "OTEL_TRACES_SAMPLER_ARG"
)

// samplingFromEnv returns the ratio of the sampler the environment names
// and whether it names one flowmill can apply in the kernel. The kernel's
// decision is always the parent's when there is one (parentbased_*);
// traceidratio and always_off are taken as their parent-based forms,
// always_on as no sampling. A ratio that does not parse is 1, as the SDK
// takes it.
func samplingFromEnv() (float64, bool) {
	ratio := func() float64 {
		v, err := strconv.ParseFloat(strings.TrimSpace(os.Getenv(envSamplerArg)), 64)
		if err != nil || v < 0 || v > 1 {
			return 1
		}
		return v
	}
	switch strings.TrimSpace(os.Getenv(envSampler)) {
	case "parentbased_always_on":
		return 1, true
	case "always_off", "parentbased_always_off":
		return 0, true
	case "traceidratio", "parentbased_traceidratio":
		return ratio(), true
	}
	return 1, false
}

// sampleBound is the kernel's bound for ratio: the SDK's
// TraceIDRatioBased upper bound, ratio * 2^63 (every trace at 1).
func sampleBound(ratio float64) uint64 {
	if ratio >= 1 {
		return 1 << 63
	}
	if ratio <= 0 {
		return 0
	}
	return uint64(ratio * (1 << 63))
}
