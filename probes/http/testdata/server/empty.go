package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/goexe"
)

// emptyUprobes attaches a program that does nothing where the HTTP probe
// attaches on the server side (after the stack check of
// serverHandler.ServeHTTP and on its RETs): the cost of the traps alone.
func emptyUprobes() (*ebpf.Program, func(), error) {
	exe, err := goexe.Open("/proc/self/exe")
	if err != nil {
		return nil, nil, err
	}
	defer exe.Close()
	fn, ok, err := exe.Lookup("net/http.serverHandler.ServeHTTP")
	if err != nil || !ok {
		return nil, nil, fmt.Errorf("serverHandler.ServeHTTP: %v %v", ok, err)
	}
	code, err := exe.Code(fn)
	if err != nil {
		return nil, nil, err
	}
	pr, err := goexe.Analyze(code)
	if err != nil {
		return nil, nil, err
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Kprobe,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return nil, nil, err
	}
	ex, err := link.OpenExecutable("/proc/self/exe")
	if err != nil {
		return nil, nil, err
	}
	var links []link.Link
	closeAll := func() {
		for _, l := range links {
			l.Close()
		}
		prog.Close()
	}
	for _, at := range append([]uint64{pr.Entry}, pr.Returns...) {
		l, err := ex.Uprobe(fn.Name, prog, &link.UprobeOptions{Address: fn.Offset, Offset: at, PID: os.Getpid()})
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		links = append(links, l)
	}
	return prog, closeAll, nil
}

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
