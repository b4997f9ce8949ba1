// Package flowmill lets a Go service observe itself — and, if asked, its
// whole host — with eBPF, and hands what it sees to Go code as typed events.
//
// A session loads the bundled eBPF objects (compiled ahead of time and
// embedded: no clang, no kernel headers at run time), attaches them to stable
// kernel hooks, and reads their events:
//
//	s, err := flowmill.Start(ctx, flowmill.WithProbes(tcp.New()))
//	if err != nil {
//		return err // errors.Is(err, flowmill.ErrPermission), ErrNoBTF, ...
//	}
//	defer s.Close()
//
//	closed, _ := flowmill.Subscribe[tcp.ConnClosed](s)
//	for c := range closed.Events() {
//		fmt.Println(c.Remote, c.BytesSent, c.BytesReceived, c.SRTT)
//	}
//
// # Probe families
//
// Each family is a package under probes/, selected with WithProbes:
//
//   - probes/tcp: TCP connections, client and server, IPv4 and IPv6
//     (ConnOpened, ConnStats, ConnClosed), with exact byte counts, segments,
//     retransmissions, resets and RTTs from the kernel's own accounting.
//   - probes/process: Fork, Exec and Exit of the observed processes.
//   - probes/syscalls: per-process system call counts, aggregated in the
//     kernel, and the seccomp profile of what was seen.
//   - probes/http: spans for the HTTP requests the program itself serves
//     and sends with net/http (HTTP/1.x and HTTP/2, plain text or TLS),
//     from uprobes on its own executable, and W3C
//     trace context added to the plain-text HTTP/1 requests it sends (by
//     socket programs: no write to the program's memory, so it works
//     under kernel lockdown).
//   - probes/grpc: server spans for the RPCs the program serves with
//     google.golang.org/grpc (unary and streaming), children of the
//     caller's span when the RPC's metadata carries a W3C traceparent,
//     and client spans for the RPCs it makes (Invoke and streams),
//     children of the served RPC whose context they use, from uprobes on
//     its own executable. No trace context is sent (see its Status).
//   - probes/sql: a client span and db.client.operation.duration for every
//     statement the program runs through database/sql, whatever the
//     driver, with its literals replaced by placeholders, children of the
//     served HTTP request they run for (list probes/http first).
//
// Families never import each other; where one needs another's knowledge
// (an HTTP span's TCP round-trip time) it asks through a service on the
// session, never by importing each other.
//
// # OpenTelemetry
//
// NewExporter records a session's events with the OpenTelemetry API —
// metrics with semantic-convention names, spans with the kernel's
// timestamps, log records for discrete events — using the global providers
// unless given others, so a service that already configured OpenTelemetry
// needs two lines:
//
//	s, err := flowmill.Start(ctx, flowmill.WithProbes(tcp.New()))
//	...
//	exp, err := flowmill.NewExporter(s)
//	defer exp.Shutdown(context.Background())
//
// Package otelviews holds the views that make flowmill's histograms base-2
// exponential histograms in the SDK. IDGenerator, given to the SDK's
// TracerProvider, makes the exported spans carry the IDs flowmill sent
// downstream in traceparent, so that traces join up across services.
//
// # Scope
//
// By default a session observes the calling process only (all its threads).
// WithHostScope widens it to every process, WithCgroupScope narrows it to a
// cgroup. Filtering happens in the kernel: other processes' activity costs
// no ring-buffer space and no user-space work.
//
// # Delivery and losses
//
// Each probe family writes fixed-layout records to a kernel ring buffer. The
// kernel wakes the reader only when 64 KiB are waiting; otherwise the session
// drains the buffer on a timer (WithMaxLatency, 50ms by default), because a
// wake-up costs far more than the record. Records are decoded without
// allocation and fanned out to subscriptions by type.
//
// Delivery never blocks the reader: a Subscription whose channel is full
// misses the event and counts it (Subscription.Dropped). Every other loss is
// counted too, in Session.Stats and the exporter's health metrics: records
// the kernel dropped because a ring buffer was full, entries evicted from
// bounded kernel maps, records that could not be decoded, and the rest (see
// Stats).
//
// Start is New followed by Session.Start. To receive every event from the
// first one, subscribe in between:
//
//	s, err := flowmill.New(flowmill.WithProbes(tcp.New()))
//	...
//	opened, _ := flowmill.Subscribe[tcp.ConnOpened](s)
//	exp, _ := flowmill.NewExporter(s)
//	err = s.Start(ctx)
//
// # Time
//
// Kernel timestamps (CLOCK_MONOTONIC) are converted to wall-clock time with
// one offset measured when the session starts.
//
// # Requirements
//
// Linux 5.10 or later with BTF (/sys/kernel/btf/vmlinux), and root or
// CAP_BPF with CAP_PERFMON. Every probe family's test suite runs on Linux
// 5.10, 6.1, 6.12 and 7.3 (Debian's kernels, under QEMU) and on the
// development machine's 6.18; the README's kernel table says what each
// family needs. The HTTP probe needs amd64 and Go 1.26 or 1.27. Start returns
// an error wrapping ErrPermission, ErrNoBTF, ErrMissingHook or
// ErrNotSupported, saying what is missing and what to do, when a requirement
// is not met, and ErrInvalidOption naming the option when one has a value
// it does not accept; a program the kernel's verifier rejects is ErrNotSupported
// with the kernel release and the verifier's last lines.
package flowmill
