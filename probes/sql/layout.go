package sql

import (
	"database/sql"
	"fmt"
	"reflect"
)

// layout is what the kernel side reads of database/sql, from the types
// compiled into this very program (reflect), never from a table.
type layout struct {
	dcCI      uint64 // driverConn.ci
	stmtQuery uint64 // Stmt.query
	stmtCSS   uint64 // Stmt.css
	stmtCgds  uint64 // Stmt.cgds
	csDC      uint64 // connStmt.dc
	dsLocker  uint64 // driverStmt.Locker
}

// stmtRead is how much of a Stmt the kernel reads at once (STMT_READ in
// bpf/sql.c): every field it takes must end within it.
const stmtRead = 256

func field(t reflect.Type, name string, kind reflect.Kind) (reflect.StructField, error) {
	f, ok := t.FieldByName(name)
	if !ok || len(f.Index) != 1 {
		return f, fmt.Errorf("%v has no field %s", t, name)
	}
	if f.Type.Kind() != kind {
		return f, fmt.Errorf("%v.%s is a %v, not a %v", t, name, f.Type.Kind(), kind)
	}
	return f, nil
}

func programLayout() (layout, error) {
	var l layout
	conn := reflect.TypeFor[sql.Conn]()
	dc, err := field(conn, "dc", reflect.Pointer)
	if err != nil {
		return l, err
	}
	ci, err := field(dc.Type.Elem(), "ci", reflect.Interface)
	if err != nil {
		return l, err
	}
	l.dcCI = uint64(ci.Offset)
	stmt := reflect.TypeFor[sql.Stmt]()
	q, err := field(stmt, "query", reflect.String)
	if err != nil {
		return l, err
	}
	css, err := field(stmt, "css", reflect.Slice)
	if err != nil {
		return l, err
	}
	cgds, err := field(stmt, "cgds", reflect.Pointer)
	if err != nil {
		return l, err
	}
	for _, f := range []reflect.StructField{q, css, cgds} {
		if f.Offset+f.Type.Size() > stmtRead-8 {
			return l, fmt.Errorf("sql.Stmt.%s ends at %d, past the %d bytes read", f.Name, f.Offset+f.Type.Size(), stmtRead-8)
		}
	}
	l.stmtQuery, l.stmtCSS, l.stmtCgds = uint64(q.Offset), uint64(css.Offset), uint64(cgds.Offset)
	csdc, err := field(css.Type.Elem(), "dc", reflect.Pointer)
	if err != nil {
		return l, err
	}
	if csdc.Type != dc.Type {
		return l, fmt.Errorf("connStmt.dc is a %v, not a %v", csdc.Type, dc.Type)
	}
	l.csDC = uint64(csdc.Offset)
	lk, err := field(cgds.Type.Elem(), "Locker", reflect.Interface)
	if err != nil {
		return l, err
	}
	l.dsLocker = uint64(lk.Offset)
	return l, nil
}
