//go:build !linux

package tcp

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/internal/probe"
)

// Attach fails: the probe needs Linux.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	return nil, fmt.Errorf("tcp: %w: eBPF probes need Linux, this is %s", probe.ErrNotSupported, runtime.GOOS)
}
