//go:build linux

package gotype

import (
	"io/fs"
	"os"
	"testing"
	"unsafe"
)

type myErr struct{}

func (*myErr) Error() string { return "" }

func TestNames(t *testing.T) {
	var e error = &fs.PathError{}
	n := New(unsafe.Pointer(&e))
	defer n.Close()
	for _, c := range []struct {
		err  error
		want string
	}{{&os.PathError{}, "*fs.PathError"}, {&myErr{}, "*gotype.myErr"}, {os.ErrNotExist, "*errors.errorString"}} {
		itab := uint64(*(*uintptr)(unsafe.Pointer(&c.err)))
		if got, ok := n.Name(itab); !ok || got != c.want {
			t.Errorf("Name(%T) = %q, %v; want %q", c.err, got, ok, c.want)
		}
	}
	var s interface{ String() string } = fakeStringer{}
	if got, ok := n.Name(uint64(*(*uintptr)(unsafe.Pointer(&s)))); ok {
		t.Errorf("an itab of another interface resolved: %q", got)
	}
	for _, bad := range []uint64{1, 0xdead0000, ^uint64(0) - 8} {
		if got, ok := n.Name(bad); ok {
			t.Errorf("Name(%#x) = %q: want false", bad, got)
		}
	}
}

type fakeStringer struct{}

func (fakeStringer) String() string { return "" }
