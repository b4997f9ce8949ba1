package probe

import (
	"go.opentelemetry.io/otel/log"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Telemetry is implemented by a probe family whose events have an
// OpenTelemetry mapping. The exporter (flowmill.NewExporter) calls it once
// per session for every selected family that implements it, and knows
// nothing else about the family: adding a family adds one Telemetry
// implementation (by convention in the family's otel.go) and touches
// neither the exporter nor any other family.
//
// A family's mapping, in order:
//
//  1. Telemetry creates the family's instruments with env.Meter (and, if
//     the family makes spans or log records, keeps env.Tracer or
//     env.Logger),
//     and subscribes to the family's own event types on env.Bus with
//     Subscribe and a buffer of env.Buffer. It does both synchronously, so
//     that no event published after NewExporter returns is missed, and
//     returns a Recorder. On error it releases what it acquired.
//  2. The exporter calls the Recorder's Run exactly once, on a goroutine
//     of its own. Run records events until stop is closed or the session
//     closes the subscriptions' channels; then it records what is still
//     buffered, closes its subscriptions, unregisters its callbacks and
//     returns. The exporter calls Run even when it gives up before
//     starting (a later family failed): then stop is already closed, and
//     Run only releases.
//
// Rules every mapping follows, so that the families compose:
//   - Instruments come from env.Meter only (one instrumentation scope for
//     the library: recommended views select on it). Instrument names are
//     the family's own (tcp.*, http.*, process.*), units are UCUM (s, By,
//     {connection}), durations are seconds in float64 histograms.
//   - Attribute keys are OpenTelemetry semantic conventions where one
//     exists; invented keys start with "flowmill.<family>.".
//   - Metric attributes have bounded cardinality and honour env.Attributes;
//     span attributes may be as precise as the event (ports, addresses).
//   - Histograms carry the family's bucket boundaries as advisory hints
//     (metric.WithExplicitBucketBoundaries) only when env.ExplicitBuckets
//     is set.
//   - Counters are monotonic: a family whose events carry cumulative
//     values records deltas and never counts a value twice.
//   - Run is the only goroutine that records the family's events; events
//     of different types arrive on different channels with no order
//     between them, so a family that needs one (an open before its close)
//     restores it itself, for instance by draining its other channels
//     before handling a terminal event.
//   - Spans for events that already happened carry the kernel's times
//     (trace.WithTimestamp on Start and End).
//   - Discrete events that a user wants one by one (an exec, an exit) are
//     log records with an event name (log.Record.SetEventName), the
//     kernel's time as their timestamp and the same attribute keys as the
//     family's spans and metrics; a family builds them only when
//     env.Logger.Enabled says they are wanted.
type Telemetry interface {
	// Telemetry creates the family's instruments, subscribes to its
	// events and returns the Recorder that will record them.
	Telemetry(env *TelemetryEnv) (Recorder, error)
}

// Recorder records one family's events into OpenTelemetry; see Telemetry.
type Recorder interface {
	// Run records until stop is closed or the family's subscriptions end,
	// records what is buffered, releases everything Telemetry acquired and
	// returns. It is called exactly once. The error reports a failure to
	// release (recording itself cannot fail in the OpenTelemetry API).
	Run(stop <-chan struct{}) error
}

// TelemetryEnv is what the exporter gives a family's Telemetry.
type TelemetryEnv struct {
	// Bus carries the session's events; subscribe with Subscribe.
	Bus *Bus
	// Buffer is the channel capacity for the family's subscriptions.
	Buffer int
	// Meter creates the family's instruments. Never nil.
	Meter metric.Meter
	// Tracer creates the family's spans. Never nil; whether a family
	// makes spans at all is the family's own option (tcp.WithSpans).
	Tracer trace.Tracer
	// Logger emits the family's log records (OpenTelemetry events). Never
	// nil; whether a family emits records at all is the family's own
	// option (process.WithLogRecords).
	Logger log.Logger
	// Attributes selects the metric attribute groups.
	Attributes Attributes
	// ExplicitBuckets asks for the family's explicit bucket boundaries as
	// advisory hints on its histograms; without it histograms carry no
	// hint and their aggregation is left to the SDK's views (base-2
	// exponential with flowmill/otelviews).
	ExplicitBuckets bool
}

// Attributes selects groups of metric attributes. Attributes that identify
// a single connection (a client's ephemeral port) are never in any group:
// they would make a time series per connection. Each family documents the
// keys a group stands for in its events.
type Attributes uint32

const (
	// AttrPeerAddress: the remote address (network.peer.address). Bounded
	// by the number of distinct peers, which is large for a public server.
	AttrPeerAddress Attributes = 1 << iota
	// AttrServerPort: the server-side port of a connection: the local port
	// of an accepted connection (network.local.port), the remote port of
	// an outgoing one (network.peer.port).
	AttrServerPort
	// AttrExecutable: the process's executable name
	// (process.executable.name).
	AttrExecutable
	// AttrPID: the process ID (process.pid). Not in DefaultAttributes: one
	// value per process is fine for a service observing itself, but
	// unbounded over time on a host where short-lived processes connect.
	AttrPID

	// DefaultAttributes is what the exporter uses unless told otherwise.
	DefaultAttributes = AttrPeerAddress | AttrServerPort | AttrExecutable
	// AllAttributes is every group.
	AllAttributes = AttrPeerAddress | AttrServerPort | AttrExecutable | AttrPID
)

// Has reports whether every group of g is selected in a.
func (a Attributes) Has(g Attributes) bool { return a&g == g }
