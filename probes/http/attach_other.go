//go:build !linux || !amd64

package http

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/internal/probe"
)

// Attach fails: the probe attaches uprobes (Linux only) at offsets found by
// decoding x86-64 machine code, and reads arguments and the goroutine from
// the registers of Go's amd64 ABIInternal.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	return nil, fmt.Errorf("http: %w: the HTTP probe needs linux/amd64 (it decodes x86-64 code and reads Go's amd64 register ABI), this is %s/%s", probe.ErrNotSupported, runtime.GOOS, runtime.GOARCH)
}

// attachment is never made here.
type attachment struct{}

func (*attachment) propagationStats() PropagationStats { return PropagationStats{} }

func (*attachment) eachSeries(func(string, func() (requestSeries, bool), *redBuckets)) error {
	return nil
}

func (*attachment) unaggregated() uint64 { return 0 }
