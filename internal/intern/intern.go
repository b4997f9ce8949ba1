// Package intern turns the kernel's fixed-size task names into Go strings
// without allocating for names seen before.
package intern

import "sync"

// Comms interns task names (the kernel's 16-byte comm). It is bounded: when
// full it starts over. Safe for concurrent use.
type Comms struct {
	mu sync.Mutex
	m  map[[16]byte]string
}

const maxComms = 4096

// String returns comm up to its first NUL as a string.
func (c *Comms) String(comm *[16]byte) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.m[*comm]; ok {
		return s
	}
	if c.m == nil || len(c.m) >= maxComms {
		c.m = make(map[[16]byte]string, 64)
	}
	n := 0
	for n < len(comm) && comm[n] != 0 {
		n++
	}
	s := string(comm[:n])
	c.m[*comm] = s
	return s
}
