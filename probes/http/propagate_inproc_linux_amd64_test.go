package http_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill"
	"github.com/flowmill/flowmill/internal/cgroupfs"
	"github.com/flowmill/flowmill/internal/testutil"
	fmhttp "github.com/flowmill/flowmill/probes/http"
)

// inProcess starts a session of this test process with the HTTP probe and
// a subscription to its client requests; the session closes in t.Cleanup
// unless the test closes it first.
func inProcess(t *testing.T, p *fmhttp.Probe) (*flowmill.Session, *flowmill.Subscription[fmhttp.ClientRequest]) {
	t.Helper()
	testutil.RequireBPF(t)
	s, err := flowmill.New(flowmill.WithProbes(p), flowmill.WithMaxLatency(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := flowmill.Subscribe[fmhttp.ClientRequest](s)
	if err != nil {
		t.Fatal(err)
	}
	testutil.CheckStart(t, s.Start(context.Background()))
	t.Cleanup(func() { s.Close() })
	return s, cli
}

// headerServer answers every request and passes on its traceparent headers
// and the connection it came on.
func headerServer(t *testing.T) (*httptest.Server, chan [2]string) {
	t.Helper()
	got := make(chan [2]string, 16)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		got <- [2]string{strings.Join(r.Header.Values("Traceparent"), ","), r.RemoteAddr}
	}))
	t.Cleanup(srv.Close)
	return srv, got
}

func nextClient(t *testing.T, sub *flowmill.Subscription[fmhttp.ClientRequest]) fmhttp.ClientRequest {
	t.Helper()
	select {
	case c := <-sub.Events():
		return c
	case <-time.After(testutil.Timeout(10 * time.Second)):
		t.Fatal("no client request event")
	}
	return fmhttp.ClientRequest{}
}

// TestPropagationUnavailable: when the socket programs cannot be set up
// (here, a directory that is not a cgroup to attach sock_ops to), spans
// still work and the status says why propagation is off, with an error
// wrapping ErrPropagationUnavailable; every request sent counts as
// unavailable. Nothing of the failed set-up stays loaded.
func TestPropagationUnavailable(t *testing.T) {
	defer fmhttp.SetPropagationCgroupForTest(t.TempDir())()
	held := testutil.OwnPrograms(t)
	p := fmhttp.New()
	s, sub := inProcess(t, p)
	st := p.Status()
	if st.Propagation || !errors.Is(st.PropagationErr, fmhttp.ErrPropagationUnavailable) ||
		!slices.ContainsFunc(st.Skipped, func(s string) bool { return strings.Contains(s, "unavailable") && strings.Contains(s, "sock_ops") }) {
		t.Fatalf("status %+v (error %v): want propagation unavailable, saying why", st, st.PropagationErr)
	}
	t.Logf("status: %v", st.PropagationErr)
	for _, id := range testutil.ProgramsSince(t, held) {
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		info, _ := prog.Info()
		prog.Close()
		if info != nil && (info.Type == ebpf.SockOps || info.Type == ebpf.SkMsg || info.Name == "track_state") {
			t.Errorf("program %s (%v) of the failed set-up is still loaded", info.Name, info.Type)
		}
	}
	srv, got := headerServer(t)
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if h := <-got; h[0] != "" {
		t.Errorf("server received traceparent %q", h[0])
	}
	if c := nextClient(t, sub); c.Propagation != fmhttp.PropagationUnavailable || !c.Span.SpanID.IsValid() {
		t.Errorf("client request %+v: want a span, propagation unavailable", c)
	}
	if ps := p.PropagationStats(); ps.Unavailable != 1 {
		t.Errorf("propagation counts %+v: want 1 unavailable", ps)
	}
	if ss, _ := s.Stats(); ss.Unsupported != 1 || ss.EventsLost != 0 {
		t.Errorf("session stats %+v: want 1 unsupported", ss)
	}
}

// TestPropagationCleanup: Close detaches sock_ops from the process's
// cgroup and the sk_msg program from its sockhash, and frees the sockhash,
// which releases the connections in it: a keep-alive connection carried
// propagated requests before Close and carries plain ones, intact, after.
func TestPropagationCleanup(t *testing.T) {
	held := testutil.OwnPrograms(t)
	p := fmhttp.New()
	s, sub := inProcess(t, p)
	if !p.Status().Propagation {
		t.Fatalf("status %+v", p.Status())
	}
	ids := testutil.ProgramsSince(t, held)
	var sockOps, skMsg ebpf.ProgramID
	var maps []ebpf.MapID
	for _, id := range ids {
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		info, err := prog.Info()
		prog.Close()
		if err != nil {
			t.Fatal(err)
		}
		switch info.Type {
		case ebpf.SockOps:
			sockOps = id
		case ebpf.SkMsg:
			skMsg = id
			maps, _ = info.MapIDs()
		}
	}
	if sockOps == 0 || skMsg == 0 || len(maps) == 0 {
		t.Fatalf("programs %v: no sock_ops or sk_msg program loaded", ids)
	}
	cg, err := cgroupfs.Dir(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	attached := func() bool {
		f, err := os.Open(cg)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		q, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupSockOps})
		if err != nil {
			t.Fatalf("querying %s: %v", cg, err)
		}
		return slices.ContainsFunc(q.Programs, func(a link.AttachedProgram) bool { return a.ID == sockOps })
	}
	if !attached() {
		t.Fatalf("sock_ops program %d is not attached to %s", sockOps, cg)
	}

	srv, got := headerServer(t)
	tr := &http.Transport{MaxConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr}
	send := func() [2]string {
		t.Helper()
		resp, err := cl.Post(srv.URL, "text/plain", strings.NewReader(strings.Repeat("x", 20000)))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return <-got
	}
	before := send()
	c := nextClient(t, sub)
	// Made outside any served request: the trace flowmill started for
	// the client span alone.
	if c.Parent != fmhttp.NoParent || c.Span.ParentSpanID.IsValid() {
		t.Errorf("client request %+v has a parent", c.Span)
	}
	if want := "00-" + c.Span.TraceID.String() + "-" + c.Span.SpanID.String() + "-01"; before[0] != want {
		t.Errorf("server received traceparent %q, want %q", before[0], want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.ProgramsGone(t, ids)
	if attached() {
		t.Errorf("sock_ops program %d still attached to %s after Close", sockOps, cg)
	}
	// The kernel frees maps after the programs using them, after an RCU
	// grace period: poll, with a deadline.
	for _, id := range maps {
		for deadline := time.Now().Add(testutil.Timeout(2 * time.Second)); ; time.Sleep(20 * time.Millisecond) {
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				break
			}
			m.Close()
			if time.Now().After(deadline) {
				t.Errorf("map %d still exists after Close", id)
				break
			}
		}
	}
	after := send()
	if after[0] != "" || after[1] != before[1] {
		t.Errorf("after Close: traceparent %q on %s, want none on the same connection %s", after[0], after[1], before[1])
	}
	if ps := p.PropagationStats(); ps.Injected != 1 {
		t.Errorf("final propagation counts %+v: want 1 injected", ps)
	}
}
