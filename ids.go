package flowmill

import (
	"context"
	"encoding/binary"
	"math/rand/v2"

	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
)

// IDGenerator is an OpenTelemetry SDK ID generator (it implements the
// sdk/trace IDGenerator interface) that gives the spans the exporter
// records from flowmill's events the IDs of those events, and every other
// span random IDs, as the SDK's default generator does:
//
//	tp := sdktrace.NewTracerProvider(sdktrace.WithIDGenerator(flowmill.IDGenerator{}), ...)
//
// The HTTP family sends its client spans' IDs downstream in traceparent
// before the spans are exported; with this generator the exported spans
// carry those same IDs, so that a trace crossing services (this one, the
// next, instrumented by flowmill or any OpenTelemetry SDK) joins up in the
// backend. With the SDK's default generator, the exported spans keep
// their structure within this service but carry other IDs than the ones
// sent: the services called start subtrees whose parents are missing.
type IDGenerator struct{}

// NewIDs returns the trace and span IDs the event being recorded carries,
// or random ones.
func (IDGenerator) NewIDs(ctx context.Context) (trace.TraceID, trace.SpanID) {
	if ids, ok := probe.SpanIDsFromContext(ctx); ok && ids.TraceID.IsValid() {
		return ids.TraceID, ids.SpanID
	}
	var tid trace.TraceID
	for !tid.IsValid() {
		binary.NativeEndian.PutUint64(tid[:8], rand.Uint64())
		binary.NativeEndian.PutUint64(tid[8:], rand.Uint64())
	}
	return tid, randomSpanID()
}

// NewSpanID returns the span ID the event being recorded carries, or a
// random one.
func (IDGenerator) NewSpanID(ctx context.Context, _ trace.TraceID) trace.SpanID {
	if ids, ok := probe.SpanIDsFromContext(ctx); ok {
		return ids.SpanID
	}
	return randomSpanID()
}

func randomSpanID() trace.SpanID {
	var sid trace.SpanID
	for !sid.IsValid() {
		binary.NativeEndian.PutUint64(sid[:], rand.Uint64())
	}
	return sid
}
