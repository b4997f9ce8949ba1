package probe

import (
	"context"

	"go.opentelemetry.io/otel/trace"
)

// SpanIDs are the IDs a family wants the span it starts to have: those of
// the event it records, which the kernel side may have sent to other
// services already (the HTTP family's traceparent). A family passes them
// in the context of trace.Tracer.Start (ContextWithSpanIDs); the SDK hands
// that context to its ID generator, and flowmill.IDGenerator returns them.
// With another generator, the span gets the SDK's own IDs.
type SpanIDs struct {
	TraceID trace.TraceID // used when the span is a root
	SpanID  trace.SpanID
}

type spanIDsKey struct{}

// ContextWithSpanIDs returns ctx carrying ids for the next span started
// with it.
func ContextWithSpanIDs(ctx context.Context, ids SpanIDs) context.Context {
	return context.WithValue(ctx, spanIDsKey{}, ids)
}

// SpanIDsFromContext returns the IDs ctx carries, if any.
func SpanIDsFromContext(ctx context.Context) (SpanIDs, bool) {
	ids, ok := ctx.Value(spanIDsKey{}).(SpanIDs)
	return ids, ok && ids.SpanID.IsValid()
}
