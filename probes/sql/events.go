package sql

import (
	"time"

	"go.opentelemetry.io/otel/trace"
)

// Statement is one statement run through database/sql.
type Statement struct {
	Start, End time.Time
	// Query is the statement's text with every literal replaced by "?"
	// (see Sanitize); Truncated says only its first part was taken (1 KiB
	// copied by the kernel, 64 KiB of a constant in the executable).
	Query     string
	Truncated bool
	// Operation and Collection: see Sanitized.
	Operation, Collection string
	// System is db.system.name: "postgresql", "mysql", "sqlite",
	// "other_sql" (a driver not known), "" (not learnt).
	System string
	// Driver is the Go type of the connection (driver.Conn), "" unknown.
	Driver string
	// Error is the Go type of the error returned ("*pgconn.PgError"),
	// "" if none, "_OTHER" if it could not be named.
	Error string
	// Prepared: run as a prepared statement (Stmt.Exec/Query).
	Prepared bool
	// Span is the statement's span; Parent says how its parent was found.
	Span   SpanContext
	Parent ParentLink
	// Goroutine, PID and TID ran it.
	Goroutine uint64
	PID, TID  uint32
}

// Duration is End - Start.
func (s *Statement) Duration() time.Duration { return s.End.Sub(s.Start) }

// SpanContext identifies a statement's span and its parent.
type SpanContext struct {
	TraceID      trace.TraceID
	SpanID       trace.SpanID
	ParentSpanID trace.SpanID // zero: a root span
	// RemoteParent: the parent request's trace came from a traceparent
	// header, whose sampled flag is Sampled.
	RemoteParent, Sampled bool
}

// ParentLink says how a statement found its parent.
type ParentLink uint8

const (
	// NoParent: run outside any served request; a trace of its own.
	NoParent ParentLink = iota
	// ParentByContext: run with the served request's context (or one
	// derived from it), on any goroutine.
	ParentByContext
	// ParentByGoroutine: run on the goroutine serving the request.
	ParentByGoroutine
)

// String returns "none", "context" or "goroutine".
func (l ParentLink) String() string {
	switch l {
	case ParentByContext:
		return "context"
	case ParentByGoroutine:
		return "goroutine"
	}
	return "none"
}

// systemOf maps the Go type of a driver's connection to db.system.name by
// its package name.
func systemOf(connType string) string {
	if connType == "" {
		return ""
	}
	t := connType
	for len(t) > 0 && t[0] == '*' {
		t = t[1:]
	}
	pkg := t
	for i := 0; i < len(t); i++ {
		if t[i] == '.' {
			pkg = t[:i]
			break
		}
	}
	switch pkg {
	case "stdlib", "pgx", "pq", "pgdriver":
		return "postgresql"
	case "mysql":
		return "mysql"
	case "sqlite", "sqlite3":
		return "sqlite"
	}
	return "other_sql"
}
