package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
)

// hostKernel names the machine's own kernel in -kernels: the binaries run
// directly, for a row measured the same way as the guests'.
const hostKernel = "host"

// testPkg is a package with tests and its compiled test binary.
type testPkg struct {
	ImportPath string
	Dir        string
	Bin        string
}

// result is one kernel × package.
type result struct {
	Kernel, Pkg string
	RC          int
	Seconds     float64
	Output      string
	Skips       []string
}

func testCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("test", flag.ExitOnError)
	list := fs.String("kernels", "all", "comma-separated kernels (vmtest list), host for this machine's, or all")
	run := fs.String("run", "", "passed to each test binary as -test.run")
	short := fs.Bool("short", false, "run the tests with -test.short (the longest scale down)")
	timeout := fs.Duration("timeout", 30*time.Minute, "per package (-test.timeout)")
	jobs := fs.Int("j", 2, "kernels booted at once (each guest runs on one host thread)")
	cpus := fs.Int("cpus", 2, "guest CPUs")
	mem := fs.Int("mem", 4096, "guest memory, MiB")
	fs.Parse(args)
	ks, err := selectKernels(*list)
	if err != nil {
		return err
	}
	pkgArgs := fs.Args()
	if len(pkgArgs) == 0 {
		pkgArgs = []string{"./...", "./examples/..."}
	}
	// Fetch first: a missing kernel fails before anything is built.
	prepared, err := prepareAll(ks)
	if err != nil {
		return err
	}
	bins, err := os.MkdirTemp("", "vmtest-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bins)
	pkgs, err := buildTests(bins, pkgArgs)
	if err != nil {
		return err
	}
	progs, err := buildPrograms()
	if progs != "" {
		defer os.RemoveAll(progs)
	}
	if err != nil {
		return err
	}
	binArgs := []string{"-test.v", "-test.count=1", "-test.timeout=" + timeout.String()}
	if *run != "" {
		binArgs = append(binArgs, "-test.run="+*run)
	}
	if *short {
		binArgs = append(binArgs, "-test.short")
	}
	var (
		mu      sync.Mutex
		results []result
		errs    []error
		wg      sync.WaitGroup
		sem     = make(chan struct{}, max(*jobs, 1))
	)
	report := func(r result) {
		mu.Lock()
		defer mu.Unlock()
		results = append(results, r)
		fmt.Println(r.line())
	}
	for _, k := range ks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			var err error
			if k.Name == hostKernel {
				err = runHost(ctx, pkgs, progs, binArgs, report)
			} else {
				err = runGuest(ctx, prepared[k.Name], pkgs, progs, binArgs, *cpus, *mem, *timeout*time.Duration(len(pkgs)), report)
			}
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	failed := 0
	for _, r := range results {
		if r.RC != 0 {
			failed++
			fmt.Printf("\n=== %s on %s: exit status %d\n%s\n", r.Pkg, r.Kernel, r.RC, failureOutput(r.Output))
		}
	}
	for _, err := range errs {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
	}
	if failed > 0 || len(errs) > 0 {
		return fmt.Errorf("%d of %d kernel × package runs failed, %d kernels did not finish", failed, len(results), len(errs))
	}
	fmt.Printf("vmtest: %d kernel × package runs passed\n", len(results))
	return nil
}

func (r result) line() string {
	status := "pass"
	if r.RC != 0 {
		status = "FAIL"
	}
	s := fmt.Sprintf("%-6s %-48s %s %7.1fs", r.Kernel, r.Pkg, status, r.Seconds)
	if len(r.Skips) > 0 {
		s += fmt.Sprintf("  (%d skipped: %s)", len(r.Skips), strings.Join(r.Skips, "; "))
	}
	return s
}

// buildTests compiles the test binary of every package matching patterns
// that has tests.
func buildTests(dir string, patterns []string) ([]testPkg, error) {
	out, err := exec.Command("go", append([]string{"list", "-json=ImportPath,Dir,TestGoFiles,XTestGoFiles"}, patterns...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("go list: %w", err)
	}
	var pkgs []testPkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p struct {
			ImportPath, Dir           string
			TestGoFiles, XTestGoFiles []string
		}
		if err := dec.Decode(&p); err != nil {
			return nil, err
		}
		if len(p.TestGoFiles)+len(p.XTestGoFiles) == 0 {
			continue
		}
		name := strings.ReplaceAll(p.ImportPath, "/", "_") + ".test"
		pkgs = append(pkgs, testPkg{ImportPath: p.ImportPath, Dir: p.Dir, Bin: filepath.Join(dir, name)})
	}
	// One go test -c per package: -o with a directory would name binaries
	// by the last path element, which packages may share.
	var wg sync.WaitGroup
	errs := make([]error, len(pkgs))
	sem := make(chan struct{}, 2)
	for i, p := range pkgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if out, err := exec.Command("go", "test", "-c", "-o", p.Bin, p.ImportPath).CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("go test -c %s: %w\n%s", p.ImportPath, err, out)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return pkgs, nil
}

// buildPrograms builds the programs tests run (testprog.All) into a new
// temporary directory, for $FLOWMILL_PREBUILT; guests get it read-only.
func buildPrograms() (string, error) {
	progs, err := os.MkdirTemp("", "vmtest-progs-")
	if err != nil {
		return "", err
	}
	return progs, testprog.BuildAll(progs)
}

// runGuest boots p once and runs every package's tests in it, reporting
// each package as soon as the guest finishes it.
func runGuest(ctx context.Context, p *prepared, pkgs []testPkg, progs string, binArgs []string, cpus, mem int, timeout time.Duration, report func(result)) error {
	shares, err := commonShares(filepath.Dir(pkgs[0].Bin))
	if err != nil {
		return err
	}
	shares = append(shares, share{Path: progs, ReadOnly: true})
	var s strings.Builder
	s.WriteString(guestEnv(progs))
	s.WriteString("mkdir -p /run/vmtest/out\n")
	for i, pk := range pkgs {
		fmt.Fprintf(&s, "cd %s && { read t0 _ </proc/uptime; %s", shellQuote(pk.Dir), shellQuote(pk.Bin))
		for _, a := range binArgs {
			s.WriteString(" " + shellQuote(a))
		}
		fmt.Fprintf(&s, " >/run/vmtest/out/%d 2>&1; rc=$?; read t1 _ </proc/uptime; echo \"%d $rc $t0 $t1\" >>/run/vmtest/results; }\n", i, i)
	}
	v := &vm{Kernel: p, CPUs: cpus, MemMB: mem, Shares: shares, Script: s.String(), Timeout: timeout}
	// Report packages while the guest runs: it appends to results as it
	// finishes each.
	done := make(chan struct{})
	var reported sync.WaitGroup
	reported.Add(1)
	ctl, err := newCtl()
	if err != nil {
		return err
	}
	defer os.RemoveAll(ctl)
	seen := 0
	follow := func() {
		for _, line := range readLines(filepath.Join(ctl, "results"))[seen:] {
			var i, rc int
			var t0, t1 float64
			if _, err := fmt.Sscan(line, &i, &rc, &t0, &t1); err != nil || i < 0 || i >= len(pkgs) {
				continue
			}
			out, _ := os.ReadFile(filepath.Join(ctl, "out", fmt.Sprint(i)))
			report(result{Kernel: p.Name, Pkg: pkgs[i].ImportPath, RC: rc, Seconds: t1 - t0, Output: string(out), Skips: skips(string(out))})
			seen++
		}
	}
	go func() {
		defer reported.Done()
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				follow()
				return
			case <-t.C:
				follow()
			}
		}
	}()
	_, err = v.Run(ctx, ctl)
	close(done)
	reported.Wait()
	if err == nil && seen < len(pkgs) {
		err = fmt.Errorf("kernel %s: %d of %d packages ran%s", p.Name, seen, len(pkgs), consoleTail(ctl))
	}
	if err != nil {
		for _, pk := range pkgs[seen:] {
			report(result{Kernel: p.Name, Pkg: pk.ImportPath, RC: -1, Output: "did not run: " + err.Error()})
		}
	}
	return err
}

// runHost runs the binaries on this machine, as the guests do.
func runHost(ctx context.Context, pkgs []testPkg, progs string, binArgs []string, report func(result)) error {
	for _, pk := range pkgs {
		cmd := exec.CommandContext(ctx, pk.Bin, binArgs...)
		cmd.Dir = pk.Dir
		cmd.Env = append(os.Environ(), testprog.PrebuiltEnv+"="+progs)
		t0 := time.Now()
		out, err := cmd.CombinedOutput()
		rc := 0
		if err != nil {
			rc = -1
			if ee, ok := err.(*exec.ExitError); ok {
				rc = ee.ExitCode()
			}
		}
		report(result{Kernel: hostKernel, Pkg: pk.ImportPath, RC: rc, Seconds: time.Since(t0).Seconds(), Output: string(out), Skips: skips(string(out))})
	}
	return nil
}

var skipRE = regexp.MustCompile(`(?m)^\s*--- SKIP: (\S+)`)

func skips(out string) []string {
	var s []string
	for _, m := range skipRE.FindAllStringSubmatch(out, -1) {
		s = append(s, m[1])
	}
	return s
}

// failureOutput keeps what explains a failure from -test.v output: the
// lines of failing tests and everything that is not a passing test's.
func failureOutput(out string) string {
	lines := strings.Split(out, "\n")
	var keep []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "=== RUN") || strings.HasPrefix(t, "=== PAUSE") || strings.HasPrefix(t, "=== CONT") || strings.HasPrefix(t, "--- PASS") {
			continue
		}
		keep = append(keep, l)
	}
	if len(keep) > 400 {
		keep = append([]string{fmt.Sprintf("[... %d lines before]", len(keep)-400)}, keep[len(keep)-400:]...)
	}
	return strings.Join(keep, "\n")
}

// readLines returns the complete lines of path; a last line without its
// newline is still being written.
func readLines(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	lines := strings.Split(string(b), "\n")
	return lines[:len(lines)-1]
}

// commonShares returns the shares every guest gets: the Go build cache
// and, when it is in the temporary directory the guest does not see
// (go test -exec builds there), the directory of the binary to run.
func commonShares(binDir string) ([]share, error) {
	cache, err := goCache()
	if err != nil {
		return nil, err
	}
	shares := []share{{Path: cache}}
	if rel, err := filepath.Rel(os.TempDir(), binDir); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
		shares = append(shares, share{Path: binDir})
	}
	return shares, nil
}

func absPath(p string) (string, error) {
	if strings.Contains(p, "/") {
		return filepath.Abs(p)
	}
	return exec.LookPath(p)
}

func dirOf(p string) string { return filepath.Dir(p) }

func copyFile(w io.Writer, path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	io.Copy(w, f)
}
