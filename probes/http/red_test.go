package http

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// The kernel's rule (bpf/http.c, root_sampled: the upper 63 bits of the
// trace ID's last 8 bytes, big-endian, below sampleBound) takes the SDK's
// TraceIDRatioBased decision on every trace ID.
func TestSampleBoundMatchesSDK(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, ratio := range []float64{0, 1e-9, 0.1, 0.5, 0.999, 1} {
		s := sdktrace.TraceIDRatioBased(ratio)
		bound := sampleBound(ratio)
		for range 20000 {
			var tid trace.TraceID
			binary.LittleEndian.PutUint64(tid[:8], rng.Uint64())
			binary.LittleEndian.PutUint64(tid[8:], rng.Uint64())
			kernel := binary.BigEndian.Uint64(tid[8:])>>1 < bound
			sdk := s.ShouldSample(sdktrace.SamplingParameters{TraceID: tid}).Decision == sdktrace.RecordAndSample
			if kernel != sdk {
				t.Fatalf("ratio %v, trace %s: kernel %v, SDK %v", ratio, tid, kernel, sdk)
			}
		}
	}
}

func TestSamplingFromEnv(t *testing.T) {
	for _, tc := range []struct {
		sampler, arg string
		ratio        float64
		on           bool
	}{
		{"", "", 1, false},
		{"always_on", "", 1, false},
		{"parentbased_always_on", "", 1, true},
		{"always_off", "", 0, true},
		{"parentbased_always_off", "", 0, true},
		{"traceidratio", "0.25", 0.25, true},
		{"parentbased_traceidratio", "0.1", 0.1, true},
		{"parentbased_traceidratio", "x", 1, true},
		{"parentbased_traceidratio", "1.5", 1, true},
		{"jaeger_remote", "", 1, false},
	} {
		t.Setenv(envSampler, tc.sampler)
		t.Setenv(envSamplerArg, tc.arg)
		if r, on := samplingFromEnv(); r != tc.ratio || on != tc.on {
			t.Errorf("%s=%q %s=%q: ratio %v sampling %v, want %v %v", envSampler, tc.sampler, envSamplerArg, tc.arg, r, on, tc.ratio, tc.on)
		}
		if p := New(); p.sampling != tc.on || p.sampleRatio != tc.ratio {
			t.Errorf("New() under %s=%q: %v %v", envSampler, tc.sampler, p.sampling, p.sampleRatio)
		}
	}
	t.Setenv(envSampler, "always_off")
	if p := New(WithSampling(0.5)); !p.sampling || p.sampleRatio != 0.5 {
		t.Errorf("WithSampling does not override the environment: %v %v", p.sampling, p.sampleRatio)
	}
}
