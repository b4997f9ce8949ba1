// Package otelviews holds the OpenTelemetry SDK views flowmill recommends.
//
// It is a package of its own because views are an SDK (sdk/metric)
// concept, while package flowmill depends on the OpenTelemetry API only: a
// service that configures its MeterProvider imports this package next to
// the SDK it already uses, and a library that only records pays for
// neither.
//
//	mp := sdkmetric.NewMeterProvider(
//		sdkmetric.WithReader(reader),
//		sdkmetric.WithView(otelviews.Views()...),
//	)
package otelviews

import (
	"go.opentelemetry.io/otel/sdk/instrumentation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/flowmill/flowmill"
)

// Views aggregates every histogram flowmill records (RTT, connection
// duration, and those of families added later) as a base-2 exponential
// histogram: no bucket layout to choose, relative error bounded by the
// scale (at most 160 buckets, scale at most 20). Exported through the OTel
// Prometheus exporter they become Prometheus native histograms.
//
// Do not combine them with flowmill.WithExplicitBuckets, which asks for
// explicit buckets: a view overrides the instrument's hints.
func Views() []sdkmetric.View {
	return []sdkmetric.View{
		sdkmetric.NewView(
			sdkmetric.Instrument{
				Kind:  sdkmetric.InstrumentKindHistogram,
				Scope: instrumentation.Scope{Name: flowmill.ScopeName},
			},
			sdkmetric.Stream{Aggregation: sdkmetric.AggregationBase2ExponentialHistogram{MaxSize: 160, MaxScale: 20}},
		),
	}
}
