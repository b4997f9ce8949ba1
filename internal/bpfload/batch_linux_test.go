//go:build linux

package bpfload

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/testutil"
)

// bpfCalls counts the bpf() system calls this process makes, with a
// program on the sys_enter raw tracepoint: the returned function reads the
// count (its own lookup included).
func bpfCalls(t *testing.T) func() uint64 {
	t.Helper()
	counter, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { counter.Close() })
	prog, err := rawTracepoint("count_bpf",
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.FnGetCurrentPidTgid.Call(),
		asm.RSh.Imm(asm.R0, 32),
		asm.JNE.Imm(asm.R0, int32(os.Getpid()), "out"),
		asm.LoadMem(asm.R1, asm.R6, 8, asm.DWord), // args[1]: the system call number
		asm.JNE.Imm(asm.R1, unix.SYS_BPF, "out"),
		asm.StoreImm(asm.R10, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, counter.FD()),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"),
		asm.Return(),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	links, err := AttachRawTracepoints(RawTracepoint{Name: "sys_enter", Program: prog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { CloseLinks(links) })
	return func() uint64 {
		var n uint64
		if err := counter.Lookup(uint32(0), &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// CountKeys reads a map of thousands of entries in a handful of batch
// lookups (it made one system call per entry before), and counts the same
// by walking the keys where the kernel has no batch lookups.
func TestCountKeys(t *testing.T) {
	testutil.RequireBPF(t)
	testutil.CheckStart(t, Check())
	calls := bpfCalls(t)
	const n = 10000
	for _, typ := range []ebpf.MapType{ebpf.Hash, ebpf.LRUHash} {
		t.Run(typ.String(), func(t *testing.T) {
			m, err := ebpf.NewMap(&ebpf.MapSpec{Type: typ, KeySize: 8, ValueSize: 40, MaxEntries: 2 * n})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			keys := make([]uint64, n)
			for i := range keys {
				keys[i] = uint64(i)*7919 + 1
			}
			if _, err := m.BatchUpdate(keys, make([][40]byte, n), nil); err != nil {
				t.Fatal(err)
			}
			before := calls()
			got, err := CountKeys(m)
			used := calls() - before - 1
			if err != nil || got != n {
				t.Fatalf("CountKeys = %d, %v; want %d", got, err, n)
			}
			if max := uint64(n/batchSize + 4); used > max {
				t.Errorf("CountKeys made %d bpf() calls for %d entries, want at most %d", used, n, max)
			}
			t.Logf("%d entries counted with %d bpf() calls", n, used)

			unsupported := func(*ebpf.Map) (int64, error) { return 0, fmt.Errorf("no batches: %w", ebpf.ErrNotSupported) }
			before = calls()
			if got, err := countKeys(m, unsupported); err != nil || got != n {
				t.Errorf("walking the keys: %d, %v; want %d", got, err, n)
			}
			t.Logf("walking the keys instead: %d bpf() calls", calls()-before-1)

			seen := map[uint64]bool{}
			walkAll := func(keys []uint64, values [][40]byte) error {
				for _, k := range keys {
					seen[k] = true
				}
				return nil
			}
			if err := Walk(m, walkAll); err != nil || len(seen) != n {
				t.Errorf("Walk saw %d keys (%v), want %d", len(seen), err, n)
			}
			clear(seen)
			noBatches := func(*ebpf.Map, func(int) (any, any), func(int) error) error {
				return fmt.Errorf("no batches: %w", ebpf.ErrNotSupported)
			}
			if err := walkWith(m, noBatches, nil, walkAll); err != nil || len(seen) != n {
				t.Errorf("Walk without batches saw %d keys (%v), want %d", len(seen), err, n)
			}
			// A Walker sees the same, walk after walk, from the same
			// buffers.
			var w Walker[uint64, [40]byte]
			for i := range 3 {
				clear(seen)
				if err := w.Walk(m, walkAll); err != nil || len(seen) != n {
					t.Errorf("Walker walk %d saw %d keys (%v), want %d", i, len(seen), err, n)
				}
			}
			allocated := func(f func()) uint64 {
				var a, b runtime.MemStats
				runtime.ReadMemStats(&a)
				f()
				runtime.ReadMemStats(&b)
				return b.TotalAlloc - a.TotalAlloc
			}
			fresh := allocated(func() { Walk(m, walkAll) })
			kept := allocated(func() { w.Walk(m, walkAll) })
			t.Logf("bytes allocated by a walk: Walk %d, Walker %d", fresh, kept)
			if kept*4 > fresh {
				t.Errorf("a Walker's walk allocated %d bytes, Walk's %d: its buffers are not kept", kept, fresh)
			}
		})
	}
}
