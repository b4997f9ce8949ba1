// Package ringread drains a BPF ring buffer into a handler.
package ringread

import (
	"errors"
	"fmt"
	"os"
	"sync"
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

	mu      sync.Mutex
	waiters []chan struct{} // Sync calls waiting for the next flush
	done    bool            // Run has returned
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
	defer func() {
		r.mu.Lock()
		r.done = true
		r.mu.Unlock()
		r.release()
	}()
	var rec ringbuf.Record
	r.rd.SetDeadline(time.Now().Add(r.interval))
	for {
		err := r.rd.ReadInto(&rec)
		switch {
		case err == nil:
			// Counted before it is handled: a subscriber that saw the
			// event never sees a count without it.
			r.read.Add(1)
			r.handle(rec.RawSample)
		case errors.Is(err, os.ErrDeadlineExceeded):
			r.rd.SetDeadline(time.Now().Add(r.interval))
		case errors.Is(err, ringbuf.ErrFlushed):
			if r.stopping.Load() {
				return nil // everything submitted before Stop was read
			}
			r.release()
		case errors.Is(err, ringbuf.ErrClosed):
			return nil
		default:
			return fmt.Errorf("reading ring buffer: %w", err)
		}
	}
}

// release wakes the Sync calls waiting for this flush; after Run returned,
// it also makes later ones return at once.
func (r *Reader) release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, w := range r.waiters {
		close(w)
	}
	r.waiters = nil
}

// Sync returns once Run has handled every record the kernel submitted
// before the call (or Run has stopped, or a second has passed). It lets a
// probe that answers a question about the kernel's state first catch up
// with the records already waiting, instead of waiting for the timer.
func (r *Reader) Sync() {
	w := make(chan struct{})
	r.mu.Lock()
	if r.done || r.stopping.Load() {
		r.mu.Unlock()
		return
	}
	r.waiters = append(r.waiters, w)
	r.mu.Unlock()
	if err := r.rd.Flush(); err != nil {
		return
	}
	select {
	case <-w:
	case <-time.After(time.Second):
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
