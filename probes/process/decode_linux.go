package process

import (
	"bytes"
	"errors"
	"math"
	"syscall"
	"time"
	"unsafe"

	"github.com/flowmill/flowmill/internal/intern"
)

// Values of proc_event.kind (bpf/process.c).
const (
	kindExec = 1
	kindExit = 2
	kindFork = 3
)

var (
	errShort = errors.New("process: record shorter than its struct")
	errKind  = errors.New("process: unknown event kind")
	errSizes = errors.New("process: exec record lengths exceed the record")
)

const (
	hdrSize = int(unsafe.Sizeof(processBPFProcEvent{}))
	// execFixed is the exec record without its variable data.
	execFixed = int(unsafe.Offsetof(processBPFExecEvent{}.Data))
)

// decoder turns ring-buffer records into events. It is used from one
// goroutine. Fork and exit records decode without allocating once their
// names are interned; an exec allocates its Argv (two allocations).
type decoder struct {
	boot  func(uint64) time.Time
	comms intern.Comms
	files paths
	hdr   processBPFProcEvent // scratch: records need not be aligned
	exec  processBPFExecEvent // scratch; only the fixed part is copied
}

// kind copies raw's common header into the scratch header and returns its
// kind.
func (d *decoder) kind(raw []byte) (uint8, error) {
	if len(raw) < hdrSize {
		return 0, errShort
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&d.hdr)), hdrSize), raw)
	switch d.hdr.Kind {
	case kindExec, kindExit, kindFork:
		return d.hdr.Kind, nil
	}
	return 0, errKind
}

func (d *decoder) process(h *processBPFProcEvent) Process {
	return Process{
		PID:      h.Pid,
		PPID:     h.Ppid,
		UID:      h.Uid,
		GID:      h.Gid,
		CgroupID: h.CgroupId,
		Comm:     d.comms.String((*[16]byte)(unsafe.Pointer(&h.Comm))),
	}
}

// decodeExec decodes an exec record into ev.
func (d *decoder) decodeExec(raw []byte, ev *Exec) error {
	if len(raw) < execFixed {
		return errShort
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&d.exec)), execFixed), raw)
	e := &d.exec
	if e.Hdr.Kind != kindExec {
		return errKind
	}
	data := raw[execFixed:]
	fn, n := int(e.FilenameLen), int(e.ArgsLen)
	if fn+n > len(data) {
		return errSizes
	}
	name := data[:fn]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	*ev = Exec{
		Time:          d.boot(e.Hdr.TsNs),
		Process:       d.process(&e.Hdr),
		TID:           e.Hdr.Tid,
		Filename:      d.files.String(name),
		ArgvTruncated: e.ArgsTruncated != 0,
	}
	ev.Argv = splitArgs(data[fn : fn+n])
	if uint32(len(ev.Argv)) < e.Argc {
		ev.ArgvTruncated = true
	}
	return nil
}

// splitArgs splits NUL-terminated strings; a last string without its NUL
// (cut by the size bound) is kept. The strings share one allocation.
func splitArgs(b []byte) []string {
	if len(b) == 0 {
		return nil
	}
	n := bytes.Count(b, []byte{0})
	if b[len(b)-1] != 0 {
		n++
	}
	s := string(b)
	argv := make([]string, 0, n)
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != 0 {
			i++
		}
		argv = append(argv, s[:i])
		if i == len(s) {
			break
		}
		s = s[i+1:]
	}
	return argv
}

// decodeExit decodes the scratch header (see kind) as an exit.
func (d *decoder) decodeExit(ev *Exit) {
	h := &d.hdr
	*ev = Exit{
		Time:     d.boot(h.TsNs),
		Process:  d.process(h),
		ExitCode: -1,
	}
	if d := h.TsNs - h.StartNs; h.TsNs > h.StartNs && d <= math.MaxInt64 {
		ev.Lifetime = time.Duration(d)
	}
	// The wait status: exit status in bits 8-15, or the signal in bits
	// 0-6 and the core dump flag in bit 7.
	if sig := h.ExitCode & 0x7f; sig != 0 {
		ev.Signal = syscall.Signal(sig)
		ev.CoreDumped = h.ExitCode&0x80 != 0
	} else {
		ev.ExitCode = int(h.ExitCode>>8) & 0xff
	}
}

// decodeFork decodes the scratch header (see kind) as a fork.
func (d *decoder) decodeFork(ev *Fork) {
	h := &d.hdr
	*ev = Fork{
		Time:     d.boot(h.TsNs),
		Process:  d.process(h),
		ChildPID: h.ChildPid,
	}
}

// paths interns executable paths, which repeat: a path seen before costs no
// allocation. It is bounded: when full it starts over. Not safe for
// concurrent use.
type paths struct {
	m map[string]string
}

const maxPaths = 4096

func (p *paths) String(b []byte) string {
	if s, ok := p.m[string(b)]; ok { // no allocation for the lookup
		return s
	}
	if p.m == nil || len(p.m) >= maxPaths {
		p.m = make(map[string]string, 64)
	}
	s := string(b)
	p.m[s] = s
	return s
}
