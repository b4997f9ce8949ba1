package testutil

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/arch/x86/x86asm"
)

// OwnStack loads spec and checks that none of its programs runs on a
// per-CPU private stack (Linux 6.13+), which another task's run of the same
// preempted uprobe program would overwrite (see bpf/include/ownstack.h).
// The x86 JIT makes R9 the frame pointer of a private stack, adding the
// CPU's offset (%gs-relative) to it; a per-CPU map lookup adds it to
// another register. A kernel that does not give JITed code cannot have
// private stacks (they came later), so there is nothing to check.
func OwnStack(t *testing.T, spec *ebpf.CollectionSpec) {
	t.Helper()
	RequireBPF(t)
	if err := rlimit.RemoveMemlock(); err != nil { // before 5.11: memlock-accounted maps
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	for name, p := range coll.Programs {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		code, ok := info.JitedInsns()
		if !ok {
			t.Logf("%s: the kernel gives no JITed code; nothing to check", name)
			continue
		}
		for off := 0; off < len(code); {
			in, err := x86asm.Decode(code[off:], 64)
			if err != nil {
				off++
				continue
			}
			if m, ok := in.Args[1].(x86asm.Mem); ok && in.Op == x86asm.ADD && in.Args[0] == x86asm.R9 && m.Segment == x86asm.GS {
				t.Errorf("%s: %v at %#x: a per-CPU private stack", name, in, off)
			}
			off += in.Len
		}
	}
}
