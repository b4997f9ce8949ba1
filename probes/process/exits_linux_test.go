package process

import "testing"

// TestRecentExits: a process's second Exit is recognised; a PID reused by a
// later process is not; old processes are forgotten, so the set stays
// bounded.
func TestRecentExits(t *testing.T) {
	var r recentExits
	if !r.add(exitKey{7, 100}) || r.add(exitKey{7, 100}) {
		t.Fatal("the second exit of one process was not recognised")
	}
	if !r.add(exitKey{7, 200}) {
		t.Fatal("a reused PID's exit was taken for a duplicate")
	}
	for i := range len(r.ring) {
		r.add(exitKey{uint32(1000 + i), 1})
	}
	if len(r.seen) != len(r.ring) {
		t.Fatalf("%d remembered, want %d", len(r.seen), len(r.ring))
	}
	if !r.add(exitKey{7, 100}) {
		t.Error("an exit older than the window is still remembered")
	}
}
