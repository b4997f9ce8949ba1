package sql

import (
	"context"
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/flowmill/flowmill/internal/probe"
)

// metricDuration is the semantic conventions' database client metric.
const metricDuration = "db.client.operation.duration"

// durationBuckets are the semantic conventions' advisory boundaries.
var durationBuckets = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10}

// Telemetry maps the probe's statements to OpenTelemetry (see
// probe.Telemetry): a client span per statement, named per the database
// semantic conventions ("{db.operation.name} {db.collection.name}", or the
// operation alone, or db.system.name), with db.system.name,
// db.operation.name, db.collection.name, db.query.text (literals replaced)
// and error.type (the Go type of the error; the span's status is then an
// error); and db.client.operation.duration with the same attributes but
// the text.
//
// Each span is started with its event's IDs in the context
// (probe.ContextWithSpanIDs) and, when the statement belongs to a served
// request, as the child of that request's span IDs as the kernel made
// them: with flowmill.IDGenerator those are the IDs of the exported server
// span, so the statement is its child.
func (p *Probe) Telemetry(env *probe.TelemetryEnv) (probe.Recorder, error) {
	r := &recorder{tracer: env.Tracer}
	opts := []metric.Float64HistogramOption{metric.WithUnit("s"),
		metric.WithDescription("Duration of database client operations.")}
	if env.ExplicitBuckets {
		opts = append(opts, metric.WithExplicitBucketBoundaries(durationBuckets...))
	}
	var err error
	if r.duration, err = env.Meter.Float64Histogram(metricDuration, opts...); err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	if r.stmts, err = probe.Subscribe[Statement](env.Bus, env.Buffer); err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	return r, nil
}

type recorder struct {
	tracer   trace.Tracer
	duration metric.Float64Histogram
	stmts    *probe.Sub[Statement]
}

// Run records statements until stop is closed or the session ends.
func (r *recorder) Run(stop <-chan struct{}) error {
	defer r.stmts.Close()
	c := r.stmts.C()
	for {
		select {
		case <-stop:
			for {
				select {
				case s, ok := <-c:
					if !ok {
						return nil
					}
					r.record(&s)
				default:
					return nil
				}
			}
		case s, ok := <-c:
			if !ok {
				return nil
			}
			r.record(&s)
		}
	}
}

// SpanName is the span name the semantic conventions give a statement.
func SpanName(s *Statement) string {
	switch {
	case s.Operation != "" && s.Collection != "":
		return s.Operation + " " + s.Collection
	case s.Operation != "":
		return s.Operation
	case s.System != "":
		return s.System
	}
	return "other_sql"
}

func (r *recorder) record(s *Statement) {
	system := s.System
	if system == "" {
		system = "other_sql"
	}
	attrs := make([]attribute.KeyValue, 0, 6)
	attrs = append(attrs, semconv.DBSystemNameKey.String(system))
	if s.Operation != "" {
		attrs = append(attrs, semconv.DBOperationName(s.Operation))
	}
	if s.Collection != "" {
		attrs = append(attrs, semconv.DBCollectionName(s.Collection))
	}
	if s.Error != "" {
		attrs = append(attrs, semconv.ErrorTypeKey.String(s.Error))
	}
	r.duration.Record(context.Background(), s.Duration().Seconds(), metric.WithAttributes(attrs...))

	ctx := context.Background()
	if s.Span.ParentSpanID.IsValid() {
		flags := trace.TraceFlags(0)
		if s.Span.Sampled {
			flags = trace.FlagsSampled
		}
		ctx = trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: s.Span.TraceID, SpanID: s.Span.ParentSpanID, TraceFlags: flags}))
	}
	if s.Query != "" {
		attrs = append(attrs, semconv.DBQueryText(s.Query))
	}
	ids := probe.SpanIDs{TraceID: s.Span.TraceID, SpanID: s.Span.SpanID}
	_, span := r.tracer.Start(probe.ContextWithSpanIDs(ctx, ids), SpanName(s), trace.WithSpanKind(trace.SpanKindClient),
		trace.WithTimestamp(s.Start), trace.WithAttributes(attrs...))
	if s.Error != "" {
		span.SetStatus(codes.Error, s.Error)
	}
	span.End(trace.WithTimestamp(s.End))
}
