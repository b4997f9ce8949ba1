//go:build !linux

package process

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/internal/probe"
)

// Attach fails: the probe needs Linux.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	return nil, fmt.Errorf("process: %w: eBPF probes need Linux, this is %s", probe.ErrNotSupported, runtime.GOOS)
}
