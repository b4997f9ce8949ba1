package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
)

// share is a host directory the guest mounts at the same path.
type share struct {
	Path     string
	ReadOnly bool
}

// vm is one boot of a kernel that runs a script and powers off.
type vm struct {
	Kernel  *prepared
	CPUs    int
	MemMB   int
	Shares  []share
	Script  string // run by /bin/sh in the guest, with the host's root
	Timeout time.Duration
}

// stage2 runs in the guest once it has chrooted into the host's file
// system: the mounts a test expects of a booted machine, loopback up, the
// module loader pointed at the kernel's unpacked modules, then the script.
const stage2 = `export PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
/bin/busybox ip link set lo up
/bin/busybox hostname vmtest
echo /run/vmtest/modprobe > /proc/sys/kernel/modprobe
echo "vmtest: running the script on $(uname -r)"
/bin/sh /run/vmtest/script
echo $? > /run/vmtest/script.rc
sync
/bin/busybox poweroff -f
`

// newCtl makes the host directory a guest shares as /run/vmtest; the
// caller removes it.
func newCtl() (string, error) { return os.MkdirTemp("", "vmtest-") }

// Run boots the guest with ctl (newCtl) as its /run/vmtest and waits for it
// to power off. The script's exit status is left in ctl/script.rc and the
// serial console in ctl/console.log.
func (v *vm) Run(ctx context.Context, ctl string) (rc int, err error) {
	var mounts strings.Builder
	for i, s := range v.Shares {
		fmt.Fprintf(&mounts, "s%d %s\n", i, s.Path)
	}
	modprobe := fmt.Sprintf("#!/bin/sh\nexec /usr/sbin/modprobe -d %s \"$@\"\n", shellQuote(v.Kernel.ModRoot))
	files := map[string]string{
		"mounts":   mounts.String(),
		"stage2":   stage2,
		"script":   v.Script,
		"modprobe": modprobe,
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(ctl, name), []byte(text), 0o755); err != nil {
			return -1, err
		}
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		// KVM is not usable on the machines this runs on: TCG, with one
		// host thread for all the guest's CPUs. Multi-threaded TCG is
		// faster alone but let a 7.3 guest die of a stale int3 in
		// patched kernel text (another vCPU saw a static key's code
		// mid-patch); vmtest runs guests side by side instead (-j).
		"-accel", "tcg,thread=single", "-cpu", "max",
		"-smp", fmt.Sprint(v.CPUs), "-m", fmt.Sprintf("%dM", v.MemMB),
		"-kernel", v.Kernel.Vmlinuz, "-initrd", v.Kernel.Initrd,
		"-append", "console=ttyS0 quiet panic=-1 random.trust_cpu=on mitigations=off",
		"-serial", "file:" + filepath.Join(ctl, "console.log"),
		"-device", "virtio-rng-pci",
		"-virtfs", "local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap",
		"-virtfs", "local,path=" + ctl + ",mount_tag=ctl,security_model=none,multidevs=remap",
	}
	for i, s := range v.Shares {
		opt := fmt.Sprintf("local,path=%s,mount_tag=s%d,security_model=none,multidevs=remap", s.Path, i)
		if s.ReadOnly {
			opt += ",readonly=on"
		}
		args = append(args, "-virtfs", opt)
	}
	ctx, cancel := context.WithTimeout(ctx, v.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return -1, fmt.Errorf("kernel %s: the guest did not power off within %v%s", v.Kernel.Name, v.Timeout, consoleTail(ctl))
	}
	if err != nil {
		return -1, fmt.Errorf("qemu: %w\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(ctl, "script.rc"))
	if err != nil {
		return -1, fmt.Errorf("kernel %s: the guest stopped before the script finished%s", v.Kernel.Name, consoleTail(ctl))
	}
	if _, err := fmt.Sscan(string(b), &rc); err != nil {
		return -1, fmt.Errorf("script.rc: %q", b)
	}
	return rc, nil
}

// consoleTail returns the end of the guest's serial console, for errors.
func consoleTail(ctl string) string {
	b, err := os.ReadFile(filepath.Join(ctl, "console.log"))
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return "; its console ended with:\n" + strings.Join(lines, "\n")
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// guestEnv returns export lines for the environment of the guest's
// commands: the host's, the prebuilt test programs in progs, and the tests'
// deadlines stretched (testutil.Timeout), as an emulated CPU is several
// times slower than the host's, unless the caller chose a scale.
func guestEnv(progs string) string {
	skip := map[string]bool{"PWD": true, "OLDPWD": true, "SHLVL": true, "_": true, "PATH": false}
	env := os.Environ()
	sort.Strings(env)
	var b strings.Builder
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || skip[k] || !isShellName(k) {
			continue
		}
		fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote(v))
	}
	fmt.Fprintf(&b, "export %s=%s\n", testprog.PrebuiltEnv, shellQuote(progs))
	b.WriteString(": ${FLOWMILL_TEST_TIMEOUT_SCALE:=5}; export FLOWMILL_TEST_TIMEOUT_SCALE\n")
	return b.String()
}

func isShellName(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// goCache returns the host's Go build cache, shared with guests so that a
// test that runs go build links from it instead of compiling under
// emulation.
func goCache() (string, error) {
	out, err := exec.Command("go", "env", "GOCACHE").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOCACHE: %w", err)
	}
	dir := strings.TrimSpace(string(out))
	if dir == "" || dir == "off" {
		return "", errors.New("the Go build cache is off")
	}
	return dir, os.MkdirAll(dir, 0o755)
}
