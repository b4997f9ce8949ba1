// Package sql is the database/sql probe family: a client span and a
// db.client.operation.duration entry for every statement the calling Go
// program runs through database/sql (Query, QueryRow, Exec, with or
// without a context, on a DB, a Conn or a Tx, and prepared statements),
// with no change to the program, whatever the driver.
//
// It places uprobes on the program's own executable (/proc/self/exe): one
// after the stack check and one on each RET of the functions every
// statement goes through, database/sql.(*DB).queryDC and (*DB).execDC
// (Query and Exec on a DB, Conn or Tx) and (*Stmt).QueryContext and
// (*Stmt).ExecContext (prepared statements). A statement costs two uprobe
// hits. Functions are found in the Go pclntab, so stripped binaries work;
// struct field offsets come from the database/sql types compiled into the
// program.
//
// The statement's text is copied in the kernel (at most 1 KiB) and its
// literals are replaced by "?" in user space, before it is published
// (Statement.Query): no value written inline leaves the process, and bound
// arguments are never read. The driver (db.system.name) is named after the
// Go type of the connection's driver.Conn: pgx (stdlib) and lib/pq
// postgresql, go-sql-driver/mysql mysql, modernc.org/sqlite and
// mattn/go-sqlite3 sqlite, other_sql otherwise. The error a statement
// returned is named by its Go type (error.type).
//
// Parenting: with the HTTP family (probes/http) in the same session,
// listed before this one in flowmill.WithProbes, a statement run with a
// served request's context (or a context derived from it), or on the
// goroutine serving a request, is a child of that request's server span.
//
// Not covered: the time spent reading rows after Query returned (the span
// ends when Query returns); server.address and server.port (not known from
// database/sql); statements a driver runs without database/sql; only amd64
// Linux.
package sql

import (
	"sync"
	"time"

	"github.com/flowmill/flowmill/internal/probe"
)

// Option configures the probe.
type Option func(*Probe)

// WithMaxInFlight bounds the statements tracked at once in the kernel
// (default 4096). Beyond it the oldest entries are evicted and counted in
// the session's Stats.Evicted. At most 1<<20.
func WithMaxInFlight(n int) Option {
	return func(p *Probe) {
		if p.opts.Int("sql.WithMaxInFlight", n, 1, 1<<20) {
			p.maxInFlight = uint32(n)
		}
	}
}

// WithStaleAfter sets how long a statement may stay in flight before its
// entry is dropped as one that will never return (default 10 minutes).
// It must be at least a second.
func WithStaleAfter(d time.Duration) Option {
	return func(p *Probe) {
		if p.opts.Duration("sql.WithStaleAfter", d, time.Second, 24*365*time.Hour) {
			p.staleAfter = d
		}
	}
}

// Probe is the database/sql probe family. Create it with New.
type Probe struct {
	maxInFlight uint32
	staleAfter  time.Duration
	opts        probe.Options

	mu     sync.Mutex
	status Status
}

// Status says what the probe instrumented in its last Attach.
type Status struct {
	// Query, Exec, StmtQuery and StmtExec say which of the functions
	// statements go through are instrumented: (*DB).queryDC,
	// (*DB).execDC, (*Stmt).QueryContext, (*Stmt).ExecContext. A
	// function the linker left out (the program never calls it) is not.
	Query, Exec, StmtQuery, StmtExec bool
	// Parenting says whether statements find the served HTTP request
	// they belong to (the HTTP family attached before this one).
	Parenting bool
	// Skipped lists what was left out and why.
	Skipped []string
}

// New returns the database/sql probe, to pass to flowmill.WithProbes. It
// produces Statement.
func New(opts ...Option) *Probe {
	p := &Probe{maxInFlight: 4096, staleAfter: 10 * time.Minute}
	for _, o := range opts {
		if o == nil {
			p.opts.NilOption("sql")
			continue
		}
		o(p)
	}
	return p
}

// Name returns "sql".
func (p *Probe) Name() string { return "sql" }

// Prepare reports invalid options and declares the event type.
func (p *Probe) Prepare(b *probe.Bus) error {
	probe.Produce[Statement](b)
	return p.opts.Err()
}

// Status reports what the last Attach instrumented.
func (p *Probe) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.status
	s.Skipped = append([]string(nil), s.Skipped...)
	return s
}

// The functions probed.
const (
	queryFunc     = "database/sql.(*DB).queryDC"
	execFunc      = "database/sql.(*DB).execDC"
	stmtQueryFunc = "database/sql.(*Stmt).QueryContext"
	stmtExecFunc  = "database/sql.(*Stmt).ExecContext"
)
