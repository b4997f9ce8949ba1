package sql

import (
	"strings"
)

// Sanitized is what the probe exports of a statement's text.
type Sanitized struct {
	// Text is the statement with every literal replaced by "?": quoted
	// strings ('...', E'...', N'...', X'...', B'...', "..." where the
	// dialect could take it for a string, dollar-quoted $tag$...$tag$),
	// numbers (integers, decimals, exponents, hex 0x..., signs of
	// negative literals), so that no value written inline appears.
	// Comments are dropped. Placeholders ($1, ?, :name, @p1) stay.
	Text string
	// Operation is the statement's first keyword in upper case (SELECT,
	// INSERT, ...; for WITH ... the statement the WITH leads to), "" if
	// none.
	Operation string
	// Collection is the one table the statement names (after FROM, INTO,
	// UPDATE, JOIN, TABLE), "" if none or several.
	Collection string
}

// Sanitize replaces the literals of query and derives its operation and
// table. A truncated query (an unterminated string or comment) has the
// rest replaced as well.
//
// Double-quoted text is taken for an identifier (standard SQL: PostgreSQL,
// SQLite); SanitizeMySQL takes it for a string, as MySQL does.
func Sanitize(query string) Sanitized { return sanitize(query, false) }

// SanitizeMySQL is Sanitize for MySQL, where "..." is a string.
func SanitizeMySQL(query string) Sanitized { return sanitize(query, true) }

func sanitize(query string, dqString bool) Sanitized {
	toks := tokenize(query, dqString)
	var b strings.Builder
	b.Grow(len(query))
	prevWord := false
	for i, t := range toks {
		s := t.text
		if t.kind == tokLiteral {
			s = "?"
		}
		// One space between tokens where the source had space or a
		// comment, none elsewhere.
		if i > 0 && t.spaceBefore {
			b.WriteByte(' ')
		} else if i > 0 && prevWord && (t.kind == tokWord || t.kind == tokLiteral) {
			b.WriteByte(' ')
		}
		b.WriteString(s)
		prevWord = t.kind == tokWord || t.kind == tokLiteral
	}
	out := Sanitized{Text: b.String()}
	out.Operation, out.Collection = describe(toks)
	return out
}

type tokKind uint8

const (
	tokWord    tokKind = iota + 1 // keyword or identifier (quoted or not)
	tokLiteral                    // a value
	tokPunct                      // operators, parentheses, placeholders
)

type token struct {
	kind        tokKind
	text        string
	spaceBefore bool
	quoted      bool // a quoted identifier ("t", `t`, [t])
}

func isIdentStart(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80
}

func isIdent(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' || c == '$' }

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

// tokenize splits a statement into tokens, literals recognised.
// dqString: "..." is a string (MySQL), not an identifier.
func tokenize(q string, dqString bool) []token {
	var toks []token
	space := false
	add := func(k tokKind, s string) {
		toks = append(toks, token{kind: k, text: s, spaceBefore: space})
		space = false
	}
	// lastValue reports whether the previous token ends an operand (so a
	// following '-' or '+' is binary, not a sign).
	lastValue := func() bool {
		if len(toks) == 0 {
			return false
		}
		t := toks[len(toks)-1]
		switch t.kind {
		case tokLiteral:
			return true
		case tokWord:
			return !isKeyword(t.text) || t.quoted
		}
		return t.text == ")" || t.text == "]" || strings.HasPrefix(t.text, "$") || t.text == "?" ||
			strings.HasPrefix(t.text, ":") || strings.HasPrefix(t.text, "@")
	}
	for i := 0; i < len(q); {
		c := q[i]
		switch {
		case isSpace(c):
			space = true
			i++
		case c == '-' && i+1 < len(q) && q[i+1] == '-', c == '#':
			// Line comment (# is MySQL's).
			for i < len(q) && q[i] != '\n' {
				i++
			}
			space = true
		case c == '/' && i+1 < len(q) && q[i+1] == '*':
			depth := 0
			for i < len(q) {
				if q[i] == '/' && i+1 < len(q) && q[i+1] == '*' {
					depth++
					i += 2
				} else if q[i] == '*' && i+1 < len(q) && q[i+1] == '/' {
					depth--
					i += 2
					if depth == 0 {
						break
					}
				} else {
					i++
				}
			}
			space = true
		case c == '\'':
			// A backslash escapes the next byte, as in MySQL: a
			// standard string ending in a backslash then runs on
			// to the next quote, more replaced, nothing leaked.
			i = skipQuoted(q, i, '\'', true)
			add(tokLiteral, "")
		case (c == 'E' || c == 'e') && i+1 < len(q) && q[i+1] == '\'':
			i = skipQuoted(q, i+1, '\'', true)
			add(tokLiteral, "")
		case (c == 'N' || c == 'n' || c == 'X' || c == 'x' || c == 'B' || c == 'b' || c == 'U' || c == 'u') &&
			i+1 < len(q) && q[i+1] == '\'':
			i = skipQuoted(q, i+1, '\'', true)
			add(tokLiteral, "")
		case (c == 'U' || c == 'u') && i+2 < len(q) && q[i+1] == '&' && q[i+2] == '\'':
			i = skipQuoted(q, i+2, '\'', false)
			add(tokLiteral, "")
		case c == '"' && dqString:
			i = skipQuoted(q, i, c, true)
			add(tokLiteral, "")
		case c == '"' || c == '`':
			j := skipQuoted(q, i, c, false)
			toks = append(toks, token{kind: tokWord, text: q[i:j], spaceBefore: space, quoted: true})
			space = false
			i = j
		case c == '$' && i+1 < len(q) && isDigit(q[i+1]):
			// Placeholder $1.
			j := i + 1
			for j < len(q) && isDigit(q[j]) {
				j++
			}
			add(tokPunct, q[i:j])
			i = j
		case c == '$':
			// Dollar quoting: $$...$$ or $tag$...$tag$.
			j := i + 1
			for j < len(q) && isIdent(q[j]) && q[j] != '$' {
				j++
			}
			if j < len(q) && q[j] == '$' {
				tag := q[i : j+1]
				end := strings.Index(q[j+1:], tag)
				if end < 0 {
					i = len(q)
				} else {
					i = j + 1 + end + len(tag)
				}
				add(tokLiteral, "")
				continue
			}
			add(tokPunct, "$")
			i++
		case isDigit(c) || c == '.' && i+1 < len(q) && isDigit(q[i+1]):
			i = skipNumber(q, i)
			// A sign directly before it, where it cannot be binary,
			// belongs to the literal.
			if n := len(toks); n > 0 && (toks[n-1].text == "-" || toks[n-1].text == "+") {
				sign := toks[n-1]
				toks = toks[:n-1]
				if !lastValue() {
					toks = append(toks, token{kind: tokLiteral, spaceBefore: sign.spaceBefore})
					space = false
					continue
				}
				toks = append(toks, sign)
			}
			add(tokLiteral, "")
		case isIdentStart(c):
			j := i
			for j < len(q) && isIdent(q[j]) {
				j++
			}
			add(tokWord, q[i:j])
			i = j
		case c == '[':
			// SQL Server quoted identifier.
			j := strings.IndexByte(q[i:], ']')
			if j < 0 {
				j = len(q) - i - 1
			}
			toks = append(toks, token{kind: tokWord, text: q[i : i+j+1], spaceBefore: space, quoted: true})
			space = false
			i += j + 1
		case (c == ':' || c == '@') && i+1 < len(q) && isIdentStart(q[i+1]):
			j := i + 1
			for j < len(q) && isIdent(q[j]) {
				j++
			}
			add(tokPunct, q[i:j])
			i = j
		default:
			// Operators: keep multi-byte ones together.
			j := i + 1
			for j < len(q) && strings.IndexByte("<>=!|&:~^", q[j]) >= 0 && strings.IndexByte("<>=!|&:~^", c) >= 0 {
				j++
			}
			add(tokPunct, q[i:j])
			i = j
		}
	}
	return toks
}

// skipQuoted returns the index after the quoted text starting at q[i]
// (the quote); a doubled quote is one quote, and with backslash escapes
// (E” strings) \x escapes x. Unterminated: len(q).
func skipQuoted(q string, i int, quote byte, backslash bool) int {
	for j := i + 1; j < len(q); j++ {
		switch q[j] {
		case '\\':
			if backslash {
				j++
			}
		case quote:
			if j+1 < len(q) && q[j+1] == quote {
				j++
				continue
			}
			return j + 1
		}
	}
	return len(q)
}

// skipNumber returns the index after the number at q[i]: decimal with
// fraction and exponent, 0x hex, 0b binary, 0o octal, digits with _.
func skipNumber(q string, i int) int {
	j := i
	if q[j] == '0' && j+1 < len(q) && strings.IndexByte("xXbBoO", q[j+1]) >= 0 {
		j += 2
		for j < len(q) && (isDigit(q[j]) || q[j] == '_' || q[j] >= 'a' && q[j] <= 'f' || q[j] >= 'A' && q[j] <= 'F') {
			j++
		}
		return j
	}
	for j < len(q) && (isDigit(q[j]) || q[j] == '_') {
		j++
	}
	if j < len(q) && q[j] == '.' {
		j++
		for j < len(q) && isDigit(q[j]) {
			j++
		}
	}
	if j < len(q) && (q[j] == 'e' || q[j] == 'E') {
		k := j + 1
		if k < len(q) && (q[k] == '+' || q[k] == '-') {
			k++
		}
		if k < len(q) && isDigit(q[k]) {
			j = k
			for j < len(q) && isDigit(q[j]) {
				j++
			}
		}
	}
	// A number running into letters (1abc) is not valid SQL; take the
	// letters as part of the literal so none is left.
	for j < len(q) && isIdent(q[j]) {
		j++
	}
	return j
}

var keywords = map[string]bool{}

func init() {
	for _, k := range strings.Fields(`SELECT INSERT UPDATE DELETE CREATE DROP ALTER TRUNCATE MERGE UPSERT REPLACE WITH
		FROM INTO JOIN TABLE WHERE AND OR NOT IN IS NULL VALUES SET ON AS BY ORDER GROUP HAVING LIMIT OFFSET
		LEFT RIGHT INNER OUTER FULL CROSS UNION ALL DISTINCT CASE WHEN THEN ELSE END BETWEEN LIKE ILIKE
		EXISTS RETURNING INTERVAL SELECT ASC DESC IF TRUE FALSE DEFAULT PRIMARY KEY INDEX VIEW
		BEGIN COMMIT ROLLBACK SAVEPOINT RELEASE EXPLAIN ANALYZE SHOW USE GRANT REVOKE CALL EXEC EXECUTE
		PRAGMA VACUUM COPY LOCK ONLY LATERAL USING NATURAL TEMP TEMPORARY UNLOGGED ESCAPE SIMILAR TO`) {
		keywords[k] = true
	}
}

func isKeyword(w string) bool { return keywords[strings.ToUpper(w)] }

// operations the semantic conventions' db.operation.name takes from the
// statement's first keyword.
var operations = map[string]bool{}

func init() {
	for _, k := range strings.Fields(`SELECT INSERT UPDATE DELETE CREATE DROP ALTER TRUNCATE MERGE UPSERT REPLACE
		BEGIN COMMIT ROLLBACK SAVEPOINT RELEASE EXPLAIN ANALYZE SHOW USE GRANT REVOKE CALL EXEC EXECUTE
		PRAGMA VACUUM COPY LOCK SET VALUES TABLE DECLARE FETCH CLOSE LISTEN NOTIFY PREPARE DEALLOCATE REFRESH
		REINDEX CLUSTER COMMENT DISCARD DO IMPORT LOAD RESET START`) {
		operations[k] = true
	}
}

// describe returns the statement's operation and the one table it names.
func describe(toks []token) (op, coll string) {
	i := 0
	for i < len(toks) && toks[i].kind == tokPunct && toks[i].text == "(" {
		i++
	}
	if i >= len(toks) || toks[i].kind != tokWord || toks[i].quoted {
		return "", ""
	}
	first := strings.ToUpper(toks[i].text)
	if first == "WITH" {
		// The operation is the first top-level DML keyword after the CTEs.
		depth := 0
		for j := i + 1; j < len(toks); j++ {
			switch toks[j].text {
			case "(":
				depth++
			case ")":
				depth--
			}
			if depth == 0 && toks[j].kind == tokWord && !toks[j].quoted {
				switch w := strings.ToUpper(toks[j].text); w {
				case "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE":
					first = w
				}
				if first != "WITH" {
					break
				}
			}
		}
		if first == "WITH" {
			return "", ""
		}
	} else if !operations[first] {
		return "", ""
	}
	op = first
	// Tables: the name after FROM, INTO, UPDATE, JOIN, TABLE (and
	// DELETE FROM, CREATE TABLE [IF NOT EXISTS], INSERT INTO ...).
	var tables []string
	for j := i; j < len(toks); j++ {
		t := toks[j]
		if t.kind != tokWord || t.quoted {
			continue
		}
		switch strings.ToUpper(t.text) {
		case "FROM", "INTO", "UPDATE", "JOIN", "TABLE":
		default:
			continue
		}
		k := j + 1
		// CREATE TABLE IF NOT EXISTS t, DROP TABLE IF EXISTS t, FROM ONLY t
		for k < len(toks) && toks[k].kind == tokWord && !toks[k].quoted {
			u := strings.ToUpper(toks[k].text)
			if u != "IF" && u != "NOT" && u != "EXISTS" && u != "ONLY" {
				break
			}
			k++
		}
		name, n := qualifiedName(toks, k)
		if name == "" {
			if k < len(toks) && toks[k].text == "(" {
				// A subquery or a function: the table is not
				// one name.
				tables = append(tables, "", "")
			}
			continue
		}
		tables = appendUnique(tables, name)
		j = k + n - 1
		// FROM a, b: a second table.
		if k+n < len(toks) && toks[k+n].text == "," && strings.ToUpper(t.text) == "FROM" {
			tables = append(tables, "")
		}
	}
	if len(tables) == 1 {
		coll = tables[0]
	}
	return op, coll
}

// qualifiedName reads schema.table at toks[k]; "" when there is no name.
func qualifiedName(toks []token, k int) (string, int) {
	var b strings.Builder
	n := 0
	for k+n < len(toks) {
		t := toks[k+n]
		if t.kind != tokWord || (!t.quoted && isKeyword(t.text)) {
			break
		}
		b.WriteString(t.text)
		n++
		if k+n < len(toks) && toks[k+n].text == "." && !toks[k+n].spaceBefore {
			b.WriteByte('.')
			n++
			continue
		}
		break
	}
	s := b.String()
	if strings.HasSuffix(s, ".") {
		return "", 0
	}
	return s, n
}

func appendUnique(s []string, v string) []string {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}
