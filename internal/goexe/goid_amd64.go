package goexe

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"unsafe"
)

// getg returns the current goroutine's runtime g, the value Go code keeps
// in R14 (ABIInternal) and in thread-local storage.
func getg() unsafe.Pointer

// gScan bounds the search in g: the goroutine ID sits well inside the first
// 256 bytes of every Go release, and g is larger than that.
const gScan = 256

// GoroutineIDOffset finds the offset of the goroutine ID (runtime.g.goid)
// in the runtime's g structure of the running program, by looking, in a few
// goroutines, for the word equal to the ID that runtime.Stack reports. The
// runtime's layout is private and changes between Go releases; asking the
// running program is exact for it.
func GoroutineIDOffset() (uint64, error) {
	var cand []uint64
	for i := range 4 {
		type res struct {
			offs []uint64
			err  error
		}
		ch := make(chan res, 1)
		go func() {
			id, err := currentGoid()
			if err != nil {
				ch <- res{err: err}
				return
			}
			g := getg()
			var offs []uint64
			for off := uintptr(0); off < gScan; off += 8 {
				if *(*uint64)(unsafe.Add(g, off)) == id {
					offs = append(offs, uint64(off))
				}
			}
			ch <- res{offs: offs}
		}()
		r := <-ch
		if r.err != nil {
			return 0, r.err
		}
		if i == 0 {
			cand = r.offs
			continue
		}
		cand = intersect(cand, r.offs)
	}
	if len(cand) != 1 {
		return 0, fmt.Errorf("cannot locate the goroutine ID in runtime.g of %s (candidates %v)", runtime.Version(), cand)
	}
	return cand[0], nil
}

// GoroutineID returns the current goroutine's ID, read at off (from
// GoroutineIDOffset).
func GoroutineID(off uint64) uint64 {
	return *(*uint64)(unsafe.Add(getg(), off))
}

func intersect(a, b []uint64) []uint64 {
	var out []uint64
	for _, x := range a {
		for _, y := range b {
			if x == y {
				out = append(out, x)
			}
		}
	}
	return out
}

// currentGoid parses "goroutine N [" from the current goroutine's trace.
func currentGoid() (uint64, error) {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b, ok := bytes.CutPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); ok && i > 0 {
		return strconv.ParseUint(string(b[:i]), 10, 64)
	}
	return 0, errors.New("unexpected runtime.Stack format")
}
