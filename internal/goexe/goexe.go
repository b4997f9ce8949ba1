// Package goexe inspects a Go executable for uprobes: where its functions
// are in the file, read from the Go pclntab (which -ldflags='-s -w' keeps:
// the runtime needs it), and where they return, found by disassembly.
//
// Uprobes take file offsets, so everything here is computed from the file
// and is independent of where (PIE, ASLR) the program is loaded.
package goexe

import (
	"bytes"
	"debug/elf"
	"debug/gosym"
	"errors"
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

// Func is a function of the executable.
type Func struct {
	// Name is the pclntab name, e.g. "net/http.(*Transport).roundTrip".
	Name string
	// Entry and End are the function's virtual addresses in the file
	// (before any load bias); End is exclusive.
	Entry, End uint64
	// Offset is the file offset of Entry, what a uprobe attaches to.
	Offset uint64
}

// Exe is an opened Go executable.
type Exe struct {
	elf *elf.File
	tab *gosym.Table
}

// Open reads the ELF headers and the Go pclntab of the executable at path.
// It works on stripped binaries (-ldflags='-s -w').
func Open(path string) (*Exe, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening executable %s: %w", path, err)
	}
	if f.Machine != elf.EM_X86_64 {
		f.Close()
		return nil, fmt.Errorf("executable %s is for %v; only x86-64 is supported", path, f.Machine)
	}
	pcln := f.Section(".gopclntab")
	text := f.Section(".text")
	if pcln == nil || text == nil {
		f.Close()
		return nil, fmt.Errorf("executable %s has no .gopclntab or .text section: is it a Go program?", path)
	}
	data, err := pcln.Data()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("reading .gopclntab of %s: %w", path, err)
	}
	tab, err := gosym.NewTable(nil, gosym.NewLineTable(data, text.Addr))
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("parsing the Go pclntab of %s: %w", path, err)
	}
	return &Exe{elf: f, tab: tab}, nil
}

// Close releases the file.
func (e *Exe) Close() error { return e.elf.Close() }

// Lookup finds a function by its pclntab name. ok is false when the linker
// left it out (the program never calls it).
func (e *Exe) Lookup(name string) (fn Func, ok bool, err error) {
	f := e.tab.LookupFunc(name)
	if f == nil {
		return Func{}, false, nil
	}
	off, err := e.fileOffset(f.Entry)
	if err != nil {
		return Func{}, false, fmt.Errorf("function %s: %w", name, err)
	}
	return Func{Name: name, Entry: f.Entry, End: f.End, Offset: off}, true, nil
}

func (e *Exe) fileOffset(addr uint64) (uint64, error) {
	for _, p := range e.elf.Progs {
		if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && p.Vaddr <= addr && addr < p.Vaddr+p.Filesz {
			return addr - p.Vaddr + p.Off, nil
		}
	}
	return 0, fmt.Errorf("address %#x is in no executable segment", addr)
}

// Code returns the machine code of fn.
func (e *Exe) Code(fn Func) ([]byte, error) {
	if fn.End <= fn.Entry || fn.End-fn.Entry > 1<<20 {
		return nil, fmt.Errorf("function %s has implausible bounds [%#x, %#x)", fn.Name, fn.Entry, fn.End)
	}
	code := make([]byte, fn.End-fn.Entry)
	for _, p := range e.elf.Progs {
		if p.Type == elf.PT_LOAD && p.Vaddr <= fn.Entry && fn.End <= p.Vaddr+p.Filesz {
			if _, err := p.ReadAt(code, int64(fn.Entry-p.Vaddr)); err != nil {
				return nil, fmt.Errorf("reading the code of %s: %w", fn.Name, err)
			}
			return code, nil
		}
	}
	return nil, fmt.Errorf("function %s is in no loadable segment", fn.Name)
}

// Probes are where to attach to a function: after its stack check on
// entry, and at each RET.
type Probes struct {
	// Entry is the offset in the function of the first instruction that
	// runs exactly once per call (see EntryOffset).
	Entry uint64
	// Returns are the offsets in the function of its RET instructions.
	Returns []uint64
}

// Analyze disassembles code (a whole function) and returns where to attach.
func Analyze(code []byte) (Probes, error) {
	insts, err := decode(code)
	if err != nil {
		return Probes{}, err
	}
	var p Probes
	p.Entry = entryOffset(insts)
	for _, in := range insts {
		if in.op == x86asm.RET {
			p.Returns = append(p.Returns, in.off)
		}
	}
	if len(p.Returns) == 0 {
		return Probes{}, errors.New("no RET instruction: the function never returns normally")
	}
	return p, nil
}

type inst struct {
	off uint64
	op  x86asm.Op
	x86asm.Inst
}

var endbr64 = []byte{0xf3, 0x0f, 0x1e, 0xfa}

// decode decodes every instruction of code. Any byte sequence it cannot
// decode is an error: a uprobe placed off an instruction boundary would
// corrupt the program, so guessing is not an option.
func decode(code []byte) ([]inst, error) {
	var out []inst
	for off := 0; off < len(code); {
		if bytes.HasPrefix(code[off:], endbr64) {
			out = append(out, inst{off: uint64(off)})
			off += len(endbr64)
			continue
		}
		in, err := x86asm.Decode(code[off:], 64)
		if err != nil {
			return nil, fmt.Errorf("cannot decode the instruction at offset %#x (% x): %w", off, code[off:min(off+8, len(code))], err)
		}
		out = append(out, inst{off: uint64(off), op: in.Op, Inst: in})
		off += in.Len
	}
	return out, nil
}

// entryOffset skips the Go stack-growth check. A Go function starts with
//
//	CMPQ SP, 16(R14)       (or LEAQ -n(SP), R12; CMPQ R12, 16(R14))
//	JBE  morestack
//
// and morestack restarts the function from its first instruction once the
// stack has grown, so a probe there can fire twice for one call. The
// instruction after the JBE runs once per call, and the arguments are
// still in their registers there. Functions without the check (NOSPLIT)
// are probed at offset 0.
func entryOffset(insts []inst) uint64 {
	for i, in := range insts {
		if i >= 4 {
			break
		}
		if in.op != x86asm.CMP || i+1 >= len(insts) {
			continue
		}
		usesG := false
		for _, a := range in.Args {
			if m, ok := a.(x86asm.Mem); ok && m.Base == x86asm.R14 {
				usesG = true
			}
		}
		next := insts[i+1]
		if usesG && (next.op == x86asm.JBE || next.op == x86asm.JB) {
			return next.off + uint64(next.Len)
		}
	}
	return 0
}
