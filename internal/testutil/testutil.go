// Package testutil holds helpers shared by flowmill's tests.
package testutil

import (
	"errors"
	"os"
	"testing"

	"github.com/flowmill/flowmill/probes"
)

// Required reports whether privileged tests must run (FLOWMILL_REQUIRE_BPF=1,
// set in CI): then a test that cannot run fails instead of skipping.
func Required() bool { return os.Getenv("FLOWMILL_REQUIRE_BPF") == "1" }

// RequireBPF skips t, with the reason, when the process is not root; with
// FLOWMILL_REQUIRE_BPF=1 it fails t instead.
func RequireBPF(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root to load eBPF programs (run the tests with sudo)")
	}
}

// Unavailable skips t with reason, or fails it when FLOWMILL_REQUIRE_BPF=1.
func Unavailable(t testing.TB, reason string, args ...any) {
	t.Helper()
	if Required() {
		t.Fatalf("FLOWMILL_REQUIRE_BPF=1 but the test cannot run: "+reason, args...)
	}
	t.Skipf("skipped: "+reason, args...)
}

// CheckStart handles an error from starting a session or attaching a probe:
// a missing privilege or kernel feature skips (or fails, see Unavailable);
// any other error fails the test.
func CheckStart(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	for _, e := range []error{probes.ErrPermission, probes.ErrNoBTF, probes.ErrNotSupported, probes.ErrMissingHook} {
		if errors.Is(err, e) {
			Unavailable(t, "%v", err)
		}
	}
	t.Fatalf("start: %v", err)
}

// Need skips (or fails) t when a command the test drives is not installed.
func Need(t testing.TB, lookPath func(string) (string, error), cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if _, err := lookPath(c); err != nil {
			Unavailable(t, "needs %s on PATH (.ci/run installs it)", c)
		}
	}
}
