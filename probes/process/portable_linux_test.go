package process

import (
	"testing"

	"github.com/flowmill/flowmill/internal/testutil"
)

// TestPortable checks the object for what Linux 5.10 lacks.
func TestPortable(t *testing.T) {
	spec, err := loadProcessBPF()
	if err != nil {
		t.Fatal(err)
	}
	testutil.Portable(t, spec)
}
