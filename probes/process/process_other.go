//go:build !linux

package process

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/probes"
)

// Attach fails: the probe needs Linux.
func (p *Probe) Attach(env *probes.Env) (probes.Attachment, error) {
	return nil, fmt.Errorf("process: %w: eBPF probes need Linux, this is %s", probes.ErrNotSupported, runtime.GOOS)
}
