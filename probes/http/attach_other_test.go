//go:build !linux || !amd64

package http

import (
	"errors"
	"runtime"
	"strings"
	"testing"

	"github.com/flowmill/flowmill/internal/probe"
)

func TestAttachNotSupported(t *testing.T) {
	_, err := New().Attach(&probe.Env{})
	if !errors.Is(err, probe.ErrNotSupported) {
		t.Fatalf("Attach on %s/%s = %v, want ErrNotSupported", runtime.GOOS, runtime.GOARCH, err)
	}
	if !strings.Contains(err.Error(), "linux/amd64") {
		t.Errorf("error %q does not say what the probe needs", err)
	}
}
