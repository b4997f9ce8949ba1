//go:build linux

// Package emptyuprobe attaches uprobes that do nothing where a probe
// family attaches, for the benchmarks' floor: the cost of the traps alone.
package emptyuprobe

import (
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/goexe"
)

// ServeHTTP attaches a program that does nothing where the HTTP probe
// attaches on the server side (after the stack check of
// serverHandler.ServeHTTP and on its RETs): the cost of the traps alone.
func ServeHTTP() (*ebpf.Program, func(), error) {
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
