package goexe

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ReadOnlyRange returns [lo, hi), the first run of adjacent mappings of the
// running executable that are not writable (its text and read-only data,
// where the Go linker puts string constants), from /proc/self/maps. Bytes
// there never change for the life of the process: a probe may report the
// address of a string in it instead of copying the string (which a uprobe
// program cannot do from a page not yet faulted in), and user space, the
// same process, reads it in place.
func ReadOnlyRange() (lo, hi uint64, err error) {
	path, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, 0, fmt.Errorf("resolving the executable: %w", err)
	}
	data, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, 0, fmt.Errorf("reading the mappings: %w", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || strings.Join(f[5:], " ") != path {
			continue
		}
		a, b, ok := strings.Cut(f[0], "-")
		s, err1 := strconv.ParseUint(a, 16, 64)
		e, err2 := strconv.ParseUint(b, 16, 64)
		if !ok || err1 != nil || err2 != nil {
			return 0, 0, fmt.Errorf("malformed mapping %q", line)
		}
		writable := strings.Contains(f[1], "w")
		switch {
		case hi == 0 && !writable:
			lo, hi = s, e
		case hi != 0 && !writable && s == hi:
			hi = e
		case hi != 0:
			return lo, hi, nil
		}
	}
	if hi == 0 {
		return 0, 0, fmt.Errorf("no read-only mapping of %s", path)
	}
	return lo, hi, nil
}
