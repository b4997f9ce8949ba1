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
	"runtime"
	"strings"
)

// Program is a main package a test builds, and the go build flags.
type Program struct {
	Pkg   string // import path
	Flags []string
	// Module: the package is the root of a module of its own (under
	// testdata, with its own go.mod and go.sum, so that what it requires
	// stays out of flowmill's go.mod), built in its directory without the
	// workspace.
	Module bool
}

const mod = "github.com/flowmill/flowmill/"

// The programs tests build. A test may only build what is listed here.
var (
	HTTPServer         = Program{Pkg: mod + "probes/http/testdata/server"}
	HTTPServerStripped = Program{Pkg: mod + "probes/http/testdata/server", Flags: []string{"-ldflags=-s -w"}}
	HTTPServerPIE      = Program{Pkg: mod + "probes/http/testdata/server", Flags: []string{"-buildmode=pie"}}
	SysLoop            = Program{Pkg: mod + "probes/syscalls/testdata/sysloop"}
	TCPListener        = Program{Pkg: mod + "probes/tcp/testdata/listener"}
	GRPCv185           = Program{Pkg: mod + "probes/grpc/testdata/v185", Module: true}
	GRPCv185Stripped   = Program{Pkg: mod + "probes/grpc/testdata/v185", Module: true, Flags: []string{"-ldflags=-s -w"}}

	// GRPCClientOnly is only a gRPC client: grpc-go's server is not
	// linked (its grpc-go and -tags=grpcnotrace: see its package
	// documentation).
	GRPCClientOnly         = Program{Pkg: mod + "probes/grpc/testdata/clientonly", Module: true, Flags: []string{"-tags=grpcnotrace"}}
	GRPCClientOnlyStripped = Program{Pkg: mod + "probes/grpc/testdata/clientonly", Module: true, Flags: []string{"-tags=grpcnotrace", "-ldflags=-s -w"}}

	Autoinst   = Program{Pkg: mod + "examples/autoinst"}
	Execlog    = Program{Pkg: mod + "examples/execlog"}
	OTLP       = Program{Pkg: mod + "examples/otlp"}
	Prometheus = Program{Pkg: mod + "examples/prometheus"}
	// SQLApp drives database/sql with pgx and modernc.org/sqlite.
	SQLApp         = Program{Pkg: mod + "probes/sql/testdata/sqlapp", Module: true}
	SQLAppStripped = Program{Pkg: mod + "probes/sql/testdata/sqlapp", Module: true, Flags: []string{"-ldflags=-s -w"}}

	All = []Program{HTTPServer, HTTPServerStripped, HTTPServerPIE, SysLoop, TCPListener, GRPCv185, GRPCv185Stripped, GRPCClientOnly, GRPCClientOnlyStripped, Autoinst, Execlog, OTLP, Prometheus, SQLApp, SQLAppStripped}
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
	bin, err := filepath.Abs(filepath.Join(dir, p.Name()))
	if err != nil {
		return "", err
	}
	args := append(append([]string{"build"}, p.Flags...), "-o", bin, p.Pkg)
	cmd := exec.Command("go", args...)
	if p.Module {
		_, src, _, ok := runtime.Caller(0)
		if !ok {
			return "", fmt.Errorf("building %s: cannot tell where the repository is", p.Pkg)
		}
		root := filepath.Join(filepath.Dir(src), "..", "..")
		cmd.Dir = filepath.Join(root, filepath.FromSlash(strings.TrimPrefix(p.Pkg, mod)))
		cmd.Env = append(os.Environ(), "GOWORK=off")
		cmd.Args = append(append([]string{"go", "build"}, p.Flags...), "-o", bin, ".")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
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
