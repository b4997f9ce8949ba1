package http

import (
	"errors"
	"net"
	"testing"
	"unsafe"
)

func TestErrorType(t *testing.T) {
	var a attachment
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Err: errors.New("x")}, "*net.OpError"},
		{errors.New("plain"), "*errors.errorString"},
		{net.UnknownNetworkError("x"), "net.UnknownNetworkError"},
	} {
		itab := uint64(uintptr((*iface)(unsafe.Pointer(&tc.err)).tab))
		for range 2 { // the second time from the cache
			if got := a.errorType(itab); got != tc.want {
				t.Errorf("errorType = %q, want %q", got, tc.want)
			}
		}
	}
	if a.errorType(0) != "" {
		t.Error("no error: want empty")
	}
}
