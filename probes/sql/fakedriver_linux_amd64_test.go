package sql_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"io"
	"strings"
	"sync"
)

// fakeDriver is a database/sql driver of the test's own, so that the
// probe's tests in this module need no third-party driver (those run in
// testdata/sqlapp, a module of its own): statements containing "SELEKT"
// fail with a *syntaxError; every other statement succeeds.
type fakeDriver struct{}

var registerOnce sync.Once

func openFake() (*sql.DB, error) {
	registerOnce.Do(func() { sql.Register("flowmill-fake", fakeDriver{}) })
	return sql.Open("flowmill-fake", "")
}

func (fakeDriver) Open(string) (driver.Conn, error) { return &fakeConn{}, nil }

type fakeConn struct{}

type syntaxError struct{ pos int }

func (e *syntaxError) Error() string { return "syntax error" }

func check(q string) error {
	if i := strings.Index(q, "SELEKT"); i >= 0 {
		return &syntaxError{i}
	}
	return nil
}

func (c *fakeConn) Prepare(q string) (driver.Stmt, error) {
	if err := check(q); err != nil {
		return nil, err
	}
	return &fakeStmt{q}, nil
}
func (c *fakeConn) Close() error              { return nil }
func (c *fakeConn) Begin() (driver.Tx, error) { return fakeTx{}, nil }

func (c *fakeConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	if err := check(q); err != nil {
		return nil, err
	}
	return &fakeRows{n: 1}, nil
}

func (c *fakeConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	if err := check(q); err != nil {
		return nil, err
	}
	return driver.RowsAffected(1), nil
}

type fakeTx struct{}

func (fakeTx) Commit() error   { return nil }
func (fakeTx) Rollback() error { return nil }

type fakeStmt struct{ q string }

func (s *fakeStmt) Close() error                               { return nil }
func (s *fakeStmt) NumInput() int                              { return -1 }
func (s *fakeStmt) Exec([]driver.Value) (driver.Result, error) { return driver.RowsAffected(1), nil }
func (s *fakeStmt) Query([]driver.Value) (driver.Rows, error)  { return &fakeRows{n: 1}, nil }

type fakeRows struct{ n int }

func (r *fakeRows) Columns() []string { return []string{"x"} }
func (r *fakeRows) Close() error      { return nil }
func (r *fakeRows) Next(dest []driver.Value) error {
	if r.n == 0 {
		return io.EOF
	}
	r.n--
	dest[0] = int64(1)
	return nil
}
