package sql

import "testing"

func TestProgramLayout(t *testing.T) {
	l, err := programLayout()
	if err != nil {
		t.Fatal(err)
	}
	if l.stmtQuery == 0 || l.dcCI == 0 || l.stmtCSS == 0 || l.stmtCgds == 0 {
		t.Errorf("layout %+v: fields at 0 that cannot be", l)
	}
	t.Logf("%+v", l)
}
