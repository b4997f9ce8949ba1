// Package testprog builds the programs flowmill's tests run as separate
// processes (test servers, examples), and lists them, so that the kernel
// matrix (internal/vmtest) can build them once on the host: a go build
// inside an emulated guest takes minutes.
package testprog

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Program is a main package a test builds, and the go build flags.
type Program struct {
	Pkg   string // import path
	Flags []string
}

const mod = "github.com/flowmill/flowmill/"

// The programs tests build. A test may only build what is listed here.
var (
	HTTPServer         = Program{Pkg: mod + "probes/http/testdata/server"}
	HTTPServerStripped = Program{Pkg: mod + "probes/http/testdata/server", Flags: []string{"-ldflags=-s -w"}}
	SysLoop            = Program{Pkg: mod + "probes/syscalls/testdata/sysloop"}
	Autoinst           = Program{Pkg: mod + "examples/autoinst"}
	Execlog            = Program{Pkg: mod + "examples/execlog"}
	OTLP               = Program{Pkg: mod + "examples/otlp"}
	Prometheus         = Program{Pkg: mod + "examples/prometheus"}

	All = []Program{HTTPServer, HTTPServerStripped, SysLoop, Autoinst, Execlog, OTLP, Prometheus}
)

// PrebuiltEnv names the directory holding every program of All, built by
// BuildAll; when it is set, Build takes programs from there.
const PrebuiltEnv = "FLOWMILL_PREBUILT"

// Name is the program's file name: its package path, and a digest of its
// flags when it has any.
func (p Program) Name() string {
	n := strings.ReplaceAll(strings.TrimPrefix(p.Pkg, mod), "/", "_")
	if len(p.Flags) > 0 {
		h := sha256.Sum256([]byte(strings.Join(p.Flags, "\x00")))
		n += "-" + hex.EncodeToString(h[:4])
	}
	return n
}

// Build returns the path of program p: the prebuilt one from
// $FLOWMILL_PREBUILT when that is set, otherwise p built into dir.
func Build(p Program, dir string) (string, error) {
	if pre := os.Getenv(PrebuiltEnv); pre != "" {
		bin := filepath.Join(pre, p.Name())
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("%s=%s has no %s (is it in testprog.All?): %w", PrebuiltEnv, pre, p.Pkg, err)
		}
		return bin, nil
	}
	return build(p, dir)
}

func build(p Program, dir string) (string, error) {
	bin := filepath.Join(dir, p.Name())
	args := append(append([]string{"build"}, p.Flags...), "-o", bin, p.Pkg)
	if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return bin, nil
}

// BuildAll builds every program of All into dir, for $FLOWMILL_PREBUILT.
func BuildAll(dir string) error {
	for _, p := range All {
		if _, err := build(p, dir); err != nil {
			return err
		}
	}
	return nil
}
