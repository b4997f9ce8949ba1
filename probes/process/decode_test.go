//go:build linux

package process

import (
	"bytes"
	"slices"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/flowmill/flowmill/internal/probe"
)

func boot(ns uint64) time.Time { return time.Unix(1_700_000_000, 0).Add(time.Duration(ns)) }

func comm(s string) (c [16]int8) {
	for i := range min(len(s), 15) {
		c[i] = int8(s[i])
	}
	return c
}

func header(kind uint8) processBPFProcEvent {
	return processBPFProcEvent{
		TsNs: 5_000_000, StartNs: 2_000_000, CgroupId: 77,
		Pid: 100, Tid: 101, Ppid: 1, Uid: 1000, Gid: 1001,
		Kind: kind, Comm: comm("true"),
	}
}

// execRecord lays out an exec record as bpf/process.c sends it: the fixed
// part, then only the bytes used.
func execRecord(file string, args string, argc uint32, truncated bool) []byte {
	var e processBPFExecEvent
	e.Hdr = header(kindExec)
	e.Argc = argc
	fn := append([]byte(file), 0)
	e.FilenameLen = uint16(len(fn))
	e.ArgsLen = uint16(len(args))
	if truncated {
		e.ArgsTruncated = 1
	}
	raw := slices.Clone(unsafe.Slice((*byte)(unsafe.Pointer(&e)), execFixed))
	raw = append(raw, fn...)
	return append(raw, args...)
}

func hdrRecord(h processBPFProcEvent) []byte {
	return slices.Clone(unsafe.Slice((*byte)(unsafe.Pointer(&h)), hdrSize))
}

func TestDecodeExec(t *testing.T) {
	for _, tc := range []struct {
		name      string
		args      string
		argc      uint32
		truncated bool
		argv      []string
		wantTrunc bool
	}{
		{"whole", "/bin/true\x00a\x00b\x00c\x00", 4, false, []string{"/bin/true", "a", "b", "c"}, false},
		{"empty arg", "sh\x00\x00x\x00", 3, false, []string{"sh", "", "x"}, false},
		{"cut by the bound", "/bin/echo\x00aaaa\x00bb", 3, true, []string{"/bin/echo", "aaaa", "bb"}, true},
		{"fewer strings than argc", "/bin/echo\x00", 2, false, []string{"/bin/echo"}, true},
		{"unreadable", "", 2, true, nil, true},
		{"no arguments", "", 0, false, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := decoder{boot: boot}
			raw := execRecord("/usr/bin/true", tc.args, tc.argc, tc.truncated)
			if k, err := d.kind(raw); err != nil || k != kindExec {
				t.Fatalf("kind %d, %v", k, err)
			}
			var ev Exec
			if err := d.decodeExec(raw, &ev); err != nil {
				t.Fatal(err)
			}
			want := Exec{
				Time:          boot(5_000_000),
				Process:       Process{PID: 100, PPID: 1, UID: 1000, GID: 1001, CgroupID: 77, Comm: "true"},
				TID:           101,
				Filename:      "/usr/bin/true",
				Argv:          tc.argv,
				ArgvTruncated: tc.wantTrunc,
			}
			if !ev.Time.Equal(want.Time) || ev.Process != want.Process || ev.TID != want.TID ||
				ev.Filename != want.Filename || !slices.Equal(ev.Argv, want.Argv) || ev.ArgvTruncated != want.ArgvTruncated {
				t.Errorf("got %+v\nwant %+v", ev, want)
			}
		})
	}
}

func TestDecodeExit(t *testing.T) {
	for _, tc := range []struct {
		status uint32
		code   int
		sig    syscall.Signal
		core   bool
	}{
		{0, 0, 0, false},
		{3 << 8, 3, 0, false},
		{255 << 8, 255, 0, false},
		{9, -1, syscall.SIGKILL, false},
		{0x80 | 6, -1, syscall.SIGABRT, true},
	} {
		d := decoder{boot: boot}
		h := header(kindExit)
		h.ExitCode = tc.status
		if _, err := d.kind(hdrRecord(h)); err != nil {
			t.Fatal(err)
		}
		var ev Exit
		d.decodeExit(&ev)
		if ev.ExitCode != tc.code || ev.Signal != tc.sig || ev.CoreDumped != tc.core || ev.Lifetime != 3*time.Millisecond || ev.PID != 100 || ev.Comm != "true" {
			t.Errorf("status %#x: got %+v", tc.status, ev)
		}
	}
}

func TestDecodeFork(t *testing.T) {
	d := decoder{boot: boot}
	h := header(kindFork)
	h.ChildPid = 200
	if _, err := d.kind(hdrRecord(h)); err != nil {
		t.Fatal(err)
	}
	var ev Fork
	d.decodeFork(&ev)
	if ev.PID != 100 || ev.ChildPID != 200 || ev.PPID != 1 || !ev.Time.Equal(boot(5_000_000)) {
		t.Errorf("got %+v", ev)
	}
}

func TestDecodeErrors(t *testing.T) {
	d := decoder{boot: boot}
	if _, err := d.kind(make([]byte, hdrSize-1)); err != errShort {
		t.Errorf("short header: %v", err)
	}
	if _, err := d.kind(hdrRecord(header(9))); err != errKind {
		t.Errorf("unknown kind: %v", err)
	}
	raw := execRecord("/bin/true", "true\x00", 1, false)
	if err := d.decodeExec(raw[:execFixed-1], new(Exec)); err != errShort {
		t.Errorf("short exec: %v", err)
	}
	if err := d.decodeExec(raw[:len(raw)-1], new(Exec)); err != errSizes {
		t.Errorf("lengths beyond the record: %v", err)
	}
	if err := d.decodeExec(hdrRecord(header(kindExit)), new(Exec)); err == nil {
		t.Error("exit record decoded as an exec")
	}
}

// FuzzDecode feeds arbitrary records to the decoder: it must not panic,
// and what it decodes must come from the record.
func FuzzDecode(f *testing.F) {
	f.Add(execRecord("/bin/true", "/bin/true\x00a\x00", 2, false))
	f.Add(execRecord("/bin/sh", "sh\x00-c\x00exit 3", 3, true))
	f.Add(hdrRecord(header(kindExit)))
	f.Add(hdrRecord(header(kindFork)))
	f.Fuzz(func(t *testing.T, raw []byte) {
		d := decoder{boot: boot}
		k, err := d.kind(raw)
		if err != nil {
			return
		}
		switch k {
		case kindExec:
			var ev Exec
			if d.decodeExec(raw, &ev) != nil {
				return
			}
			data := raw[execFixed:]
			if !bytes.Contains(data, []byte(ev.Filename)) {
				t.Fatalf("filename %q not in the record", ev.Filename)
			}
			for _, a := range ev.Argv {
				if !bytes.Contains(data, []byte(a)) {
					t.Fatalf("argument %q not in the record", a)
				}
			}
		case kindExit:
			var ev Exit
			d.decodeExit(&ev)
			if (ev.Signal == 0) != (ev.ExitCode >= 0) || ev.ExitCode > 255 || ev.Lifetime < 0 {
				t.Fatalf("inconsistent exit %+v", ev)
			}
		case kindFork:
			var ev Fork
			d.decodeFork(&ev)
		}
	})
}

// attachmentForBench is an attachment without kernel objects, publishing
// to a bus with one subscriber per event type that is drained.
func attachmentForBench(b *testing.B) *attachment {
	bus := probe.NewBus()
	a := busAttachment(bus)
	se, _ := probe.Subscribe[Exec](bus, 1024)
	sx, _ := probe.Subscribe[Exit](bus, 1024)
	sf, _ := probe.Subscribe[Fork](bus, 1024)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-se.C():
			case <-sx.C():
			case <-sf.C():
			case <-done:
				return
			}
		}
	}()
	b.Cleanup(func() { close(done); bus.Close() })
	return a
}

func BenchmarkHandleExit(b *testing.B) {
	a := attachmentForBench(b)
	h := header(kindExit)
	h.ExitCode = 3 << 8
	raw := hdrRecord(h)
	b.ReportAllocs()
	for b.Loop() {
		a.handle(raw)
	}
}

func BenchmarkHandleFork(b *testing.B) {
	a := attachmentForBench(b)
	raw := hdrRecord(header(kindFork))
	b.ReportAllocs()
	for b.Loop() {
		a.handle(raw)
	}
}

func BenchmarkHandleExec(b *testing.B) {
	a := attachmentForBench(b)
	raw := execRecord("/usr/bin/curl", "curl\x00-sS\x00-o\x00/dev/null\x00http://127.0.0.1:8080/\x00", 5, false)
	b.ReportAllocs()
	for b.Loop() {
		a.handle(raw)
	}
}

// Records that cannot be decoded are counted, never silently dropped, and
// never published.
func TestMalformedCounted(t *testing.T) {
	bus := probe.NewBus()
	defer bus.Close()
	a := busAttachment(bus)
	se, _ := probe.Subscribe[Exec](bus, 16)
	good := execRecord("/bin/true", "true\x00", 5, false)
	h := header(kindFork)
	h.Kind = 0x7f
	unknown := hdrRecord(h)
	if k, err := a.dec.kind(unknown); err == nil {
		t.Fatalf("kind of the corrupted record: %d, want an error: the test proves nothing", k)
	}
	for _, raw := range [][]byte{nil, {1, 2}, unknown, good[:execFixed-1]} {
		a.handle(raw)
	}
	if n := a.malformed.Load(); n != 4 {
		t.Errorf("malformed: %d, want 4", n)
	}
	a.handle(good)
	if n := a.malformed.Load(); n != 4 || len(se.C()) != 1 {
		t.Errorf("after a good exec: malformed %d, %d execs published; want 4 and 1", n, len(se.C()))
	}
}

// busAttachment is an attachment without kernel objects that publishes on
// bus.
func busAttachment(bus *probe.Bus) *attachment {
	return &attachment{
		dec:   decoder{boot: boot},
		execs: probe.Produce[Exec](bus),
		exits: probe.Produce[Exit](bus),
		forks: probe.Produce[Fork](bus),
	}
}
