// Package intern turns the kernel's fixed-size task names into Go strings
// without allocating for names seen before.
package intern

// Comms interns task names (the kernel's 16-byte comm). It is bounded: when
// full it starts over. It is not safe for concurrent use: each decoder
// goroutine has its own.
type Comms struct {
	last    [16]byte
	lastStr string
	m       map[[16]byte]string
}

const maxComms = 4096

// String returns comm up to its first NUL as a string.
func (c *Comms) String(comm *[16]byte) string {
	if *comm == c.last && c.lastStr != "" {
		return c.lastStr
	}
	s, ok := c.m[*comm]
	if !ok {
		if c.m == nil || len(c.m) >= maxComms {
			c.m = make(map[[16]byte]string, 64)
		}
		n := 0
		for n < len(comm) && comm[n] != 0 {
			n++
		}
		s = string(comm[:n])
		c.m[*comm] = s
	}
	c.last, c.lastStr = *comm, s
	return s
}
