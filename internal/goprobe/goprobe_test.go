package goprobe

import (
	"strconv"
	"testing"
	"time"
	"unsafe"
)

func bytes(s string) []int8 {
	b := make([]int8, 16)
	for i := range len(s) {
		b[i] = int8(s[i])
	}
	return b
}

func TestInterner(t *testing.T) {
	var s Interner
	a := s.String(bytes("GET"), 3)
	b := s.String(bytes("GET"), 3)
	if a != "GET" || unsafe.StringData(a) != unsafe.StringData(b) {
		t.Errorf("%q %q: want one string, interned", a, b)
	}
	if got := s.String(bytes("POSTED"), 4); got != "POST" {
		t.Errorf("first 4 bytes: %q", got)
	}
	if got := s.String(bytes("x"), 100); len(got) != 16 {
		t.Errorf("a length past the buffer: %d bytes, want the buffer's 16", len(got))
	}
	for i := range 10000 {
		s.String(bytes(strconv.Itoa(i)), 5)
	}
	if len(s.m) > 4096 {
		t.Errorf("%d strings held, want at most 4096", len(s.m))
	}
	if n := testing.AllocsPerRun(100, func() { s.String(bytes("GET"), 3) }); n > 1 { // the bytes() buffer
		t.Errorf("%v allocations for a known string", n)
	}
}

func TestSweepDisabled(t *testing.T) {
	done := make(chan struct{})
	go func() {
		Sweep(make(chan struct{}), 0, func(uint64) { t.Error("swept with staleAfter 0") })
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Sweep with staleAfter 0 did not return")
	}
}
