//go:build linux

// Package gotype names the dynamic Go types of interface values the kernel
// side of a probe saw in the program's memory, by their itab: the type word
// of a non-empty interface (an error, a driver.Conn).
//
// Nothing the kernel reports is trusted: a wrong value must never crash
// the program. The itab is never dereferenced directly nor handed to
// reflect or the runtime (which throw on a type they cannot place): every
// read goes through process_vm_readv on our own process (or /proc/self/mem
// where a seccomp filter refuses it), which fails on an unmapped address
// instead of faulting, and what is read must look like what the runtime
// builds: the itab's interface type is the expected one, the type's kind a
// real kind, its name in the program's type data and printable.
package gotype

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sync"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Names resolves itabs of one interface type to type names. Safe for
// concurrent use; bounded.
type Names struct {
	inter uint64 // runtime.itab.inter of the interface
	base  uint64 // runtime.moduledata.types; 0: nothing resolves

	mu    sync.Mutex
	mem   *os.File
	names map[uint64]string
}

// MaxNames bounds the cache; past it, it starts over.
const MaxNames = 4096

// New returns a resolver for the itabs of the interface whose value iface
// points at (a pointer to a non-nil interface variable of this program,
// such as &err): its itab names the interface type that every itab to be
// resolved must have.
func New(iface unsafe.Pointer) *Names {
	tab := *(*unsafe.Pointer)(iface)
	n := &Names{inter: uint64(*(*uintptr)(tab))}
	n.base = typesBase()
	return n
}

// abiType mirrors the head of internal/abi.Type (stable since Go 1.21);
// checked against real types in typesBase: a mismatch disables resolution.
type abiType struct {
	Size, PtrBytes    uintptr
	Hash              uint32
	TFlag             uint8
	Align, FieldAlign uint8
	Kind              uint8
	Equal             uintptr
	GCData            uintptr
	Str, PtrToThis    int32
}

const (
	tflagExtraStar = 1 << 1
	kindMask       = 1<<5 - 1
	kindMax        = 26
	maxTypeName    = 1024
)

type eface struct {
	typ, data unsafe.Pointer
}

// typesBase derives the start of the type data from the names of a few of
// the program's types (all must agree), or 0.
func typesBase() uint64 {
	var base uint64
	for _, v := range []any{errors.New(""), &os.PathError{}, 0, reflect.Value{}, fmt.Stringer(nil)} {
		if v == nil {
			continue
		}
		typ := (*eface)(unsafe.Pointer(&v)).typ
		t := (*abiType)(typ)
		name := reflect.TypeOf(v).String()
		data := uint64(uintptr(unsafe.Pointer(unsafe.StringData(name))))
		n := len(name)
		if t.TFlag&tflagExtraStar != 0 {
			data--
			n++
		}
		if t.Str <= 0 || n == 0 {
			return 0
		}
		var b [binary.MaxVarintLen64]byte
		rec := data - 1 - uint64(binary.PutUvarint(b[:], uint64(n)))
		if bb := rec - uint64(t.Str); base != 0 && bb != base {
			return 0
		} else {
			base = bb
		}
	}
	return base
}

// Name returns the type name of the itab, "" and true for 0 (a nil
// interface), false when it does not resolve.
func (n *Names) Name(itab uint64) (string, bool) {
	if itab == 0 {
		return "", true
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if s, ok := n.names[itab]; ok {
		return s, s != ""
	}
	if n.names == nil || len(n.names) >= MaxNames {
		n.names = make(map[uint64]string)
	}
	s := n.resolve(itab)
	n.names[itab] = s
	return s, s != ""
}

func (n *Names) resolve(itab uint64) string {
	if n.base == 0 {
		return ""
	}
	var tab [16]byte // runtime.itab: inter, _type
	if !n.read(itab, tab[:]) || binary.LittleEndian.Uint64(tab[:8]) != n.inter {
		return ""
	}
	var t abiType
	if !n.read(binary.LittleEndian.Uint64(tab[8:]), unsafe.Slice((*byte)(unsafe.Pointer(&t)), unsafe.Sizeof(t))) {
		return ""
	}
	if k := t.Kind & kindMask; k == 0 || k > kindMax || t.Str <= 0 {
		return ""
	}
	rec := n.base + uint64(t.Str)
	var head [1 + binary.MaxVarintLen16]byte
	if !n.read(rec, head[:]) {
		return ""
	}
	l, k := binary.Uvarint(head[1:])
	if k <= 0 || l == 0 || l > maxTypeName {
		return ""
	}
	b := make([]byte, l)
	if !n.read(rec+1+uint64(k), b) {
		return ""
	}
	if t.TFlag&tflagExtraStar != 0 {
		if b[0] != '*' || len(b) < 2 {
			return ""
		}
		b = b[1:]
	}
	if !utf8.Valid(b) {
		return ""
	}
	for _, c := range b {
		if c < 0x20 || c == 0x7f {
			return ""
		}
	}
	return string(b)
}

// read copies len(buf) bytes at addr of this process; it never faults.
func (n *Names) read(addr uint64, buf []byte) bool {
	if addr == 0 || addr+uint64(len(buf)) < addr {
		return false
	}
	if n.mem == nil {
		local := []unix.Iovec{{Base: unsafe.SliceData(buf)}}
		local[0].SetLen(len(buf))
		remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}
		c, err := unix.ProcessVMReadv(os.Getpid(), local, remote, 0)
		if err == nil || !(errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOSYS)) {
			return err == nil && c == len(buf)
		}
		f, err := os.Open("/proc/self/mem")
		if err != nil {
			return false
		}
		n.mem = f
	}
	c, err := n.mem.ReadAt(buf, int64(addr))
	return err == nil && c == len(buf)
}

// Close releases what resolving opened.
func (n *Names) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mem == nil {
		return nil
	}
	err := n.mem.Close()
	n.mem = nil
	return err
}
