package sql_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/flowmill/flowmill"
	fmsql "github.com/flowmill/flowmill/probes/sql"
)

// TestInvalidOptions: bad option values are an error from flowmill.New
// wrapping ErrInvalidOption and naming the option, never a panic.
func TestInvalidOptions(t *testing.T) {
	for _, tc := range []struct {
		opt  fmsql.Option
		want string
	}{
		{fmsql.WithMaxInFlight(0), "sql.WithMaxInFlight(0)"},
		{fmsql.WithMaxInFlight(1 << 30), "sql.WithMaxInFlight"},
		{fmsql.WithStaleAfter(0), "sql.WithStaleAfter(0s)"},
		{fmsql.WithStaleAfter(-time.Minute), "sql.WithStaleAfter(-1m0s)"},
		{nil, "sql.New"},
	} {
		s, err := flowmill.New(flowmill.WithProbes(fmsql.New(tc.opt)))
		if err == nil {
			s.Close()
			t.Errorf("%s: no error", tc.want)
			continue
		}
		if !errors.Is(err, flowmill.ErrInvalidOption) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v", tc.want, err)
		}
	}
}

// TestStatusBeforeAttach: nothing instrumented, nothing skipped, no panic.
func TestStatusBeforeAttach(t *testing.T) {
	st := fmsql.New().Status()
	if st.Query || st.Exec || st.StmtQuery || st.StmtExec || st.Parenting || len(st.Skipped) != 0 {
		t.Errorf("status %+v before Attach", st)
	}
}
