package gotype

import (
	"context"
	"errors"
	"net"
	"os"
	"runtime"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dynErr is converted to error only at run time (from an any, below), so
// its error itab is one the runtime builds then, not one the linker wrote.
type dynErr struct{ _ [3]uint64 }

func (dynErr) Error() string { return "dyn" }

func itabOf(err error) uint64 { return uint64(*(*uintptr)(unsafe.Pointer(&err))) }

// newErrNames resolves error itabs.
func newErrNames(t *testing.T) *Names {
	var e error = errors.New("")
	n := New(unsafe.Pointer(&e))
	t.Cleanup(func() { n.Close() })
	return n
}

// genericErr's name has brackets and a package path inside them.
type genericErr[T any] struct{ v T }

func (*genericErr[T]) Error() string { return "generic" }

func TestErrorType(t *testing.T) {
	r := newErrNames(t)
	var boxed any = dynErr{}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Err: errors.New("x")}, "*net.OpError"},
		{errors.New("plain"), "*errors.errorString"},
		{net.UnknownNetworkError("x"), "net.UnknownNetworkError"},
		{context.DeadlineExceeded, "context.deadlineExceededError"},
		{&genericErr[net.IP]{}, "*gotype.genericErr[net.IP]"},
		{boxed.(error), "gotype.dynErr"},
	} {
		for range 2 { // the second time from the cache
			if got, ok := r.Name(itabOf(tc.err)); got != tc.want || !ok {
				t.Errorf("name = %q, %v; want %q", got, ok, tc.want)
			}
		}
	}
	if s, ok := r.Name(0); s != "" || !ok {
		t.Errorf("no error: %q, %v; want empty", s, ok)
	}
}

// TestErrorTypeBogus: whatever the kernel reports as an itab, resolving it
// never crashes the program; what is not an error itab does not resolve.
// (Dereferencing these, as the probe once did, faults or throws.)
func TestErrorTypeBogus(t *testing.T) {
	r := newErrNames(t)
	if r.base == 0 {
		t.Fatal("the type data was not found in this program")
	}
	// An unmapped page between two mapped ones, the first of which may
	// not be read.
	pg := uintptr(os.Getpagesize())
	mem, err := unix.MmapPtr(-1, 0, nil, 3*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.MunmapPtr(mem, 3*pg) })
	if err := unix.MunmapPtr(unsafe.Add(mem, pg), pg); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mprotect(unsafe.Slice((*byte)(mem), pg), unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	noAccess := uint64(uintptr(mem))
	hole := noAccess + uint64(pg)
	// Fake itabs in Go memory: the error interface type, then a type
	// pointer that is not one.
	real := itabOf(errors.New("x"))
	fakeType := make([]uint64, 8) // a "type" whose fields are garbage
	for i := range fakeType {
		fakeType[i] = 0xfefefefefefefefe
	}
	fakeType[2] = 0x19_00000000 // plausible kind; Str below
	fakeType[5] = 0x7fff_fff0   // Str: far beyond the type data
	junk := []byte("not a type descriptor, just bytes on the heap, long enough to read")
	fakes := [][2]uint64{
		{r.inter, 0},
		{r.inter, 1},
		{r.inter, hole},
		{r.inter, noAccess},
		{r.inter, ^uint64(0) - 8},
		{r.inter, uint64(uintptr(unsafe.Pointer(&fakeType[0])))},
		{r.inter, uint64(uintptr(unsafe.Pointer(&junk[0])))},
		{0, real},
	}
	text := uint64(0)
	if pc, _, _, ok := runtime.Caller(0); ok {
		text = uint64(pc)
	}
	str := "a string constant in read-only data"
	values := []uint64{
		1, 8, 0xdeadbeef, 0xfefefefefefefefe, 1 << 47, 1<<47 - 8, ^uint64(0), ^uint64(0) - 15,
		hole, hole - 8, noAccess, text, r.inter, r.base, r.base + 1<<20,
		uint64(uintptr(unsafe.Pointer(unsafe.StringData(str)))),
		uint64(uintptr(unsafe.Pointer(&fakeType[0]))),
		real + 1, real - 8,
	}
	for i := range fakes {
		values = append(values, uint64(uintptr(unsafe.Pointer(&fakes[i]))))
	}
	for _, v := range values {
		if s, ok := r.Name(v); ok || s != "" {
			t.Errorf("itab %#x resolved to %q", v, s)
		}
	}
	runtime.KeepAlive(fakes)
	runtime.KeepAlive(fakeType)
	runtime.KeepAlive(junk)
	// The real one still resolves.
	if s, ok := r.Name(real); s != "*errors.errorString" || !ok {
		t.Errorf("real itab: %q, %v", s, ok)
	}
}

// Where process_vm_readv is refused (a seccomp filter), /proc/self/mem is
// read instead, with the same results.
func TestErrorTypeProcMem(t *testing.T) {
	r := newErrNames(t)
	f, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Skipf("no /proc/self/mem: %v", err)
	}
	r.mem = f
	if s, ok := r.Name(itabOf(&net.OpError{})); s != "*net.OpError" || !ok {
		t.Errorf("real itab: %q, %v", s, ok)
	}
	for _, v := range []uint64{1, 0xdeadbeef, ^uint64(0) - 15, 1 << 47} {
		if s, ok := r.Name(v); ok || s != "" {
			t.Errorf("itab %#x resolved to %q", v, s)
		}
	}
}
