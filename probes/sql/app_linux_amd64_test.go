package sql_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowmill/flowmill/internal/testprog"
	"github.com/flowmill/flowmill/internal/testutil"
)

// appSpan is a span as testdata/sqlapp prints it.
type appSpan struct {
	Name     string            `json:"name"`
	Kind     string            `json:"kind"`
	TraceID  string            `json:"trace_id"`
	SpanID   string            `json:"span_id"`
	ParentID string            `json:"parent_id"`
	Start    time.Time         `json:"start"`
	End      time.Time         `json:"end"`
	Error    bool              `json:"error"`
	Attrs    map[string]string `json:"attrs"`
}

// runApp runs testdata/sqlapp with a driver and returns its spans.
func runApp(t *testing.T, prog testprog.Program, drv, dsn string) ([]appSpan, uint64) {
	t.Helper()
	testutil.RequireBPF(t)
	bin := testutil.Program(t, prog)
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, "-driver", drv, "-dsn", dsn)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("sqlapp -driver %s: %v\n%s", drv, err, stderr.String())
	}
	t.Logf("sqlapp: %s", stderr.String())
	// The program runs no prepared statement: the linker left the Stmt
	// functions out, and the status says so.
	var st struct {
		Query, Exec, StmtQuery, Parenting bool
		Skipped                           []string
	}
	if line, ok := strings.CutPrefix(strings.SplitN(stderr.String(), "\n", 2)[0], "status "); !ok || json.Unmarshal([]byte(line), &st) != nil {
		t.Errorf("sqlapp's first line is not its status")
	} else if !st.Query || !st.Exec || st.StmtQuery || !st.Parenting ||
		!slices.ContainsFunc(st.Skipped, func(s string) bool { return strings.Contains(s, "(*Stmt).QueryContext: not in the program") }) {
		t.Errorf("status %+v: want queryDC and execDC, parenting, Stmt.QueryContext reported missing", st)
	}
	var stats struct{ EventsLost, Missed, Evicted uint64 }
	for line := range strings.SplitSeq(stderr.String(), "\n") {
		if j, ok := strings.CutPrefix(strings.TrimSpace(line), "stats "); ok {
			if err := json.Unmarshal([]byte(j), &stats); err != nil {
				t.Errorf("sqlapp stats %q: %v", j, err)
			}
		}
	}
	var spans []appSpan
	sc := bufio.NewScanner(&stdout)
	sc.Buffer(nil, 1<<20)
	done := false
	for sc.Scan() {
		if sc.Text() == "done" {
			done = true
			break
		}
		var s appSpan
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatalf("sqlapp printed %q: %v", sc.Text(), err)
		}
		spans = append(spans, s)
	}
	if !done {
		t.Fatalf("sqlapp did not finish its output:\n%s", stdout.String())
	}
	return spans, stats.EventsLost + stats.Missed + stats.Evicted
}

// checkApp checks sqlapp's spans: the statements of its served request,
// children of the request's server span, and its 200 concurrent
// statements, each matched to its own.
func checkApp(t *testing.T, spans []appSpan, lost uint64, system, placeholder string) {
	t.Helper()
	var server *appSpan
	var inReq []appSpan
	conc := map[string]int{}
	for i := range spans {
		s := &spans[i]
		for k, v := range s.Attrs {
			if strings.Contains(v, "sekrit") || strings.Contains(v, "4711") || strings.Contains(v, "987654321") {
				t.Errorf("span %q: attribute %s = %q holds a literal", s.Name, k, v)
			}
		}
		switch {
		case s.Kind == "server":
			server = s
		case s.Attrs["db.system.name"] == "":
		case strings.Contains(s.Attrs["db.query.text"], " AS c_"):
			q := s.Attrs["db.query.text"]
			alias := q[strings.Index(q, " AS ")+4:]
			if want := "SELECT " + placeholder + " AS " + alias; q != want || s.Name != "SELECT" || s.ParentID != "" {
				t.Errorf("concurrent span %q %v (parent %q): want text %q, no parent", s.Name, s.Attrs, s.ParentID, want)
			}
			conc[alias]++
		default:
			inReq = append(inReq, *s)
		}
	}
	if server == nil {
		t.Fatal("no server span")
	}
	slices.SortFunc(inReq, func(a, b appSpan) int { return a.Start.Compare(b.Start) })
	want := []struct{ name, op, coll string }{
		{"SELECT", "SELECT", ""},
		{"CREATE accounts", "CREATE", "accounts"},
		{"INSERT accounts", "INSERT", "accounts"},
		{system, "", ""},
		{"UPDATE accounts", "UPDATE", "accounts"},
	}
	if len(inReq) != len(want) {
		for _, s := range inReq {
			t.Logf("span %q %v", s.Name, s.Attrs)
		}
		t.Fatalf("%d statement spans in the request, want %d", len(inReq), len(want))
	}
	for i, w := range want {
		s := inReq[i]
		t.Logf("span %q %v", s.Name, s.Attrs)
		if s.Name != w.name || s.Attrs["db.operation.name"] != w.op || s.Attrs["db.collection.name"] != w.coll ||
			s.Attrs["db.system.name"] != system || s.Kind != "client" {
			t.Errorf("span %d: %q %s %v, want %+v, system %s", i, s.Name, s.Kind, s.Attrs, w, system)
		}
		failing := w.op == ""
		if failing != (s.Attrs["error.type"] != "") || failing != s.Error {
			t.Errorf("span %q: error %v, error.type %q", s.Name, s.Error, s.Attrs["error.type"])
		}
		if s.ParentID != server.SpanID || s.TraceID != server.TraceID {
			t.Errorf("span %q: parent %s/%s, want the server span %s/%s", s.Name, s.TraceID, s.ParentID, server.TraceID, server.SpanID)
		}
		if s.Start.Before(server.Start) || s.End.After(server.End) {
			t.Errorf("span %q not within its server span", s.Name)
		}
	}
	checkEach(t, conc, "c", 20, 10, lost)
}

// TestSQLite: sqlapp with modernc.org/sqlite (pure Go) on a temporary
// file.
func TestSQLite(t *testing.T) {
	dsn := "file:" + filepath.Join(t.TempDir(), "app.db") + "?_pragma=busy_timeout(10000)"
	spans, lost := runApp(t, testprog.SQLApp, "sqlite", dsn)
	checkApp(t, spans, lost, "sqlite", "?")
}

// TestStripped: the same with a stripped executable (-ldflags=-s -w):
// functions are found in the pclntab, offsets from the program's types.
func TestStripped(t *testing.T) {
	dsn := "file:" + filepath.Join(t.TempDir(), "app.db") + "?_pragma=busy_timeout(10000)"
	spans, lost := runApp(t, testprog.SQLAppStripped, "sqlite", dsn)
	checkApp(t, spans, lost, "sqlite", "?")
}

// TestPostgres: sqlapp with pgx (stdlib) against a PostgreSQL server the
// test starts on a loopback port.
func TestPostgres(t *testing.T) {
	testutil.RequireBPF(t)
	port := startPostgres(t)
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable", port)
	spans, lost := runApp(t, testprog.SQLApp, "pgx", dsn)
	checkApp(t, spans, lost, "postgresql", "$1::int")
}

// startPostgres runs a PostgreSQL server (Debian's postgresql package) as
// the postgres user on a free loopback port, its data in a temporary
// directory, until the test ends; it returns the port.
func startPostgres(t *testing.T) int {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
	if len(bins) == 0 {
		testutil.Unavailable(t, "no PostgreSQL server in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
	}
	slices.SortFunc(bins, func(a, b string) int { return pgVersion(a) - pgVersion(b) })
	bindir := filepath.Dir(bins[len(bins)-1])
	u, err := user.Lookup("postgres")
	if err != nil {
		testutil.Unavailable(t, "no postgres user to run the server as: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	dir, err := os.MkdirTemp("", "flowmill-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	asPG := func(name string, args ...string) *exec.Cmd {
		cmd := exec.Command(filepath.Join(bindir, name), args...)
		cmd.Dir = dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		return cmd
	}
	if out, err := asPG("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	var log bytes.Buffer
	srv := asPG("postgres", "-D", data, "-p", strconv.Itoa(port), "-k", dir, "-h", "127.0.0.1",
		"-c", "fsync=off", "-c", "dynamic_shared_memory_type=mmap", "-c", "max_connections=50")
	srv.Stdout, srv.Stderr = &log, &log
	if err := srv.Start(); err != nil {
		t.Fatalf("postgres: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- srv.Wait() }()
	t.Cleanup(func() {
		if out, err := asPG("pg_ctl", "stop", "-D", data, "-m", "immediate", "-w").CombinedOutput(); err != nil {
			t.Logf("pg_ctl stop: %v\n%s", err, out)
			srv.Process.Kill()
		}
		<-exited
	})
	deadline := time.Now().Add(testutil.Timeout(60 * time.Second))
	for {
		cmd := asPG("pg_isready", "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-t", "2")
		if cmd.Run() == nil {
			return port
		}
		select {
		case err := <-exited:
			t.Fatalf("postgres exited: %v\n%s", err, log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("postgres not ready on port %d:\n%s", port, log.String())
		}
		time.Sleep(50 * time.Millisecond) // polling readiness, bounded by the deadline
	}
}

func pgVersion(bin string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(bin))))
	return v
}
