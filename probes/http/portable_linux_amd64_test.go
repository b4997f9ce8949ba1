package http

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/flowmill/flowmill/internal/testutil"
)

// TestPortable checks the objects for what Linux 5.10 lacks.
func TestPortable(t *testing.T) {
	for name, load := range map[string]func() (*ebpf.CollectionSpec, error){"http": loadHttpBPF, "propagate": loadPropagateBPF, "h2learn": loadH2learnBPF} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		t.Run(name, func(t *testing.T) {
			testutil.Portable(t, spec)
			// Nothing writes the program's memory: kernel lockdown
			// (integrity) refuses bpf_probe_write_user.
			for pn, p := range spec.Programs {
				for i, ins := range p.Instructions {
					if ins.IsBuiltinCall() && asm.BuiltinFunc(ins.Constant) == asm.FnProbeWriteUser {
						t.Errorf("program %s, instruction %d: bpf_probe_write_user", pn, i)
					}
				}
			}
		})
	}
}

// TestOwnStack: no uprobe program runs on a per-CPU private stack (see
// bpf/include/ownstack.h).
func TestOwnStack(t *testing.T) {
	for _, load := range []func() (*ebpf.CollectionSpec, error){loadHttpBPF, loadH2learnBPF} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		testutil.OwnStack(t, spec)
	}
}
