package syscalls

import (
	"bytes"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/flowmill/flowmill/internal/testutil"
)

// TestLoadsWithoutThreadInfoStatus loads the object against kernel types
// without thread_info.status, as on arm64 (it is x86's): the ia32 check
// must resolve to "no" instead of failing the CO-RE relocation. The kernel
// types are the object's own task_struct (the fields it reads, from
// vmlinux.h) with that field removed: small, so the test is quick also in
// an emulated VM, and enough to load the programs, which are never
// attached.
func TestLoadsWithoutThreadInfoStatus(t *testing.T) {
	testutil.RequireBPF(t)
	if err := rlimit.RemoveMemlock(); err != nil { // before 5.11, maps count against it
		t.Fatal(err)
	}
	spec, err := loadSyscallsBPF()
	if err != nil {
		t.Fatal(err)
	}
	// task_struct is what the programs read; a copy of it brings its own
	// copy of thread_info, without status.
	var task *btf.Struct
	if err := spec.Types.TypeByName("task_struct", &task); err != nil {
		t.Fatal(err)
	}
	task = btf.Copy(task).(*btf.Struct)
	removed := false
	for _, m := range task.Members {
		if ti, ok := m.Type.(*btf.Struct); ok && ti.Name == "thread_info" {
			n := len(ti.Members)
			ti.Members = slices.DeleteFunc(ti.Members, func(m btf.Member) bool { return m.Name == "status" })
			removed = len(ti.Members) < n
		}
	}
	if !removed {
		t.Fatal("the object's task_struct has no thread_info.status: is the ia32 check gone?")
	}
	b, err := btf.NewBuilder([]btf.Type{task}, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	types, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	var objs syscallsBPFObjects
	opts := &ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{KernelTypes: types}}
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		t.Fatalf("loading without thread_info.status: %v", err)
	}
	objs.Close()
}
