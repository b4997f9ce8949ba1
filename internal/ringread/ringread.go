// Package ringread drains a BPF ring buffer into a handler.
package ringread

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
)

// Reader drains one ring buffer. The kernel side wakes it only when a
// threshold of unread data is crossed (see fm_submit), so it also drains on
// a timer: events wait at most one interval.
type Reader struct {
	rd       *ringbuf.Reader
	interval time.Duration
	handle   func([]byte)
	read     *atomic.Uint64
	stopping atomic.Bool
}

// New opens a reader on m. Each record is passed to handle, valid only for
// the duration of the call; read counts them.
func New(m *ebpf.Map, interval time.Duration, handle func([]byte), read *atomic.Uint64) (*Reader, error) {
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		return nil, fmt.Errorf("opening ring buffer %s: %w", m, err)
	}
	return &Reader{rd: rd, interval: interval, handle: handle, read: read}, nil
}

// Run reads until Stop or Close. It returns nil then, and the error
// otherwise.
func (r *Reader) Run() error {
	var rec ringbuf.Record
	r.rd.SetDeadline(time.Now().Add(r.interval))
	for {
		err := r.rd.ReadInto(&rec)
		switch {
		case err == nil:
			r.handle(rec.RawSample)
			r.read.Add(1)
		case errors.Is(err, os.ErrDeadlineExceeded):
			r.rd.SetDeadline(time.Now().Add(r.interval))
		case errors.Is(err, ringbuf.ErrFlushed):
			if r.stopping.Load() {
				return nil // everything submitted before Stop was read
			}
		case errors.Is(err, ringbuf.ErrClosed):
			return nil
		default:
			return fmt.Errorf("reading ring buffer: %w", err)
		}
	}
}

// Stop makes Run read every record already in the ring buffer, then
// return. Records the kernel submits after Stop may not be read.
func (r *Reader) Stop() error {
	r.stopping.Store(true)
	return r.rd.Flush()
}

// Close stops Run at once and releases the reader. Safe to call more than once.
func (r *Reader) Close() error {
	err := r.rd.Close()
	if errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}
