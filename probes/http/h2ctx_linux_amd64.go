//go:build linux && amd64

package http

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goprobe"
)

// The function whose entry reads an HTTP/2 request's decoded header
// fields (bpf/http.c, h2_headers), by Go release: net/http's bundled
// HTTP/2 (Go 1.26), net/http/internal/http2 (Go 1.27).
var h2HeadersFuncs = []string{
	"net/http.(*http2serverConn).newWriterAndRequest",
	"net/http/internal/http2.(*serverConn).newWriterAndRequest",
}

var (
	h2FieldsMu  sync.Mutex
	h2FieldsOff uint64 // learnt once per process: MetaHeadersFrame.Fields
	h2FieldsOK  bool
)

// learnH2Fields learns the offset of MetaHeadersFrame.Fields in this
// program, once per process: a type its reflect data cannot reach. It
// attaches bpf/h2learn.c's uprobe at t's entry (newWriterAndRequest(sc,
// st, f)), which copies the first words of *f and what each points to,
// serves one in-memory HTTP/2 request with a random traceparent and
// tracestate, and finds the word that is a slice ([]hpack.HeaderField,
// layout hf) whose elements hold those very strings (the handler's
// Request.Header shares them): both names of the right length, both values
// the same pointers and lengths. Exactly one offset must fit.
func learnH2Fields(ex *link.Executable, t target, hf hfLayout) (uint64, error) {
	h2FieldsMu.Lock()
	defer h2FieldsMu.Unlock()
	if h2FieldsOK {
		return h2FieldsOff, nil
	}
	spec, err := loadH2learnBPF()
	if err != nil {
		return 0, err
	}
	var objs struct {
		Prog    *ebpf.Program `ebpf:"h2_learn"`
		Learned *ebpf.Map     `ebpf:"learned"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return 0, fmt.Errorf("loading the learning program: %w", bpfload.Explain(err))
	}
	defer objs.Prog.Close()
	defer objs.Learned.Close()
	l, err := goprobe.Attach(ex, t.fn, t.probes.Entry, objs.Prog, os.Getpid())
	if err != nil {
		return 0, err
	}
	var id [24]byte
	rand.Read(id[:])
	id[0] |= 1 // valid IDs: not all zero
	id[16] |= 1
	tp := "00-" + hex.EncodeToString(id[:16]) + "-" + hex.EncodeToString(id[16:]) + "-01"
	ts := "flowmill=" + hex.EncodeToString(id[:8])
	var gotTP, gotTS string
	err = serveH2C(func(w http.ResponseWriter, r *http.Request) {
		if v := r.Header["Traceparent"]; len(v) == 1 {
			gotTP = v[0]
		}
		if v := r.Header["Tracestate"]; len(v) == 1 {
			gotTS = v[0]
		}
	}, http.Header{"Traceparent": {tp}, "Tracestate": {ts}})
	l.Close()
	if err != nil {
		return 0, err
	}
	if gotTP != tp || gotTS != ts {
		return 0, errors.New("the in-memory request's traceparent and tracestate did not reach its handler")
	}
	off, err := findFields(objs.Learned, hf, gotTP, gotTS)
	if err != nil {
		return 0, err
	}
	h2FieldsOff, h2FieldsOK = off, true
	return off, nil
}

// findFields looks in the learning program's records for the offset of
// the slice of fields holding tp and ts (by address and length).
func findFields(m *ebpf.Map, hf hfLayout, tp, ts string) (uint64, error) {
	var (
		k     uint64
		rec   h2learnBPFH2LearnRec
		found = map[uint64]bool{}
	)
	str := func(b []byte, o uint64) (uint64, uint64) {
		return binary.LittleEndian.Uint64(b[o:]), binary.LittleEndian.Uint64(b[o+8:])
	}
	is := func(s string) (uint64, uint64) {
		return uint64(uintptr(unsafe.Pointer(unsafe.StringData(s)))), uint64(len(s))
	}
	tpP, tpN := is(tp)
	tsP, tsN := is(ts)
	it := m.Iterate()
	for it.Next(&k, &rec) {
		for w := 0; w+2 < len(rec.Frame); w++ {
			ptr, n, c := rec.Frame[w], rec.Frame[w+1], rec.Frame[w+2]
			if ptr == 0 || n == 0 || n > c || n*hf.size > uint64(len(rec.At[w])) {
				continue
			}
			arr := rec.At[w][:n*hf.size]
			var hasTP, hasTS bool
			for e := uint64(0); e < n; e++ {
				b := arr[e*hf.size:]
				_, nl := str(b, hf.name)
				vp, vl := str(b, hf.value)
				hasTP = hasTP || (nl == uint64(len("traceparent")) && vp == tpP && vl == tpN)
				hasTS = hasTS || (nl == uint64(len("tracestate")) && vp == tsP && vl == tsN)
			}
			if hasTP && hasTS {
				found[uint64(w)*8] = true
			}
		}
	}
	if err := it.Err(); err != nil {
		return 0, err
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("the header fields of an HTTP/2 request were found at %d places in its frame, not one (%w)", len(found), errLayout)
	}
	var off uint64
	for o := range found {
		off = o
	}
	return off, nil
}

// h2ContextTarget returns the HTTP/2 header function among targets.
func h2ContextTarget(targets []target) (target, bool) {
	for _, t := range targets {
		for _, n := range h2HeadersFuncs {
			if t.fn.Name == n {
				return t, true
			}
		}
	}
	return target{}, false
}
