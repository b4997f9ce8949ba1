package sql

import (
	"strings"
	"testing"
)

func TestSanitize(t *testing.T) {
	for _, c := range []struct {
		in, text, op, coll string
	}{
		{"SELECT 1", "SELECT ?", "SELECT", ""},
		{"select * from users where name = 'bob' and id = 42", "select * from users where name = ? and id = ?", "SELECT", "users"},
		{"SELECT 'it''s sekrit'", "SELECT ?", "SELECT", ""},
		{`SELECT 'a\'b sekrit'`, "SELECT ?", "SELECT", ""},
		{`SELECT E'x\'y sekrit' FROM t1`, "SELECT ? FROM t1", "SELECT", "t1"},
		{"SELECT $$dollar sekrit$$, $tag$it's $$ sekrit$tag$", "SELECT ?, ?", "SELECT", ""},
		{"SELECT -5, 3-2, x-1, t1.c2 FROM t1", "SELECT ?, ?-?, x-?, t1.c2 FROM t1", "SELECT", "t1"},
		{"UPDATE accounts SET balance = -12.5e3 WHERE id = $1", "UPDATE accounts SET balance = ? WHERE id = $1", "UPDATE", "accounts"},
		{"INSERT INTO public.t2 (a, b) VALUES (0xDEADBEEF, X'ff'), (B'0101', N'n')", "INSERT INTO public.t2 (a, b) VALUES (?, ?), (?, ?)", "INSERT", "public.t2"},
		{"DELETE FROM \"Orders\" WHERE x IN (1, 2, .5)", "DELETE FROM \"Orders\" WHERE x IN (?, ?, ?)", "DELETE", "\"Orders\""},
		{"CREATE TABLE IF NOT EXISTS items (id int, name text DEFAULT 'n')", "CREATE TABLE IF NOT EXISTS items (id int, name text DEFAULT ?)", "CREATE", "items"},
		{"SELECT a FROM t JOIN u ON t.id = u.id", "SELECT a FROM t JOIN u ON t.id = u.id", "SELECT", ""},
		{"SELECT a FROM t, u", "SELECT a FROM t, u", "SELECT", ""},
		{"SELECT * FROM (SELECT 1) s", "SELECT * FROM (SELECT ?) s", "SELECT", ""},
		{"WITH x AS (SELECT 1) SELECT * FROM x", "WITH x AS (SELECT ?) SELECT * FROM x", "SELECT", "x"},
		{"SELECT 1 -- sekrit comment\n, 2 /* sekrit /* nested */ */", "SELECT ? , ?", "SELECT", ""},
		{"SELECT 'unterminated sekrit", "SELECT ?", "SELECT", ""},
		{"SELECT :name, @p1, ? FROM t", "SELECT :name, @p1, ? FROM t", "SELECT", "t"},
		{"BEGIN", "BEGIN", "BEGIN", ""},
		{"SELEC 987654321 sekrit", "SELEC ? sekrit", "", ""},
		{"select interval '1 day'", "select interval ?", "SELECT", ""},
		{"SELECT U&'d\\0061t sekrit'", "SELECT ?", "SELECT", ""},
		{"SELECT 1e10, 1.5E-3, 1_000", "SELECT ?, ?, ?", "SELECT", ""},
	} {
		got := Sanitize(c.in)
		if got.Text != c.text || got.Operation != c.op || got.Collection != c.coll {
			t.Errorf("Sanitize(%q) = %+v, want text %q op %q coll %q", c.in, got, c.text, c.op, c.coll)
		}
		if strings.Contains(got.Text, "sekrit") && !strings.Contains(c.text, "sekrit") {
			t.Errorf("Sanitize(%q) leaks: %q", c.in, got.Text)
		}
	}
	if got := SanitizeMySQL(`SELECT "sekrit" FROM t`); got.Text != "SELECT ? FROM t" {
		t.Errorf("SanitizeMySQL: %+v", got)
	}
}

// FuzzSanitize: no digit run or quoted content survives outside identifiers.
func FuzzSanitize(f *testing.F) {
	f.Add("SELECT 'sekrit-4711', 987654321")
	f.Fuzz(func(t *testing.T, q string) {
		if strings.ContainsAny(q, "\"`[") {
			return // quoted identifiers may hold quotes
		}
		s := Sanitize(q)
		if strings.Contains(s.Text, "'") {
			t.Fatalf("Sanitize(%q) = %q: a quote survived", q, s.Text)
		}
	})
}
