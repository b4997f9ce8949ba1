//go:build linux

package goexe

import "testing"

func TestAnalyzeSynthetic(t *testing.T) {
	code := []byte{
		0xf3, 0x0f, 0x1e, 0xfa, // ENDBR64
		0x49, 0x3b, 0x66, 0x10, // CMPQ SP, 0x10(R14)
		0x76, 0x10, // JBE +0x10
		0x55,             // PUSHQ BP
		0x48, 0x89, 0xe5, // MOVQ SP, BP
		0x74, 0x02, // JE +2
		0x5d,                         // POPQ BP
		0xc3,                         // RET
		0xb8, 0xc3, 0x00, 0x00, 0x00, // MOVL $0xc3, AX: a C3 byte that is no RET
		0x5d,       // POPQ BP
		0xc3,       // RET
		0xcc, 0xcc, // INT3 padding
	}
	p, err := Analyze(code)
	if err != nil {
		t.Fatal(err)
	}
	if p.Entry != 10 {
		t.Errorf("Entry = %d, want 10 (after the stack check)", p.Entry)
	}
	if len(p.Returns) != 2 || p.Returns[0] != 17 || p.Returns[1] != 24 {
		t.Errorf("Returns = %v, want [17 24]", p.Returns)
	}
	if _, err := Analyze([]byte{0x55, 0x0f, 0xff}); err == nil {
		t.Error("undecodable code: no error")
	}
	if _, err := Analyze([]byte{0x55, 0x5d}); err == nil {
		t.Error("code without RET: no error")
	}
	nosplit, err := Analyze([]byte{0x48, 0x89, 0xc3, 0xc3})
	if err != nil || nosplit.Entry != 0 {
		t.Errorf("no stack check: Entry = %d, err %v; want 0", nosplit.Entry, err)
	}
}
