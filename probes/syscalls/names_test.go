//go:build linux

package syscalls

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

func TestNames(t *testing.T) {
	for nr, name := range map[Syscall]string{0: "read", 39: "getpid", 231: "exit_group", 257: "openat", 435: "clone3"} {
		if got := nr.String(); got != name {
			t.Errorf("%d: got %q, want %q", nr, got, name)
		}
		if got, ok := ByName(name); !ok || got != nr {
			t.Errorf("ByName(%q) = %d, %v; want %d", name, got, ok, nr)
		}
	}
	if got := Syscall(1000).String(); got != "syscall_1000" {
		t.Errorf("unknown number: %q", got)
	}
	if _, ok := ByName("no_such_call"); ok {
		t.Error("ByName of an unknown name succeeded")
	}
}

func TestSeccompProfile(t *testing.T) {
	used := []Count{{0, 5}, {39, 1000}, {257, 300}, {231, 1}, {3, 0}, {1000, 2}}
	p, unnamed := SeccompProfile(used)
	js, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{"names":["exit_group","getpid","openat","read"],"action":"SCMP_ACT_ALLOW"}]}`
	if string(js) != want {
		t.Errorf("got  %s\nwant %s", js, want)
	}
	if len(unnamed) != 1 || unnamed[0] != 1000 {
		t.Errorf("unnamed: %v", unnamed)
	}
	// Nothing observed: a profile that allows nothing, still valid JSON.
	p, _ = SeccompProfile(nil)
	js, _ = json.Marshal(p)
	if want := `{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],"syscalls":[{"names":[],"action":"SCMP_ACT_ALLOW"}]}`; string(js) != want {
		t.Errorf("empty: %s", js)
	}
}

func TestCountsOf(t *testing.T) {
	c := Counts{Syscalls: []Count{{0, 5}, {39, 1000}, {257, 300}}}
	for s, n := range map[Syscall]uint64{0: 5, 39: 1000, 257: 300, 1: 0, 500: 0} {
		if got := c.Of(s); got != n {
			t.Errorf("Of(%d) = %d, want %d", s, got, n)
		}
	}
}

// TestAggregate checks how cumulative kernel counters become per-process
// Counts and totals, without the kernel.
func TestAggregate(t *testing.T) {
	bus := probe.NewBus()
	a := newAttachment(probe.Produce[Counts](bus), 2)
	g := a.agg
	g.update(syscallsBPFScKey{Tgid: 10, Nr: 39}, 5)
	g.update(syscallsBPFScKey{Tgid: 10, Nr: 0}, 2)
	g.update(syscallsBPFScKey{Tgid: 11, Nr: 39}, 1)
	g.update(syscallsBPFScKey{Tgid: 10, Nr: 39}, 8) // read again: +3
	g.update(syscallsBPFScKey{Tgid: 10, Nr: ncalls}, 1)
	if g.totals[39] != 9 || g.totals[0] != 2 {
		t.Errorf("totals: getpid %d read %d", g.totals[39], g.totals[0])
	}
	c := counts(time.Time{}, 10, g.procs[10], false)
	if c.Of(39) != 8 || c.Of(0) != 2 || len(c.Syscalls) != 2 || c.Syscalls[0].Syscall != 0 {
		t.Errorf("process 10: %+v", c)
	}
	// The counter went back: its entry was freed and made again.
	g.update(syscallsBPFScKey{Tgid: 10, Nr: 39}, 1)
	if g.totals[39] != 10 {
		t.Errorf("after reuse: getpid total %d, want 10", g.totals[39])
	}
}
