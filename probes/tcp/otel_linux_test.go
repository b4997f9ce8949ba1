//go:build linux

package tcp

import (
	"testing"

	"github.com/flowmill/flowmill/internal/probe"
)

// tcp.active counts the connections the probe knows to be open, so it does
// not drift upward when a close never reaches the recorder: its ConnClosed
// dropped from a full subscription, or never sent because the kernel
// evicted the flow from its table.
func TestActiveDoesNotDrift(t *testing.T) {
	bus := probe.NewBus()
	a := testAttachment(bus)
	probe.Provide[openConns](bus, a.poller)
	h := newHarnessOn(t, bus, nil, 1, allAttrs)
	record := func(id uint64, kind uint8) {
		e := sampleEvent()
		e.FlowId, e.Kind = id, kind
		e.Tuple.Lport += uint16(id)
		a.handle(encode(t, &e))
	}
	const n = 10
	for id := range uint64(n) {
		record(id+1, kindOpen)
		h.rec.drain() // every open is recorded
	}
	if got := h.active(t); got != n {
		t.Fatalf("tcp.active = %d with %d connections open", got, n)
	}
	for id := range uint64(n) {
		record(id+1, kindClose) // a subscription of 1: all but one dropped
	}
	h.rec.drain()
	if got := h.active(t); got != 0 {
		t.Errorf("tcp.active = %d after %d closes of which the recorder missed %d", got, n, h.rec.closed.Dropped())
	}

	// Flows the kernel evicted: no close will come, the sweep of the
	// kernel's table (here: found empty) forgets them.
	for id := range uint64(n) {
		record(n+id+1, kindOpen)
	}
	h.rec.drain()
	if got := h.active(t); got != n {
		t.Fatalf("tcp.active = %d with %d connections open", got, n)
	}
	a.poller.sweep = func() error {
		a.poller.reconcile(a.poller.mark(), func(uint64) bool { return false })
		return nil
	}
	if got := h.active(t); got != 0 {
		t.Errorf("tcp.active = %d after the kernel evicted every flow", got)
	}
}
