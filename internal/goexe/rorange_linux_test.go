package goexe

import (
	"testing"
	"unsafe"
)

const roText = "a constant of the test binary"

// TestReadOnlyRange: a string constant lies in the range, a heap string
// does not.
func TestReadOnlyRange(t *testing.T) {
	lo, hi, err := ReadOnlyRange()
	if err != nil {
		t.Fatal(err)
	}
	p := uint64(uintptr(unsafe.Pointer(unsafe.StringData(roText))))
	if p < lo || p+uint64(len(roText)) > hi {
		t.Errorf("constant at %#x outside [%#x, %#x)", p, lo, hi)
	}
	heap := string(append([]byte(nil), roText...))
	if h := uint64(uintptr(unsafe.Pointer(unsafe.StringData(heap)))); h >= lo && h < hi {
		t.Errorf("heap string at %#x inside [%#x, %#x)", h, lo, hi)
	}
}
