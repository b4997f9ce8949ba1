package grpc

import (
	"errors"
	"testing"
)

// TestLayoutParts: the test binary links grpc-go's server and client, so
// both parts' layouts are found among its type descriptors; a type the
// program does not have is a layout error, not a panic.
func TestLayoutParts(t *testing.T) {
	l := programLayout()
	if l.serverErr != nil || l.clientErr != nil {
		t.Fatalf("server: %v; client: %v", l.serverErr, l.clientErr)
	}
	if l.stItab == 0 || l.csItab == 0 || l.tcpAddrItab == 0 || l.errItab == 0 {
		t.Errorf("layout %+v: an interface table is missing", l)
	}
	if _, err := programPointerType(transportPkg, "noSuchType"); !errors.Is(err, errLayout) {
		t.Errorf("a type not in the program: %v, want errLayout", err)
	}
}
