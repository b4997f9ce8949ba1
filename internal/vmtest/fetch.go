package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

//go:embed init.sh
var initScript []byte

// bootModules are what the guest needs before it can mount the host's file
// system: Debian builds virtio-pci and 9p as modules. Their dependencies
// come from modprobe --show-depends.
var bootModules = []string{"virtio_pci", "9pnet_virtio", "9p", "virtio_rng"}

// prepared is a kernel ready to boot.
type prepared struct {
	kernel
	Dir     string // <cache>/<name>
	Release string // uname -r
	Vmlinuz string
	Initrd  string
	ModRoot string // modprobe -d: holds lib/modules/<release>
}

func cacheDir() string {
	if d := os.Getenv("FLOWMILL_VMTEST_CACHE"); d != "" {
		return d
	}
	return "/var/cache/flowmill-vmtest"
}

// prepare fetches, unpacks and readies kernel k, or reuses what an earlier
// call left in the cache.
func prepare(k kernel) (*prepared, error) {
	p := &prepared{kernel: k, Dir: filepath.Join(cacheDir(), k.Name)}
	p.ModRoot = filepath.Join(p.Dir, "root")
	p.Initrd = filepath.Join(p.Dir, "initrd.cpio")
	stamp := filepath.Join(p.Dir, "ready")
	want := stampText(k)
	if b, err := os.ReadFile(stamp); err == nil && string(b) == want {
		return p, p.locate()
	}
	if err := checkTools("apt-get", "dpkg", "depmod", "modprobe", "xz", "zstd"); err != nil {
		return nil, err
	}
	debs, err := download(k)
	if err != nil {
		return nil, err
	}
	if err := os.RemoveAll(p.Dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(p.ModRoot, 0o755); err != nil {
		return nil, err
	}
	for _, d := range debs {
		if err := run("dpkg", "-x", d, p.ModRoot); err != nil {
			return nil, err
		}
	}
	// Kernels of merged-/usr suites put their modules in usr/lib/modules;
	// modprobe -d looks in lib/modules.
	if _, err := os.Stat(filepath.Join(p.ModRoot, "lib")); errors.Is(err, os.ErrNotExist) {
		if err := os.Symlink("usr/lib", filepath.Join(p.ModRoot, "lib")); err != nil {
			return nil, err
		}
	}
	if err := p.locate(); err != nil {
		return nil, err
	}
	if err := run("depmod", "-b", p.ModRoot, p.Release); err != nil {
		return nil, err
	}
	if err := p.buildInitrd(); err != nil {
		return nil, err
	}
	return p, os.WriteFile(stamp, []byte(want), 0o644)
}

func stampText(k kernel) string {
	var b strings.Builder
	for _, p := range k.Packages {
		fmt.Fprintf(&b, "%s=%s\n", p.Name, p.Version)
	}
	b.Write(initScript)
	return b.String()
}

// locate finds the kernel image and its release in the unpacked tree.
func (p *prepared) locate() error {
	// boot/vmlinuz-<release>, or (Debian's 7.x packages) lib/modules/<release>/vmlinuz.
	imgs, _ := filepath.Glob(filepath.Join(p.ModRoot, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(p.ModRoot, "lib", "modules", "*", "vmlinuz"))
	switch {
	case len(imgs) == 1 && len(mods) == 0:
		p.Vmlinuz = imgs[0]
		p.Release = strings.TrimPrefix(filepath.Base(imgs[0]), "vmlinuz-")
	case len(imgs) == 0 && len(mods) == 1:
		p.Vmlinuz = mods[0]
		p.Release = filepath.Base(filepath.Dir(mods[0]))
	default:
		return fmt.Errorf("kernel %s: want one kernel image in %s, found %d", p.Name, p.ModRoot, len(imgs)+len(mods))
	}
	if _, err := os.Stat(filepath.Join(p.ModRoot, "lib", "modules", p.Release)); err != nil {
		return fmt.Errorf("kernel %s: no modules for %s: %w", p.Name, p.Release, err)
	}
	return nil
}

// download fetches k's packages into <cache>/debs with apt-get download and
// a private apt configuration naming only k's suite: the host's sources and
// package lists are left untouched.
func download(k kernel) ([]string, error) {
	debDir := filepath.Join(cacheDir(), "debs")
	var paths, missing []string
	for _, p := range k.Packages {
		// apt-get download names files name_version_arch.deb, ':' escaped.
		f := filepath.Join(debDir, fmt.Sprintf("%s_%s_amd64.deb", p.Name, strings.ReplaceAll(p.Version, ":", "%3a")))
		paths = append(paths, f)
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, p.Name+"="+p.Version)
		}
	}
	if len(missing) == 0 {
		return paths, nil
	}
	archive, ok := suites[k.Suite]
	if !ok {
		return nil, fmt.Errorf("kernel %s: unknown suite %q", k.Name, k.Suite)
	}
	apt, err := os.MkdirTemp("", "vmtest-apt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(apt)
	for _, d := range []string{"lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(apt, d), 0o755); err != nil {
			return nil, err
		}
	}
	src := fmt.Sprintf("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n", archive, k.Suite)
	if err := os.WriteFile(filepath.Join(apt, "sources.list"), []byte(src), 0o644); err != nil {
		return nil, err
	}
	opts := []string{
		"-o", "Dir::Etc::SourceList=" + filepath.Join(apt, "sources.list"),
		"-o", "Dir::Etc::SourceParts=/dev/null",
		"-o", "Dir::State::Lists=" + filepath.Join(apt, "lists"),
		"-o", "Dir::Cache=" + filepath.Join(apt, "cache"),
		"-o", "Debug::NoLocking=1",
		"-o", "APT::Architecture=amd64",
		"-o", "APT::Sandbox::User=root",
	}
	if err := run("apt-get", append(opts, "-q", "update")...); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(debDir, 0o755); err != nil {
		return nil, err
	}
	cmd := exec.Command("apt-get", append(append(opts, "-q", "download"), missing...)...)
	cmd.Dir = debDir
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("apt-get download %s from %s: %w\n%s(if the archive dropped this version, update the pin in internal/vmtest/kernels.go)", strings.Join(missing, " "), k.Suite, err, out)
	}
	for _, f := range paths {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("apt-get download did not produce %s", f)
		}
	}
	return paths, nil
}

// buildInitrd writes a busybox initramfs holding the boot modules
// (decompressed: busybox insmod reads plain ELF) and init.sh.
func (p *prepared) buildInitrd() error {
	busybox, err := staticBusybox()
	if err != nil {
		return err
	}
	// One module at a time: a module built into the kernel is unknown to
	// modprobe when the package ships no modules.builtin (Debian's 7.x).
	var out []byte
	for _, m := range bootModules {
		deps, err := exec.Command("modprobe", "-d", p.ModRoot, "-S", p.Release, "--show-depends", m).Output()
		if err != nil {
			continue // built in; if not, the guest says it cannot mount the share
		}
		out = append(out, deps...)
	}
	var buf bytes.Buffer
	c := &cpioWriter{w: &buf}
	for _, d := range []string{"bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"} {
		c.Dir(d)
	}
	c.CharDev("dev/console", 5, 1)
	c.File("bin/busybox", 0o755, busybox)
	c.File("init", 0o755, initScript)
	var order []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "insmod" || seen[f[1]] {
			continue // "builtin x": nothing to load
		}
		seen[f[1]] = true
		ko, err := decompress(f[1])
		if err != nil {
			return err
		}
		name := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(filepath.Base(f[1]), ".xz"), ".zst"), ".gz")
		c.File("lib/modules/"+name, 0o644, ko)
		order = append(order, name)
	}
	c.File("modules", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	if err := c.Close(); err != nil {
		return err
	}
	return os.WriteFile(p.Initrd, buf.Bytes(), 0o644)
}

func decompress(path string) ([]byte, error) {
	var cmd *exec.Cmd
	switch filepath.Ext(path) {
	case ".xz":
		cmd = exec.Command("xz", "-dc", path)
	case ".zst":
		cmd = exec.Command("zstd", "-dcq", path)
	case ".gz":
		cmd = exec.Command("gzip", "-dc", path)
	default:
		return os.ReadFile(path)
	}
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompressing %s: %w", path, err)
	}
	return out, nil
}

// staticBusybox returns the host's /bin/busybox, which must be static (the
// initramfs has no libraries): Debian's busybox-static.
func staticBusybox() ([]byte, error) {
	const path = "/bin/busybox"
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (install Debian's busybox-static)", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("%s is dynamically linked: install Debian's busybox-static", path)
		}
	}
	return os.ReadFile(path)
}

func checkTools(tools ...string) error {
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s not found: make test-kernels needs qemu-system-x86, busybox-static, kmod, xz-utils and zstd (make test-tools installs them)", t)
		}
	}
	return nil
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}
