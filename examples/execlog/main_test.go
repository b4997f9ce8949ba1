package main_test

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// TestExeclog runs execlog -json -pid on a shell that runs /bin/true a b c
// and exits with 3, and checks its output and seccomp profile.
func TestExeclog(t *testing.T) {
	testutil.RequireBPF(t)
	dir := t.TempDir()
	bin := testutil.Program(t, testprog.Execlog)
	sh := exec.Command("/bin/sh", "-c", "read x; /bin/true a b c; exit 3")
	in, _ := sh.StdinPipe()
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sh.Process.Kill(); sh.Wait() })

	profile := filepath.Join(dir, "seccomp.json")
	cmd := exec.Command(bin, "-json", "-pid", strconv.Itoa(sh.Process.Pid), "-seccomp", profile)
	stdout, _ := cmd.StdoutPipe()
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	errs := bufio.NewReader(stderr)
	line, err := errs.ReadString('\n')
	if !strings.Contains(line, "observing") {
		rest, _ := io.ReadAll(errs)
		if strings.Contains(line+string(rest), "insufficient privileges") {
			testutil.Unavailable(t, "%s", line)
		}
		t.Fatalf("execlog did not start: %q %v %s", line, err, rest)
	}
	in.Write([]byte("go\n"))

	var lines []map[string]any
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("not JSON: %q", sc.Text())
		}
		lines = append(lines, m)
	}
	done := make(chan error, 1)
	go func() { io.Copy(io.Discard, errs); done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("execlog: %v", err)
		}
	case <-time.After(testutil.Timeout(10 * time.Second)):
		t.Fatal("execlog did not stop after the process exited")
	}

	var got []string
	for _, m := range lines {
		for _, k := range []string{"event", "time", "pid", "ppid", "uid", "comm", "filename", "argv", "argv_truncated", "exit_code", "signal"} {
			if _, ok := m[k]; !ok {
				t.Errorf("line %v lacks %q", m, k)
			}
		}
		if _, err := time.Parse(time.RFC3339Nano, m["time"].(string)); err != nil {
			t.Errorf("time: %v", err)
		}
		switch m["event"] {
		case "exec":
			got = append(got, "exec "+m["filename"].(string))
		case "exit":
			got = append(got, "exit "+m["comm"].(string)+" "+strconv.Itoa(int(m["exit_code"].(float64))))
		}
	}
	if want := []string{"exec /bin/true", "exit true 0", "exit sh 3"}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	js, err := os.ReadFile(profile)
	if err != nil {
		t.Fatal(err)
	}
	var p struct {
		DefaultAction string
		Syscalls      []struct{ Names []string }
	}
	if err := json.Unmarshal(js, &p); err != nil || p.DefaultAction != "SCMP_ACT_ERRNO" || len(p.Syscalls) != 1 ||
		!slices.Contains(p.Syscalls[0].Names, "execve") || !slices.Contains(p.Syscalls[0].Names, "exit_group") {
		t.Errorf("profile: %v\n%s", err, js)
	}
}
