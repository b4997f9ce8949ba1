package grpc

import (
	"testing"

	"github.com/cilium/ebpf/asm"

	"github.com/flowmill/flowmill/internal/testutil"
)

// TestPortable checks the object for what Linux 5.10 lacks, and that
// nothing writes the program's memory (kernel lockdown refuses
// bpf_probe_write_user).
func TestPortable(t *testing.T) {
	spec, err := loadGrpcBPF()
	if err != nil {
		t.Fatal(err)
	}
	testutil.Portable(t, spec)
	for pn, p := range spec.Programs {
		for i, ins := range p.Instructions {
			if ins.IsBuiltinCall() && asm.BuiltinFunc(ins.Constant) == asm.FnProbeWriteUser {
				t.Errorf("program %s, instruction %d: bpf_probe_write_user", pn, i)
			}
		}
	}
}

// TestOwnStack: no program runs on a per-CPU private stack (see
// bpf/include/ownstack.h).
func TestOwnStack(t *testing.T) {
	spec, err := loadGrpcBPF()
	if err != nil {
		t.Fatal(err)
	}
	testutil.OwnStack(t, spec)
}
