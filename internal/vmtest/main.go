// Command vmtest runs flowmill's tests on other Linux kernels: Debian's own
// kernel packages booted under QEMU, with the host's root file system shared
// read-only over 9p, so the guest has the host's tools (go, curl, ss, nft,
// prometheus, python3) and sees the source tree at the same path.
//
//	vmtest fetch [kernel...]                  download and ready the kernels (cached)
//	vmtest test [flags] [package...]          the matrix: each kernel × package
//	vmtest exec -kernel K binary [arg...]     one command in a guest (go test -exec)
//	vmtest list                               the pinned kernels
//
// How a guest is made: the kernel's .deb packages (pinned in kernels.go) are
// fetched with apt-get download through a private apt configuration and
// unpacked with dpkg -x into $FLOWMILL_VMTEST_CACHE (default
// /var/cache/flowmill-vmtest); depmod indexes the modules. A busybox
// initramfs (init.sh) loads virtio-pci and 9p, mounts the host's / read-only
// with tmpfs on /tmp, /run and /var/tmp, mounts the harness's writable
// shares (a control directory at /run/vmtest, the test binaries and the Go
// build cache at their host paths) and chroots. The kernel's module loader
// is pointed at the unpacked modules, so nftables and veth load on demand.
// The guest runs a script, writes its results into the control directory
// and powers off. KVM is not needed: QEMU's TCG emulates the CPU.
//
// "test" compiles each package's test binary once on the host (go test -c,
// no compiler work under emulation), boots each kernel once, and runs every
// binary in its package directory with -test.v, printing one line per
// kernel × package (pass/fail, seconds, skipped tests) and the output of
// what failed. Tests that run go build themselves link from the shared
// build cache.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	cmd, args := os.Args[1], os.Args[2:]
	switch cmd {
	case "fetch":
		err = fetchCmd(args)
	case "test":
		err = testCmd(ctx, args)
	case "exec":
		var rc int
		rc, err = execCmd(ctx, args)
		if err == nil {
			os.Exit(rc)
		}
	case "list":
		for _, k := range kernels {
			var names []string
			for _, p := range k.Packages {
				names = append(names, p.Name+"="+p.Version)
			}
			fmt.Printf("%-6s %-18s %s\n", k.Name, k.Suite, strings.Join(names, " "))
		}
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmtest:", err)
		os.Exit(2)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: vmtest fetch [kernel...] | test [flags] [package...] | exec -kernel K binary [arg...] | list")
	os.Exit(2)
}

// selectKernels resolves names ("all" or a comma-separated list).
func selectKernels(list string) ([]kernel, error) {
	if list == "" || list == "all" {
		return kernels, nil
	}
	var ks []kernel
	for _, n := range strings.Split(list, ",") {
		if n == hostKernel {
			ks = append(ks, kernel{Name: hostKernel})
			continue
		}
		k, ok := findKernel(n)
		if !ok {
			return nil, fmt.Errorf("unknown kernel %q (vmtest list shows the pinned ones)", n)
		}
		ks = append(ks, k)
	}
	return ks, nil
}

func fetchCmd(args []string) error {
	ks, err := selectKernels(strings.Join(args, ","))
	if err != nil {
		return err
	}
	ps, err := prepareAll(ks)
	if err != nil {
		return err
	}
	for _, k := range ks {
		if p := ps[k.Name]; p != nil {
			fmt.Printf("%-6s %s %s\n", k.Name, p.Release, p.Dir)
		}
	}
	return nil
}

// prepareAll readies the guest kernels of ks, by name.
func prepareAll(ks []kernel) (map[string]*prepared, error) {
	ps := map[string]*prepared{}
	for _, k := range ks {
		if k.Name == hostKernel {
			continue
		}
		p, err := prepare(k)
		if err != nil {
			return nil, err
		}
		ps[k.Name] = p
	}
	return ps, nil
}

func execCmd(ctx context.Context, args []string) (int, error) {
	fs := flag.NewFlagSet("exec", flag.ExitOnError)
	name := fs.String("kernel", "6.1", "kernel to boot (vmtest list)")
	cpus := fs.Int("cpus", 2, "guest CPUs")
	mem := fs.Int("mem", 4096, "guest memory, MiB")
	timeout := fs.Duration("timeout", 30*60e9, "time allowed for the guest")
	fs.Parse(args)
	if fs.NArg() == 0 {
		return 2, fmt.Errorf("exec: no command")
	}
	k, ok := findKernel(*name)
	if !ok {
		return 2, fmt.Errorf("unknown kernel %q", *name)
	}
	p, err := prepare(k)
	if err != nil {
		return 2, err
	}
	bin, err := absPath(fs.Arg(0))
	if err != nil {
		return 2, err
	}
	wd, err := os.Getwd()
	if err != nil {
		return 2, err
	}
	shares, err := commonShares(dirOf(bin))
	if err != nil {
		return 2, err
	}
	progs, err := buildPrograms()
	if progs != "" {
		defer os.RemoveAll(progs)
	}
	if err != nil {
		return 2, err
	}
	shares = append(shares, share{Path: progs, ReadOnly: true})
	var script strings.Builder
	script.WriteString(guestEnv(progs))
	fmt.Fprintf(&script, "cd %s || exit 125\n", shellQuote(wd))
	script.WriteString(shellQuote(bin))
	for _, a := range fs.Args()[1:] {
		script.WriteString(" " + shellQuote(a))
	}
	script.WriteString(" >/run/vmtest/stdout 2>/run/vmtest/stderr\n")
	v := &vm{Kernel: p, CPUs: *cpus, MemMB: *mem, Shares: shares, Script: script.String(), Timeout: *timeout}
	ctl, err := newCtl()
	if err != nil {
		return 2, err
	}
	defer os.RemoveAll(ctl)
	rc, err := v.Run(ctx, ctl)
	copyFile(os.Stdout, ctl+"/stdout")
	copyFile(os.Stderr, ctl+"/stderr")
	return rc, err
}
