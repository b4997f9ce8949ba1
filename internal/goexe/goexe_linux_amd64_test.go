// These tests inspect this very (amd64) process and binaries the host's go
// builds: Open accepts x86-64 executables only, and GoroutineIDOffset reads
// g through amd64 assembly.

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
