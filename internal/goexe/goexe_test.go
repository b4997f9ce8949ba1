//go:build linux

package goexe

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestGoroutineIDOffset(t *testing.T) {
	off, err := GoroutineIDOffset()
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		done := make(chan struct{})
		go func() {
			defer close(done)
			want, err := currentGoid()
			if err != nil {
				t.Error(err)
				return
			}
			if got := GoroutineID(off); got != want {
				t.Errorf("GoroutineID = %d, runtime.Stack says %d", got, want)
			}
		}()
		<-done
	}
}

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

//go:noinline
func retTwice(x int) int {
	if x > 3 {
		return x * 7
	}
	var buf [64]int
	for i := range buf {
		buf[i] = i * x
	}
	return buf[x&63]
}

// TestOwnBinary analyzes functions of this very test binary, built
// normally and found through the pclntab.
func TestOwnBinary(t *testing.T) {
	_ = retTwice(1)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	checkBinary(t, exe, "github.com/flowmill/flowmill/internal/goexe.retTwice")
}

func checkBinary(t *testing.T, path, name string) {
	t.Helper()
	e, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	fn, ok, err := e.Lookup(name)
	if err != nil || !ok {
		t.Fatalf("Lookup(%s) = %v, %v", name, ok, err)
	}
	code, err := e.Code(fn)
	if err != nil {
		t.Fatal(err)
	}
	p, err := Analyze(code)
	if err != nil {
		t.Fatal(err)
	}
	if p.Entry == 0 {
		t.Errorf("%s: no stack check found", name)
	}
	for _, r := range p.Returns {
		if code[r] != 0xc3 {
			t.Errorf("%s+%#x: byte %#x is not RET", name, r, code[r])
		}
	}
	// The file offset reads the same bytes as the code.
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, len(code))
	if _, err := f.ReadAt(b, int64(fn.Offset)); err != nil {
		t.Fatal(err)
	}
	if string(b) != string(code) {
		t.Errorf("%s: bytes at file offset %#x differ from the function's code", name, fn.Offset)
	}
	if _, ok, _ := e.Lookup("no/such.function"); ok {
		t.Error("Lookup of a missing function: ok")
	}
}

// TestStrippedBinary finds net/http functions in a program built with
// -ldflags='-s -w' (no ELF symbols).
func TestStrippedBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a program")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\nimport \"net/http\"\nfunc main() { http.ListenAndServe(\"127.0.0.1:0\", nil); http.Get(\"http://127.0.0.1:1\") }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, pie := range []bool{false, true} {
		bin := filepath.Join(dir, fmt.Sprintf("srv-pie%v", pie))
		args := []string{"build", "-ldflags=-s -w", "-o", bin}
		if pie {
			args = append(args, "-buildmode=pie")
		}
		cmd := exec.Command("go", append(args, src)...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		if f, err := elf.Open(bin); err == nil {
			if _, err := f.Symbols(); err == nil {
				t.Errorf("%s still has a symbol table", bin)
			}
			f.Close()
		}
		checkBinary(t, bin, "net/http.serverHandler.ServeHTTP")
		checkBinary(t, bin, "net/http.(*Transport).roundTrip")
	}
}
