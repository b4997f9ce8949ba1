//go:build !linux || !amd64

package http

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/probes"
)

// Attach fails: the probe reads Go's amd64 register ABI with uprobes, on
// Linux only.
func (p *Probe) Attach(env *probes.Env) (probes.Attachment, error) {
	return nil, fmt.Errorf("http: %w: the HTTP probe needs linux/amd64, this is %s/%s", probes.ErrNotSupported, runtime.GOOS, runtime.GOARCH)
}
