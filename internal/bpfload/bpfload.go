// Package bpfload holds what every probe family does to load and attach its
// eBPF objects: check privileges and kernel support, apply the session's
// scope, attach raw tracepoints, and read the loss counters.
package bpfload

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/probes"
)

// Linux capability numbers (include/uapi/linux/capability.h).
const (
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// Check verifies, before anything is loaded, that this process may load
// eBPF programs and that the kernel has BTF and ring buffers. Its errors wrap
// the probes sentinels and say what to do.
func Check() error {
	eff, err := effectiveCaps()
	if err != nil {
		return fmt.Errorf("%w: cannot read capabilities: %v", probes.ErrPermission, err)
	}
	has := func(c uint) bool { return eff&(1<<c) != 0 }
	if !has(capSysAdmin) && !(has(capBPF) && has(capPerfmon)) {
		return fmt.Errorf("%w: this process (euid %d) has neither CAP_SYS_ADMIN nor CAP_BPF with CAP_PERFMON; run it as root or grant them, e.g. setcap cap_bpf,cap_perfmon,cap_net_admin+ep on the binary", probes.ErrPermission, os.Geteuid())
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return fmt.Errorf("%w: /sys/kernel/btf/vmlinux: %v; use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.8 are)", probes.ErrNoBTF, err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%w: raising RLIMIT_MEMLOCK: %v", probes.ErrPermission, err)
	}
	if err := features.HaveMapType(ebpf.RingBuf); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: BPF ring buffers (Linux 5.8 or later): %w", probes.ErrNotSupported, err)
		}
		return fmt.Errorf("probing for BPF ring buffer support: %w", err)
	}
	return nil
}

func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

// Configure applies the session environment to a family's spec: scope
// constants, ring buffer size and wake-up threshold. The spec must include
// bpf/include/flowmill.h.
func Configure(spec *ebpf.CollectionSpec, env *probes.Env) error {
	set := func(name string, v any) error {
		vs, ok := spec.Variables[name]
		if !ok {
			return fmt.Errorf("object has no variable %q", name)
		}
		return vs.Set(v)
	}
	if err := set("fm_scope_kind", uint32(env.Scope.Kind)); err != nil {
		return err
	}
	if err := set("fm_scope_tgid", env.Scope.PID); err != nil {
		return err
	}
	if err := set("fm_wakeup_bytes", env.WakeupBytes); err != nil {
		return err
	}
	if m, ok := spec.Maps["events"]; ok && env.RingSize != 0 {
		m.MaxEntries = env.RingSize
	}
	return nil
}

// Load loads spec into objs (see ebpf.CollectionSpec.LoadAndAssign) and, for
// a cgroup scope, stores the cgroup in the scope_cgroup map. Errors are
// translated into the probes sentinels where the cause is known.
func Load(spec *ebpf.CollectionSpec, env *probes.Env, objs any, scopeCgroup func() *ebpf.Map) error {
	if err := spec.LoadAndAssign(objs, nil); err != nil {
		return Explain(err)
	}
	if env.Scope.Kind == probes.ScopeCgroup {
		fd, err := unix.Open(env.Scope.CgroupPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening cgroup %q for the session scope: %w (give a cgroup v2 directory such as /sys/fs/cgroup/system.slice/x.service)", env.Scope.CgroupPath, err)
		}
		defer unix.Close(fd)
		if err := scopeCgroup().Put(uint32(0), uint32(fd)); err != nil {
			return fmt.Errorf("setting scope cgroup %q: %w", env.Scope.CgroupPath, err)
		}
	}
	return nil
}

// Explain wraps a load error with the probes sentinel that describes it.
func Explain(err error) error {
	var ve *ebpf.VerifierError
	switch {
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: loading eBPF objects: %w; run as root or with CAP_BPF and CAP_PERFMON", probes.ErrPermission, err)
	case errors.Is(err, ebpf.ErrNotSupported):
		return fmt.Errorf("%w: %w", probes.ErrNotSupported, err)
	case errors.As(err, &ve):
		return fmt.Errorf("the kernel's verifier rejected a flowmill program (please report it with your kernel version): %w", err)
	}
	return err
}

// RawTracepoint names a program and the raw tracepoint it attaches to.
type RawTracepoint struct {
	Name    string
	Program *ebpf.Program
}

// AttachRawTracepoints attaches each program; on failure it detaches the
// ones already attached. A tracepoint the kernel lacks yields an error
// wrapping probes.ErrMissingHook.
func AttachRawTracepoints(tps ...RawTracepoint) ([]link.Link, error) {
	var links []link.Link
	for _, tp := range tps {
		l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: tp.Name, Program: tp.Program})
		if err != nil {
			CloseLinks(links)
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("%w: raw tracepoint %q is not in this kernel (%s); flowmill needs Linux 5.8 or later with it", probes.ErrMissingHook, tp.Name, kernelRelease())
			}
			return nil, fmt.Errorf("attaching raw tracepoint %q: %w", tp.Name, Explain(err))
		}
		links = append(links, l)
	}
	return links, nil
}

// CloseLinks detaches links and returns the first error.
func CloseLinks(links []link.Link) error {
	var first error
	for _, l := range links {
		if err := l.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Counters sums the first n slots of a per-CPU uint64 array over all CPUs.
func Counters(m *ebpf.Map, n int) ([]uint64, error) {
	out := make([]uint64, n)
	var per []uint64
	for i := range n {
		if err := m.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("reading counter %d: %w", i, err)
		}
		for _, v := range per {
			out[i] += v
		}
	}
	return out, nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown kernel"
	}
	return "Linux " + unix.ByteSliceToString(u.Release[:])
}

// CountKeys counts the entries of a hash map with 8-byte keys, one syscall
// per entry. Entries come and go during the walk.
func CountKeys(m *ebpf.Map) (int64, error) {
	var key, next uint64
	var n int64
	err := m.NextKey(nil, &next)
	for err == nil {
		n++
		key = next
		err = m.NextKey(&key, &next)
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return n, fmt.Errorf("counting the entries of %v: %w", m, err)
	}
	return n, nil
}

// EvictionFloor is the number of live entries below which an LRU hash map
// of maxEntries cannot have evicted: the kernel's LRU evicts once its free
// nodes run out, and each possible CPU may hold a batch of them
// (LOCAL_FREE_TARGET, 128) in reserve; twice that, to be safe. Walking the
// map (CountKeys) to infer evictions is only worth it above the floor.
func EvictionFloor(maxEntries uint32) (int64, error) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return 0, err
	}
	return int64(maxEntries) - min(int64(maxEntries)/2, 2*128*int64(cpus)), nil
}
