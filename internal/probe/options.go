package probe

import (
	"fmt"
	"time"
)

// Options collects the errors of a family's options, which cannot return
// one themselves (they are plain functions applied by the family's New):
// the family keeps an Options and returns Err from Prepare, so that an
// invalid option is an error from flowmill.Start, never a panic or a value
// silently replaced.
type Options struct {
	errs []error
}

// Fail records an error: opt is the option as the user wrote it
// ("tcp.WithMaxFlows(-1)"), why says what is wrong and what to pass.
func (o *Options) Fail(opt, why string) {
	o.errs = append(o.errs, fmt.Errorf("%s: %s", opt, why))
}

// Int checks lo <= n <= hi for the option named opt ("tcp.WithMaxFlows")
// and reports whether it is.
func (o *Options) Int(opt string, n, lo, hi int) bool {
	if n < lo || n > hi {
		o.Fail(fmt.Sprintf("%s(%d)", opt, n), fmt.Sprintf("must be between %d and %d", lo, hi))
		return false
	}
	return true
}

// Duration checks lo <= d <= hi for the option named opt and reports
// whether it is.
func (o *Options) Duration(opt string, d, lo, hi time.Duration) bool {
	if d < lo || d > hi {
		o.Fail(fmt.Sprintf("%s(%v)", opt, d), fmt.Sprintf("must be between %v and %v", lo, hi))
		return false
	}
	return true
}

// NilOption records a nil Option passed to the family's New.
func (o *Options) NilOption(family string) {
	o.Fail(family+".New", "an option is nil")
}

// Err is every recorded error, joined, or nil.
func (o *Options) Err() error {
	switch len(o.errs) {
	case 0:
		return nil
	case 1:
		return o.errs[0]
	}
	err := o.errs[0]
	for _, e := range o.errs[1:] {
		err = fmt.Errorf("%w; %w", err, e)
	}
	return err
}
