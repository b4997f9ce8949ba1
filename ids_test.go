package flowmill

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
)

// TestIDGenerator: the IDs a context carries, else random, valid and
// distinct ones.
func TestIDGenerator(t *testing.T) {
	var g IDGenerator
	ids := probe.SpanIDs{TraceID: trace.TraceID{1, 2}, SpanID: trace.SpanID{3}}
	ctx := probe.ContextWithSpanIDs(context.Background(), ids)
	if tid, sid := g.NewIDs(ctx); tid != ids.TraceID || sid != ids.SpanID {
		t.Errorf("NewIDs: %s %s, want %s %s", tid, sid, ids.TraceID, ids.SpanID)
	}
	if sid := g.NewSpanID(ctx, trace.TraceID{9}); sid != ids.SpanID {
		t.Errorf("NewSpanID: %s, want %s", sid, ids.SpanID)
	}
	seen := map[any]bool{}
	for range 1000 {
		tid, sid := g.NewIDs(context.Background())
		sid2 := g.NewSpanID(context.Background(), tid)
		if !tid.IsValid() || !sid.IsValid() || !sid2.IsValid() || seen[tid] || seen[sid] || seen[sid2] {
			t.Fatalf("IDs %s %s %s: invalid or repeated", tid, sid, sid2)
		}
		seen[tid], seen[sid], seen[sid2] = true, true, true
	}
}
