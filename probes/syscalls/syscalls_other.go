//go:build !linux

package syscalls

import (
	"fmt"
	"runtime"

	"github.com/flowmill/flowmill/internal/probe"
)

var errNotLinux = fmt.Errorf("syscalls: %w: eBPF probes need Linux, this is %s", probe.ErrNotSupported, runtime.GOOS)

// attachment is never created off Linux.
type attachment struct{}

func (*attachment) snapshot() ([]Counts, error)   { return nil, errNotLinux }
func (*attachment) totalCounts() ([]Count, error) { return nil, errNotLinux }

// Attach fails: the probe needs Linux.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	return nil, errNotLinux
}
