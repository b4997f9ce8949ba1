// Package grpctest is the gRPC service and client the gRPC probe's tests
// drive, in the test process and in the child programs of other grpc-go
// versions (testdata): the standard health service, whose requested
// service name says what to do.
package grpctest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Health implements grpc.health.v1.Health. The service name asked for is
// a list of words separated by '/': "sleep=MS" sleeps MS milliseconds,
// "notfound" and "denied" answer NotFound and PermissionDenied, "msgs=N"
// makes Watch send N messages (default 3); anything else is ignored (a
// request's own name, to tell requests apart).
type Health struct {
	healthpb.UnimplementedHealthServer
	// OnCall, if set, is called by each handler with the service name
	// asked for, on the handler's goroutine, before it does anything.
	OnCall func(ctx context.Context, service string)
}

type behaviour struct {
	sleep time.Duration
	code  codes.Code
	msgs  int
}

func parse(service string) behaviour {
	b := behaviour{msgs: 3}
	for _, w := range strings.Split(service, "/") {
		k, v, _ := strings.Cut(w, "=")
		switch k {
		case "sleep":
			ms, _ := strconv.Atoi(v)
			b.sleep = time.Duration(ms) * time.Millisecond
		case "notfound":
			b.code = codes.NotFound
		case "denied":
			b.code = codes.PermissionDenied
		case "msgs":
			b.msgs, _ = strconv.Atoi(v)
		}
	}
	return b
}

// Check answers SERVING, or the error the service name asks for.
func (h Health) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if h.OnCall != nil {
		h.OnCall(ctx, req.Service)
	}
	b := parse(req.Service)
	time.Sleep(b.sleep)
	if b.code != codes.OK {
		return nil, status.Error(b.code, req.Service)
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

// Watch sends msgs messages, sleeping before each, then ends with the
// status the service name asks for.
func (h Health) Watch(req *healthpb.HealthCheckRequest, s healthpb.Health_WatchServer) error {
	if h.OnCall != nil {
		h.OnCall(s.Context(), req.Service)
	}
	b := parse(req.Service)
	for range b.msgs {
		time.Sleep(b.sleep)
		if err := s.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}); err != nil {
			return err
		}
	}
	if b.code != codes.OK {
		return status.Error(b.code, req.Service)
	}
	return nil
}

// NewServer returns a grpc-go server with h registered.
func NewServer(h Health) *grpc.Server {
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, h)
	return s
}

// Result is what the client writes for each call, as a JSON line.
type Result struct {
	Call    string     `json:"call"`
	Code    codes.Code `json:"code"`
	Message string     `json:"message,omitempty"`
	Msgs    int        `json:"msgs,omitempty"`
}

// Run connects to addr and makes the calls, writing a Result per call to
// out. A call is "check=SERVICE" or "watch=SERVICE" (a server-streaming
// call, read to its end), optionally prefixed with "tp=TRACEPARENT," (the
// call's "traceparent" metadata), or "parallel=N:TEMPLATE", N checks at
// once of TEMPLATE with "{i}" replaced by the call's index.
func Run(ctx context.Context, addr string, calls []string, out io.Writer) error {
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	c := healthpb.NewHealthClient(cc)
	var mu sync.Mutex
	enc := json.NewEncoder(out)
	emit := func(r Result) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(r)
	}
	for _, call := range calls {
		if n, tmpl, ok := strings.Cut(strings.TrimPrefix(call, "parallel="), ":"); ok && strings.HasPrefix(call, "parallel=") {
			k, err := strconv.Atoi(n)
			if err != nil {
				return fmt.Errorf("call %q: %w", call, err)
			}
			var wg sync.WaitGroup
			for i := range k {
				wg.Go(func() { emit(one(ctx, c, strings.ReplaceAll(tmpl, "{i}", strconv.Itoa(i)))) })
			}
			wg.Wait()
			continue
		}
		emit(one(ctx, c, call))
	}
	return nil
}

func one(ctx context.Context, c healthpb.HealthClient, call string) Result {
	r := Result{Call: call}
	if tp, rest, ok := strings.Cut(call, ","); ok && strings.HasPrefix(tp, "tp=") {
		ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", strings.TrimPrefix(tp, "tp="))
		call = rest
	}
	kind, svc, _ := strings.Cut(call, "=")
	var err error
	switch kind {
	case "check":
		_, err = c.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	case "watch":
		var s healthpb.Health_WatchClient
		if s, err = c.Watch(ctx, &healthpb.HealthCheckRequest{Service: svc}); err == nil {
			for {
				if _, err = s.Recv(); err != nil {
					break
				}
				r.Msgs++
			}
			if err == io.EOF {
				err = nil
			}
		}
	default:
		err = status.Errorf(codes.InvalidArgument, "unknown call %q", call)
	}
	st := status.Convert(err)
	r.Code, r.Message = st.Code(), st.Message()
	return r
}
