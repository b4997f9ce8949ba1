package bpfload

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/probe"
	"github.com/flowmill/flowmill/internal/testutil"
)

// verifierLog is the end of a real verifier log (Linux 6.1 rejecting
// client_enter), with more lines before it than an error shows.
func verifierLog() []string {
	var log []string
	for i := range 20 {
		log = append(log, fmt.Sprintf("%d: (b7) r1 = 0", i))
	}
	return append(log,
		"473: (79) r3 = *(u64 *)(r10 -48)      ; R3_w=map_value(off=584,ks=4,vs=9832,imm=0) R10=fp0",
		"474: (85) call bpf_probe_read_kernel#113",
		"R2 min value is negative, either use unsigned or 'var &= const'",
		"processed 393 insns (limit 1000000) max_states_per_insn 0 total_states 9 peak_states 9 mark_read 4",
	)
}

// loadErr wraps err as cilium/ebpf's LoadAndAssign does.
func loadErr(err error) error {
	return fmt.Errorf("assign values: field ClientEnter: program client_enter: load program: %w", err)
}

func TestExplain(t *testing.T) {
	rejected := func(cause error) error {
		return loadErr(&ebpf.VerifierError{Cause: cause, Log: verifierLog()})
	}
	other := errors.New("something else")
	for _, c := range []struct {
		name       string
		err        error
		privileged bool
		release    string
		is         error    // the sentinel the result wraps; nil: none
		has, hasnt []string // in the message, or not
	}{
		{
			name: "verifier EACCES, root", err: rejected(unix.EACCES), privileged: true, release: "Linux 6.1.0-57-amd64",
			is: probe.ErrNotSupported,
			has: []string{
				"the kernel's verifier rejected program client_enter",
				"this kernel is Linux 6.1.0-57-amd64",
				"flowmill supports Linux 5.10 and later, so this is a flowmill bug",
				"R2 min value is negative",
				"474: (85) call bpf_probe_read_kernel#113",
				"(14 line(s) omitted)",
			},
			hasnt: []string{"run as root", "insufficient privileges", "0: (b7) r1 = 0\n"},
		},
		{
			name: "verifier EINVAL", err: rejected(unix.EINVAL), privileged: true, release: "Linux 6.12.118+deb13-amd64",
			is: probe.ErrNotSupported, has: []string{"verifier rejected program client_enter", "R2 min value"},
		},
		{
			// A rejection is one whatever the capabilities say: an
			// unprivileged load is refused before any verifier runs.
			name: "verifier without capabilities", err: rejected(unix.EPERM), privileged: false, release: "Linux 6.1.0",
			is: probe.ErrNotSupported, hasnt: []string{"run as root"},
		},
		{
			name: "verifier on an old kernel", err: rejected(unix.EINVAL), privileged: true, release: "Linux 5.4.0-150-generic",
			is: probe.ErrNotSupported, has: []string{"this kernel is Linux 5.4.0-150-generic", "flowmill needs Linux 5.10 or later"},
			hasnt: []string{"flowmill bug"},
		},
		{
			name: "no program name", err: &ebpf.VerifierError{Cause: unix.EACCES, Log: verifierLog()}, privileged: true, release: "Linux 6.1.0",
			is: probe.ErrNotSupported, has: []string{"rejected a flowmill program"},
		},
		{
			name: "EPERM without capabilities", err: loadErr(unix.EPERM), privileged: false, release: "Linux 6.1.0",
			is: probe.ErrPermission, has: []string{"run as root or with CAP_BPF and CAP_PERFMON"},
		},
		{
			name: "EACCES without capabilities", err: loadErr(unix.EACCES), privileged: false, release: "Linux 6.1.0",
			is: probe.ErrPermission, has: []string{"run as root"},
		},
		{
			name: "EPERM with capabilities", err: loadErr(unix.EPERM), privileged: true, release: "Linux 6.1.0",
			is: probe.ErrPermission, has: []string{"the process has CAP_BPF or CAP_SYS_ADMIN", "security policy"},
			hasnt: []string{"run as root"},
		},
		{
			name: "not supported", err: fmt.Errorf("map events: %w", ebpf.ErrNotSupported), privileged: true, release: "Linux 5.4.0",
			is: probe.ErrNotSupported,
		},
		{
			name: "other", err: other, privileged: true, release: "Linux 6.1.0",
			is: other,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := explain(c.err, c.privileged, c.release)
			msg := got.Error()
			if c.is != nil && !errors.Is(got, c.is) {
				t.Errorf("%q does not wrap %q", msg, c.is)
			}
			for _, s := range []error{probe.ErrPermission, probe.ErrNotSupported} {
				if s != c.is && errors.Is(got, s) {
					t.Errorf("%q wraps %q too", msg, s)
				}
			}
			if !errors.Is(got, c.err) {
				t.Errorf("%q lost the original error from its chain", msg)
			}
			var ve *ebpf.VerifierError
			if errors.As(c.err, &ve) && !errors.As(got, &ve) {
				t.Errorf("%q: errors.As finds no *ebpf.VerifierError", msg)
			}
			for _, s := range c.has {
				if !strings.Contains(msg, s) {
					t.Errorf("%q does not say %q", msg, s)
				}
			}
			for _, s := range c.hasnt {
				if strings.Contains(msg, s) {
					t.Errorf("%q says %q", msg, s)
				}
			}
		})
	}
}

func TestExplainNil(t *testing.T) {
	if err := Explain(nil); err != nil {
		t.Errorf("Explain(nil) = %v", err)
	}
}

func TestExplainAttach(t *testing.T) {
	tp := RawTracepoint{Name: "sched_process_exit"}
	for _, c := range []struct {
		name string
		err  error
		is   error
		has  []string
	}{
		{"missing", fmt.Errorf("raw tracepoint: %w", os.ErrNotExist), probe.ErrMissingHook,
			[]string{`raw tracepoint "sched_process_exit" is not in this kernel (Linux 6.1.0)`, "Linux 5.10 or later"}},
		{"EINVAL", fmt.Errorf("raw tracepoint: %w", unix.EINVAL), probe.ErrMissingHook,
			[]string{`raw tracepoint "sched_process_exit" of this kernel (Linux 6.1.0) is incompatible with its program`, "fewer arguments", "flowmill bug"}},
		{"EPERM", fmt.Errorf("raw tracepoint: %w", unix.EPERM), probe.ErrPermission,
			[]string{`attaching raw tracepoint "sched_process_exit"`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := explainAttach(tp, c.err, "Linux 6.1.0")
			if !errors.Is(got, c.is) || !errors.Is(got, c.err) {
				t.Errorf("%q: want it to wrap %q and the original error", got, c.is)
			}
			for _, s := range c.has {
				if !strings.Contains(got.Error(), s) {
					t.Errorf("%q does not say %q", got, s)
				}
			}
		})
	}
}

func TestKernelBefore(t *testing.T) {
	for _, c := range []struct {
		release string
		want    bool
	}{
		{"Linux 5.4.0-150-generic", true},
		{"5.9.16", true},
		{"4.19.0", true},
		{"Linux 5.10.0-46-amd64", false},
		{"5.15.0", false},
		{"6.1.0-57-amd64", false},
		{"7.3.4+deb13-amd64", false},
		{"unknown kernel", false},
	} {
		if got := kernelBefore(c.release, "5.10"); got != c.want {
			t.Errorf("kernelBefore(%q, 5.10) = %v, want %v", c.release, got, c.want)
		}
	}
}

// rawTracepoint loads a raw tracepoint program made of insns.
func rawTracepoint(name string, insns ...asm.Instruction) (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{Name: name, Type: ebpf.RawTracepoint, Instructions: insns, License: "GPL"})
}

// TestExplainRealVerifierError has this kernel's verifier reject a program
// (it reads a register it never set), as root: the error says so, and is
// not about privileges.
func TestExplainRealVerifierError(t *testing.T) {
	testutil.RequireBPF(t)
	prog, err := rawTracepoint("bad_prog",
		asm.LoadMem(asm.R0, asm.R2, 0, asm.DWord), // R2 is not initialised
		asm.Return(),
	)
	if err == nil {
		prog.Close()
		t.Fatal("the verifier accepted a program reading an uninitialised register")
	}
	got := Explain(fmt.Errorf("program bad_prog: %w", err))
	if !errors.Is(got, probe.ErrNotSupported) || errors.Is(got, probe.ErrPermission) {
		t.Errorf("%q: want ErrNotSupported, not ErrPermission", got)
	}
	// The verifier's own words differ between releases ("R2 !read_ok";
	// 7.x explains with a causal path); the rejected instruction is in all.
	for _, s := range []string{"verifier rejected program bad_prog", "r0 = *(u64 *)(r2 +0)", kernelRelease()} {
		if !strings.Contains(got.Error(), s) {
			t.Errorf("%q does not say %q", got, s)
		}
	}
	if strings.Contains(got.Error(), "run as root") {
		t.Errorf("%q tells root to run as root", got)
	}
}

// TestAttachIncompatibleTracepoint attaches a program that reads argument
// 7 of sched_process_exit, which has one or two: the kernel refuses with
// EINVAL, reported as ErrMissingHook naming the tracepoint.
func TestAttachIncompatibleTracepoint(t *testing.T) {
	testutil.RequireBPF(t)
	prog, err := rawTracepoint("reads_args_7",
		asm.LoadMem(asm.R0, asm.R1, 7*8, asm.DWord),
		asm.Mov.Imm(asm.R0, 0),
		asm.Return(),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	links, err := AttachRawTracepoints(RawTracepoint{Name: "sched_process_exit", Program: prog})
	if err == nil {
		CloseLinks(links)
		t.Fatal("the kernel attached a program reading argument 7 of sched_process_exit")
	}
	if !errors.Is(err, probe.ErrMissingHook) || !errors.Is(err, unix.EINVAL) {
		t.Errorf("%q: want ErrMissingHook wrapping EINVAL", err)
	}
	for _, s := range []string{`raw tracepoint "sched_process_exit"`, "incompatible with program reads_args_7"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%q does not say %q", err, s)
		}
	}
}

// TestMissed reads the recursion misses of every program of a bpf2go-style
// Programs struct, skipping nil ones; a program that never ran missed none.
func TestMissed(t *testing.T) {
	testutil.RequireBPF(t)
	prog, err := rawTracepoint("ok_prog", asm.Mov.Imm(asm.R0, 0), asm.Return())
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	progs := struct {
		A *ebpf.Program `ebpf:"a"`
		B *ebpf.Program `ebpf:"b"`
	}{A: prog}
	if n := Missed(&progs); n != 0 {
		t.Errorf("Missed = %d for a program that never ran", n)
	}
}
