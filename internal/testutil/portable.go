//go:build linux

package testutil

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Linux 5.10 is the oldest kernel flowmill supports. What it has, for
// Portable; newer kernels have all of it.
const (
	// lastHelper510 is the last helper function of Linux 5.10
	// (bpf_redirect_peer, 155). After it: bpf_task_storage_get and
	// bpf_get_current_task_btf (5.11), bpf_for_each_map_elem and
	// bpf_snprintf (5.13), bpf_get_func_ip and bpf_task_pt_regs (5.15),
	// bpf_loop (5.17), ...
	lastHelper510 = 155
)

// mapTypes510 are the map types the objects may use (all in Linux 5.8).
var mapTypes510 = map[ebpf.MapType]bool{
	ebpf.SockHash:     true, // 4.18
	ebpf.Hash:         true,
	ebpf.Array:        true,
	ebpf.PerCPUHash:   true,
	ebpf.PerCPUArray:  true,
	ebpf.CGroupArray:  true,
	ebpf.LRUHash:      true,
	ebpf.RingBuf:      true, // 5.8
	ebpf.ProgramArray: true, // 4.2 (bpf/include/goprobe.h: no private stack)
}

// rawTracepointArgs510 is the number of arguments (TP_PROTO) of each raw
// tracepoint the objects attach to, on the kernel where it has the fewest
// (Linux 5.10): a program reading ctx->args[n] for n at or past it fails to
// attach there with EINVAL. sched_process_exit gained group_dead in 6.16,
// tcp_send_reset its reason in 6.10: neither may be read.
var rawTracepointArgs510 = map[string]int{
	"sched_process_exec":  3, // p, old_pid, bprm
	"sched_process_exit":  1, // p
	"sched_process_fork":  2, // parent, child
	"sys_enter":           2, // regs, id
	"inet_sock_set_state": 3, // sk, oldstate, newstate
	"tcp_destroy_sock":    1, // sk
	"tcp_send_reset":      2, // sk, skb
	"tcp_receive_reset":   1, // sk
}

// Portable fails t when spec uses what Linux 5.10 does not have: a map type
// or helper function added later, an atomic instruction other than a plain
// add (atomic fetch, xchg, cmpxchg and the bitwise atomics came in 5.12;
// 5.10's verifier says "BPF_STX uses reserved fields"), a kfunc call, or a
// raw tracepoint argument the tracepoint has not there. It checks the
// object, not the verifier: loading on each kernel is still the test.
func Portable(t testing.TB, spec *ebpf.CollectionSpec) {
	t.Helper()
	for name, m := range spec.Maps {
		if !mapTypes510[m.Type] {
			t.Errorf("map %s: type %v is not known to be in Linux 5.10", name, m.Type)
		}
	}
	for name, p := range spec.Programs {
		ctxArgs := -1 // unknown: not a raw tracepoint
		if p.Type == ebpf.RawTracepoint {
			n, ok := rawTracepointArgs510[p.AttachTo]
			if !ok {
				t.Errorf("program %s: raw tracepoint %q: add its arguments on Linux 5.10 to rawTracepointArgs510", name, p.AttachTo)
			}
			ctxArgs = n
		}
		// Registers known to hold the context (r1 at entry), followed
		// in program order: enough for the loads of arguments that
		// clang emits at the start of a program.
		ctx := map[asm.Register]bool{asm.R1: true}
		for i, ins := range p.Instructions {
			switch {
			case ins.IsBuiltinCall():
				if ins.Constant > lastHelper510 {
					t.Errorf("program %s, instruction %d: %v: helper %d is newer than Linux 5.10", name, i, ins, ins.Constant)
				}
			case ins.IsKfuncCall():
				t.Errorf("program %s, instruction %d: %v: kfunc calls need Linux 5.13 or later", name, i, ins)
			case ins.OpCode.Class() == asm.StXClass && ins.OpCode.Mode() == asm.AtomicMode && ins.Constant != 0:
				t.Errorf("program %s, instruction %d: %v: only plain atomic adds are in Linux 5.10 (fetch, xchg, cmpxchg: 5.12)", name, i, ins)
			}
			if ctxArgs >= 0 && ins.OpCode.Class() == asm.LdXClass && ctx[ins.Src] {
				if arg := int(ins.Offset) / 8; arg >= ctxArgs {
					t.Errorf("program %s, instruction %d: %v reads argument %d of raw tracepoint %s, which has %d on Linux 5.10", name, i, ins, arg, p.AttachTo, ctxArgs)
				}
			}
			if ins.IsFunctionCall() || ins.IsBuiltinCall() || ins.IsKfuncCall() {
				for r := asm.R0; r <= asm.R5; r++ {
					delete(ctx, r) // clobbered by the call; r6-r9 are kept
				}
				continue
			}
			if dst := ins.Dst; ins.OpCode.Class().IsALU() || ins.OpCode.Class() == asm.LdXClass || ins.OpCode.Class() == asm.LdClass {
				ctx[dst] = ins.OpCode.Class().IsALU() && ins.OpCode.ALUOp() == asm.Mov && ins.OpCode.Source() == asm.RegSource && ctx[ins.Src]
			}
		}
	}
}
