package flowmill

import "fmt"

// Stats counts what the session read and everything it lost or could not
// see. Every loss is one of these counters; none is silent. The exporter
// (NewExporter) exports each as a health counter, named in its field's
// comment.
type Stats struct {
	// EventsRead is records read from the kernel ring buffers
	// (flowmill.events.read).
	EventsRead uint64
	// EventsLost is records the kernel dropped because a ring buffer was
	// full (flowmill.events.lost). Raise WithRingBufferSize or lower
	// WithMaxLatency if it grows.
	EventsLost uint64
	// Evicted is entries pushed out of bounded kernel maps (in-flight
	// flows or requests, for instance) before they could be reported
	// (flowmill.flows.evicted). Raise the family's bound (tcp.WithMaxFlows,
	// http.WithMaxInFlight, ...).
	Evicted uint64
	// Dropped is events subscribers missed because their channel was full
	// (the sum of every Subscription.Dropped, past and present, the
	// exporter's included: flowmill.events.dropped).
	Dropped uint64
	// Missed is hook hits the kernel skipped because one of the probes'
	// programs was already running on that CPU (flowmill.hooks.missed). On
	// kernels that preempt eBPF programs (7.x by default) it grows under
	// load; the kernel does not say whether a skipped hit was in scope,
	// so it is not part of EventsLost. The hooks where a skip would lose
	// an event that cannot come again, process exits (probes/process,
	// probes/syscalls) and a TCP socket's transitions and destruction
	// (probes/tcp), each have two programs, so that a skip of one loses
	// nothing; it is counted here all the same. Linux 5.12 and later.
	Missed uint64
	// Malformed is records that could not be decoded and were dropped
	// (flowmill.events.malformed). It is a defect: please report it.
	Malformed uint64
	// Incomplete is events delivered with fields the kernel could not read
	// (flowmill.events.incomplete); each event type says how it marks
	// them.
	Incomplete uint64
	// Unsupported is activity in scope the probes saw but do not
	// instrument, such as outgoing HTTPS requests that cannot carry
	// injected trace context, or accepted connections of a listener the
	// TCP family could not resolve
	// (flowmill.events.unsupported).
	Unsupported uint64
	// PollsFailed is periodic reads of kernel state that failed for part
	// of the scope (flowmill.polls.failed): a network namespace the TCP
	// family could not enter, for instance, whose connections then miss
	// that round's ConnStats.
	PollsFailed uint64
}

// Stats reads the session's counters. Before Start they are zero; after
// Close they are the final counts, taken when the probes stopped.
func (s *Session) Stats() (Stats, error) {
	s.statsMu.RLock()
	defer s.statsMu.RUnlock()
	if s.final != nil {
		st := *s.final
		st.Dropped = s.bus.Dropped()
		return st, nil
	}
	return s.live()
}

// live reads the attachments' counters; s.statsMu is held.
func (s *Session) live() (Stats, error) {
	st := Stats{EventsRead: s.read.Load(), Dropped: s.bus.Dropped()}
	for _, a := range s.atts {
		ps, err := a.att.Stats()
		if err != nil {
			return st, fmt.Errorf("flowmill: stats of probe %s: %w", a.name, err)
		}
		st.EventsLost += ps.Lost
		st.Evicted += ps.Evicted
		st.Missed += ps.Missed
		st.Malformed += ps.Malformed
		st.Incomplete += ps.Incomplete
		st.Unsupported += ps.Unsupported
		st.PollsFailed += ps.PollsFailed
	}
	return st, nil
}
