package syscalls

import (
	"bytes"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/flowmill/flowmill/internal/testutil"
)

// TestLoadsWithoutThreadInfoStatus loads the object against this kernel's
// types with thread_info.status removed, as on arm64 (it is x86's): the
// ia32 check must resolve to "no" instead of failing the CO-RE relocation.
func TestLoadsWithoutThreadInfoStatus(t *testing.T) {
	testutil.RequireBPF(t)
	kspec, err := btf.LoadKernelSpec()
	if err != nil {
		testutil.Unavailable(t, "kernel BTF: %v", err)
	}
	var ti *btf.Struct
	if err := kspec.TypeByName("thread_info", &ti); err != nil {
		t.Fatal(err)
	}
	ti = btf.Copy(ti).(*btf.Struct)
	var members []btf.Member
	for _, m := range ti.Members {
		if m.Name != "status" {
			members = append(members, m)
		}
	}
	if len(members) == len(ti.Members) {
		t.Skip("this kernel's thread_info has no status field: the normal load covers it")
	}
	ti.Members = members

	b, err := btf.NewBuilder(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for typ, err := range kspec.All() {
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := typ.(*btf.Struct); ok && s.Name == "thread_info" {
			typ = ti
		}
		if _, err := b.Add(typ); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	types, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}

	spec, err := loadSyscallsBPF()
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
