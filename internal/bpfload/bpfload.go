// Package bpfload holds what every probe family does to load and attach its
// eBPF objects: check privileges and kernel support, apply the session's
// scope, attach raw tracepoints, and read the loss counters.
package bpfload

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/flowmill/flowmill/internal/probe"
)

// Linux capability numbers (include/uapi/linux/capability.h).
const (
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// MinKernel is the oldest Linux release flowmill's programs are written
// and tested for.
const MinKernel = "5.10"

// Check verifies, before anything is loaded, that this process may load
// eBPF programs and that the kernel has BTF and ring buffers. Its errors wrap
// the probes sentinels and say what to do.
func Check() error {
	eff, err := effectiveCaps()
	if err != nil {
		return fmt.Errorf("%w: cannot read capabilities: %v", probe.ErrPermission, err)
	}
	if !canLoad(eff) {
		return fmt.Errorf("%w: this process (euid %d) has neither CAP_SYS_ADMIN nor CAP_BPF with CAP_PERFMON; run it as root or grant them, e.g. setcap cap_bpf,cap_perfmon,cap_net_admin+ep on the binary", probe.ErrPermission, os.Geteuid())
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return fmt.Errorf("%w: /sys/kernel/btf/vmlinux: %v; use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.8 are)", probe.ErrNoBTF, err)
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%w: raising RLIMIT_MEMLOCK: %v", probe.ErrPermission, err)
	}
	if err := features.HaveMapType(ebpf.RingBuf); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: BPF ring buffers (Linux 5.8 or later): %w", probe.ErrNotSupported, err)
		}
		return fmt.Errorf("probing for BPF ring buffer support: %w", err)
	}
	return nil
}

// canLoad reports whether the effective capabilities eff allow loading
// eBPF programs.
func canLoad(eff uint64) bool {
	has := func(c uint) bool { return eff&(1<<c) != 0 }
	return has(capSysAdmin) || (has(capBPF) && has(capPerfmon))
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
func Configure(spec *ebpf.CollectionSpec, env *probe.Env) error {
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
func Load(spec *ebpf.CollectionSpec, env *probe.Env, objs any, scopeCgroup func() *ebpf.Map) error {
	return LoadWith(spec, env, objs, nil, scopeCgroup)
}

// LoadWith is Load with collection options (MapReplacements, to share
// maps with an object loaded before).
func LoadWith(spec *ebpf.CollectionSpec, env *probe.Env, objs any, opts *ebpf.CollectionOptions, scopeCgroup func() *ebpf.Map) error {
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		return Explain(err)
	}
	if env.Scope.Kind == probe.ScopeCgroup {
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
//
// The kernel answers EACCES or EINVAL both when the process lacks a
// privilege and when its verifier rejects a program, so the errno alone
// does not tell: a rejection (*ebpf.VerifierError, whatever its errno) is
// ErrNotSupported with the verifier's last words, and EPERM or EACCES is
// "run as root" only when the process lacks the capabilities. The original
// error stays in the chain (errors.As finds the *ebpf.VerifierError, whose
// %+v prints the whole log).
func Explain(err error) error {
	if err == nil {
		return nil
	}
	eff, cerr := effectiveCaps()
	return explain(err, cerr == nil && canLoad(eff), kernelRelease())
}

// verifierLines is how many lines of the verifier log an error shows: the
// last ones, where the verifier says what it rejected and why.
const verifierLines = 10

// progName finds the program in a cilium/ebpf load error ("program NAME: ...").
var progName = regexp.MustCompile(`\bprogram ([A-Za-z_][A-Za-z0-9_]*): `)

func explain(err error, privileged bool, release string) error {
	var ve *ebpf.VerifierError
	switch {
	case errors.As(err, &ve):
		prog := "a flowmill program"
		if m := progName.FindStringSubmatch(err.Error()); m != nil {
			prog = "program " + m[1]
		}
		return &explained{
			msg:  fmt.Sprintf("%v: the kernel's verifier rejected %s (this kernel is %s; %s): %-*v", probe.ErrNotSupported, prog, release, needs(release), verifierLines, ve),
			errs: []error{probe.ErrNotSupported, err},
		}
	case errors.Is(err, ebpf.ErrNotSupported):
		return fmt.Errorf("%w: %w", probe.ErrNotSupported, err)
	case (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) && !privileged:
		return fmt.Errorf("%w: loading eBPF objects: %w; run as root or with CAP_BPF and CAP_PERFMON", probe.ErrPermission, err)
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		// Not for want of capabilities (the process has them) nor a
		// verifier rejection (no log): a policy above them.
		return fmt.Errorf("%w: loading eBPF objects: %w; the process has CAP_BPF or CAP_SYS_ADMIN, so a security policy refused it (kernel lockdown, an LSM such as SELinux or AppArmor, a seccomp filter, or kernel.unprivileged_bpf_disabled in a container)", probe.ErrPermission, err)
	}
	return err
}

// needs says what flowmill needs of a kernel that rejected its program.
func needs(release string) string {
	if kernelBefore(release, MinKernel) {
		return "flowmill needs Linux " + MinKernel + " or later"
	}
	return "flowmill supports Linux " + MinKernel + " and later, so this is a flowmill bug: please report it with this message"
}

// kernelBefore reports whether release ("6.1.0-57-amd64", or "Linux
// 6.1.0-57-amd64") is older than min ("5.10"); false when either does not
// parse.
func kernelBefore(release, min string) bool {
	var a, b, x, y int
	if _, err := fmt.Sscanf(strings.TrimPrefix(release, "Linux "), "%d.%d", &a, &b); err != nil {
		return false
	}
	if _, err := fmt.Sscanf(min, "%d.%d", &x, &y); err != nil {
		return false
	}
	return a < x || (a == x && b < y)
}

// explained is an error with its own message that still wraps the errors
// it explains: a sentinel and the original error.
type explained struct {
	msg  string
	errs []error
}

func (e *explained) Error() string   { return e.msg }
func (e *explained) Unwrap() []error { return e.errs }

// RawTracepoint names a program and the raw tracepoint it attaches to.
type RawTracepoint struct {
	Name    string
	Program *ebpf.Program
}

// AttachRawTracepoints attaches each program; on failure it detaches the
// ones already attached. A tracepoint the kernel lacks yields an error
// wrapping probe.ErrMissingHook.
func AttachRawTracepoints(tps ...RawTracepoint) ([]link.Link, error) {
	var links []link.Link
	for _, tp := range tps {
		l, err := link.AttachRawTracepoint(link.RawTracepointOptions{Name: tp.Name, Program: tp.Program})
		if err != nil {
			CloseLinks(links)
			return nil, explainAttach(tp, err, kernelRelease())
		}
		links = append(links, l)
	}
	return links, nil
}

// explainAttach wraps the error of attaching tp with the probes sentinel
// that describes it.
func explainAttach(tp RawTracepoint, err error, release string) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: raw tracepoint %q is not in this kernel (%s); flowmill needs Linux %s or later with it: %w", probe.ErrMissingHook, tp.Name, release, MinKernel, err)
	case errors.Is(err, unix.EINVAL):
		// The kernel checks at attach time that the program reads no
		// more arguments than the tracepoint has (and that the
		// tracepoint is writable if the program writes them).
		name := "its program"
		if tp.Program != nil {
			if info, ierr := tp.Program.Info(); ierr == nil && info.Name != "" {
				name = "program " + info.Name
			}
		}
		return fmt.Errorf("%w: raw tracepoint %q of this kernel (%s) is incompatible with %s: it has fewer arguments than the program reads, or other ones (%s): %w", probe.ErrMissingHook, tp.Name, release, name, needs(release), err)
	}
	return fmt.Errorf("attaching raw tracepoint %q: %w", tp.Name, Explain(err))
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

// batchSize is how many entries a batch lookup asks for at first. A hash
// map answers ENOSPC when a bucket holds more entries than asked for, and
// the size is doubled for the rest of the walk.
const batchSize = 1024

// CountKeys counts the entries of a hash map. It reads them in batches
// (BPF_MAP_LOOKUP_BATCH: a few system calls for the whole map) and falls
// back to walking the keys, one system call per entry, where the kernel
// has no batch lookups for the map's type. Entries that come and go during
// the count may or may not be counted.
func CountKeys(m *ebpf.Map) (int64, error) {
	return countKeys(m, countBatched)
}

func countKeys(m *ebpf.Map, batched func(*ebpf.Map) (int64, error)) (int64, error) {
	n, err := batched(m)
	if errors.Is(err, ebpf.ErrNotSupported) {
		n, err = countIterated(m)
	}
	if err != nil {
		return n, fmt.Errorf("counting the entries of %v: %w", m, err)
	}
	return n, nil
}

// countBatched counts with batch lookups into buffers of the map's key and
// value sizes (the values are read too: the kernel copies them out).
func countBatched(m *ebpf.Map) (int64, error) {
	if perCPU(m.Type()) {
		return 0, fmt.Errorf("per-CPU values: %w", ebpf.ErrNotSupported)
	}
	var n int64
	err := walk(m, func(size int) (keys, values any) {
		return byteArrays(m.KeySize(), size), byteArrays(m.ValueSize(), size)
	}, func(count int) error {
		n += int64(count)
		return nil
	})
	return n, err
}

// countIterated counts by walking the keys, one system call per entry.
func countIterated(m *ebpf.Map) (int64, error) {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var n int64
	err := m.NextKey(nil, next)
	for err == nil {
		n++
		key, next = next, key
		err = m.NextKey(key, next)
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return n, err
	}
	return n, nil
}

// Walk reads every entry of a hash map in batches: fn gets each batch, the
// keys and values read, and returns an error to stop the walk. Batches are
// read with BPF_MAP_LOOKUP_BATCH, a system call each; where the kernel has
// no batch lookups for the map's type, they are filled one entry at a time
// (ebpf.Map.Iterate). K and V are the map's key and value types; per-CPU
// maps are not supported. Entries that come and go during the walk may or
// may not be seen; the slices are reused between calls of fn.
func Walk[K, V any](m *ebpf.Map, fn func(keys []K, values []V) error) error {
	return walkWith(m, walk, nil, fn)
}

// Walker walks maps as Walk does, keeping its buffers from one walk to the
// next: for a map walked periodically whose values are large. Not for
// concurrent use.
type Walker[K, V any] struct {
	keys   []K
	values []V
}

// Walk walks m as the function Walk does.
func (w *Walker[K, V]) Walk(m *ebpf.Map, fn func(keys []K, values []V) error) error {
	return walkWith(m, walk, w, fn)
}

func walkWith[K, V any](m *ebpf.Map, batched func(*ebpf.Map, func(int) (any, any), func(int) error) error, buf *Walker[K, V], fn func(keys []K, values []V) error) error {
	if perCPU(m.Type()) {
		return fmt.Errorf("walking %v: per-CPU values: %w", m, ebpf.ErrNotSupported)
	}
	var keys []K
	var values []V
	err := batched(m, func(size int) (any, any) {
		if buf != nil && len(buf.keys) == size {
			keys, values = buf.keys, buf.values
			return keys, values
		}
		keys, values = make([]K, size), make([]V, size)
		if buf != nil {
			buf.keys, buf.values = keys, values
		}
		return keys, values
	}, func(count int) error {
		return fn(keys[:count], values[:count])
	})
	if !errors.Is(err, ebpf.ErrNotSupported) {
		if err != nil {
			return fmt.Errorf("walking %v: %w", m, err)
		}
		return nil
	}
	if keys == nil {
		if buf != nil && len(buf.keys) > 0 {
			keys, values = buf.keys, buf.values
		} else {
			keys, values = make([]K, batchSize), make([]V, batchSize)
			if buf != nil {
				buf.keys, buf.values = keys, values
			}
		}
	}
	n := 0
	it := m.Iterate()
	for it.Next(&keys[n], &values[n]) {
		if n++; n == len(keys) {
			if err := fn(keys, values); err != nil {
				return err
			}
			n = 0
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("walking %v: %w", m, err)
	}
	if n > 0 {
		return fn(keys[:n], values[:n])
	}
	return nil
}

// walk reads m with batch lookups into the buffers alloc makes for size
// entries, calling got with the number of entries of each batch. It fails
// with an error wrapping ebpf.ErrNotSupported, before got is called, when
// the kernel has no batch lookups for the map.
func walk(m *ebpf.Map, alloc func(size int) (keys, values any), got func(count int) error) error {
	size := min(batchSize, max(int(m.MaxEntries()), 1))
	keys, values := alloc(size)
	var cursor ebpf.MapBatchCursor
	for started := false; ; started = true {
		n, err := m.BatchLookup(&cursor, keys, values, nil)
		if started && errors.Is(err, ebpf.ErrNotSupported) {
			// Not a missing feature (the first batch worked): do
			// not let the caller start over another way.
			return fmt.Errorf("batch lookup: %v", err)
		}
		if errors.Is(err, unix.ENOSPC) && n == 0 && size < int(m.MaxEntries()) {
			// A bucket holds more entries than a batch: the
			// cursor still points at it.
			size = min(2*size, int(m.MaxEntries()))
			keys, values = alloc(size)
			continue
		}
		done := errors.Is(err, ebpf.ErrKeyNotExist)
		if err != nil && !done {
			return err
		}
		if n > 0 {
			if err := got(n); err != nil {
				return err
			}
		}
		if done {
			return nil
		}
	}
}

// byteArrays returns a slice of n arrays of size bytes, the layout batch
// lookups write into.
func byteArrays(size uint32, n int) any {
	return reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(size), reflect.TypeFor[byte]())), n, n).Interface()
}

func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}

// EvictionFloor is the number of live entries below which an LRU hash map
// of maxEntries cannot have evicted: the kernel's LRU evicts once its free
// nodes run out, each possible CPU may hold a batch of them
// (LOCAL_FREE_TARGET, 128) in reserve, and a CPU that finds none evicts up
// to a batch at once to refill its own; twice a batch per CPU, to be safe.
// A map smaller than that can evict with any number of live entries (seen:
// a 64-entry map on 2 CPUs evicting with 17 live): its floor is 0. Walking
// the map (CountKeys) to infer evictions is only worth it above the floor.
func EvictionFloor(maxEntries uint32) (int64, error) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return 0, err
	}
	return int64(maxEntries) - min(int64(maxEntries), 2*128*int64(cpus)), nil
}

// Missed returns how many times the kernel skipped one of the programs in
// programs (a bpf2go Programs struct) because a program was already running
// on that CPU: a raw tracepoint hit from an interrupt that arrived while
// the same program ran, for instance. Those are hook hits no program saw,
// so families count them as lost. Linux 5.12 and later count them; earlier
// kernels report 0.
func Missed(programs any) uint64 {
	var n uint64
	v := reflect.ValueOf(programs).Elem()
	for i := range v.NumField() {
		if p, ok := v.Field(i).Interface().(*ebpf.Program); ok && p != nil {
			if st, err := p.Stats(); err == nil {
				n += st.RecursionMisses
			}
		}
	}
	return n
}
