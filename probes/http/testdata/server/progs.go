package main

import (
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// probePrograms finds the HTTP probe's programs among this process's file
// descriptors (not other processes' programs of the same name), for their
// run counts.
func probePrograms() []*ebpf.Program {
	var out []*ebpf.Program
	seen := map[uint64]bool{}
	fds, _ := os.ReadDir("/proc/self/fdinfo")
	for _, fd := range fds {
		b, err := os.ReadFile("/proc/self/fdinfo/" + fd.Name())
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			v, ok := strings.CutPrefix(l, "prog_id:")
			if !ok {
				continue
			}
			id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil || seen[id] {
				continue
			}
			seen[id] = true
			p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
			if err != nil {
				continue
			}
			info, err := p.Info()
			if err != nil || !strings.HasPrefix(info.Name, "server_") && !strings.HasPrefix(info.Name, "client_") {
				p.Close()
				continue
			}
			out = append(out, p)
		}
	}
	return out
}

// progStats returns the run count and run time of each eBPF program of
// this process, by name (needs BPF_ENABLE_STATS).
func progStats() map[string][2]uint64 {
	out := map[string][2]uint64{}
	seen := map[uint64]bool{}
	fds, _ := os.ReadDir("/proc/self/fdinfo")
	for _, fd := range fds {
		b, err := os.ReadFile("/proc/self/fdinfo/" + fd.Name())
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			v, ok := strings.CutPrefix(l, "prog_id:")
			if !ok {
				continue
			}
			id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil || seen[id] {
				continue
			}
			seen[id] = true
			p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id))
			if err != nil {
				continue
			}
			info, err1 := p.Info()
			st, err2 := p.Stats()
			p.Close()
			if err1 != nil || err2 != nil {
				continue
			}
			s := out[info.Name]
			out[info.Name] = [2]uint64{s[0] + st.RunCount, s[1] + uint64(st.Runtime)}
		}
	}
	return out
}
