//go:build linux && amd64

package http

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/cgroupfs"
)

// propagation is the socket side of trace context propagation
// (bpf/propagate.c): a raw tracepoint that follows this process's
// outgoing TCP connections, a sock_ops program on its cgroup that puts
// them in a sockhash, and the sk_msg program on that sockhash that inserts
// the header. It is loaded and attached before the uprobes and apart from
// them: a kernel or cgroup set-up that refuses it leaves the spans
// working, with propagation reported as unavailable.
type propagation struct {
	objs  propagationObjects
	links []link.Link
	skmsg bool // inject_msg is attached to the sockhash
}

// propagationObjects are the parts of propagate.c used here; the maps
// shared with http.c (clients, socks, inject, tracestates) are handed to
// it as replacements.
type propagationObjects struct {
	TrackState  *ebpf.Program `ebpf:"track_state"`
	TrackSock   *ebpf.Program `ebpf:"track_sock"`
	InjectMsg   *ebpf.Program `ebpf:"inject_msg"`
	Sockhash    *ebpf.Map     `ebpf:"sockhash"`
	Wanted      *ebpf.Map     `ebpf:"wanted"`
	Socks       *ebpf.Map     `ebpf:"socks"`
	Inject      *ebpf.Map     `ebpf:"inject"`
	Tracestates *ebpf.Map     `ebpf:"tracestates"`
	Clients     *ebpf.Map     `ebpf:"clients"`
	Counters    *ebpf.Map     `ebpf:"counters"`
}

func (o *propagationObjects) Close() error {
	var errs []error
	for _, c := range []interface{ Close() error }{o.TrackState, o.TrackSock, o.InjectMsg,
		o.Sockhash, o.Wanted, o.Socks, o.Inject, o.Tracestates, o.Clients, o.Counters} {
		switch v := c.(type) {
		case *ebpf.Program:
			if v != nil {
				errs = append(errs, v.Close())
			}
		case *ebpf.Map:
			if v != nil {
				errs = append(errs, v.Close())
			}
		}
	}
	return errors.Join(errs...)
}

// Counter slots of propagate.c's own counters map (bpf/propagate.c).
const (
	pctrInjected = iota + 1
	pctrPresent
	pctrTooLarge
	pctrNotHTTP1
	pctrFailed
	pctrPreempted
	pctrTSMissing
	pctrSockhashFailed
	pctrForeign
	pctrTracked
	nPCounters
)

// mapSizes are the sizes of the maps the two objects share, which must be
// equal in both specs.
type mapSizes struct {
	clients, socks, inject, tracestates uint32
}

func sizesFor(maxInFlight uint32) mapSizes {
	return mapSizes{clients: maxInFlight, socks: maxInFlight, inject: maxInFlight, tracestates: min(maxInFlight, 2048)}
}

func (s mapSizes) apply(spec *ebpf.CollectionSpec) {
	for name, n := range map[string]uint32{"clients": s.clients, "socks": s.socks, "inject": s.inject,
		"tracestates": s.tracestates, "sockhash": s.socks} {
		if m, ok := spec.Maps[name]; ok {
			m.MaxEntries = n
		}
	}
}

// testHookCgroup, when set (by tests), replaces the cgroup the sock_ops
// program is attached to.
var testHookCgroup string

// attachPropagation loads propagate.c and attaches it: the sk_msg program
// to the sockhash first (a socket added before it would never run it),
// then the tracepoint, then sock_ops on the process's cgroup v2.
func attachPropagation(sizes mapSizes) (_ *propagation, err error) {
	spec, err := loadPropagateBPF()
	if err != nil {
		return nil, fmt.Errorf("loading the embedded eBPF object: %w", err)
	}
	if err := spec.Variables["self_tgid"].Set(uint32(os.Getpid())); err != nil {
		return nil, err
	}
	sizes.apply(spec)
	cg := testHookCgroup
	if cg == "" {
		if cg, err = cgroupfs.Dir(os.Getpid()); err != nil {
			return nil, fmt.Errorf("finding the process's cgroup v2 (sock_ops programs attach to one): %w", err)
		}
	}
	pr := &propagation{}
	defer func() {
		if err != nil {
			pr.close()
		}
	}()
	if err := spec.LoadAndAssign(&pr.objs, nil); err != nil {
		return nil, bpfload.Explain(err)
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: pr.objs.Sockhash.FD(), Program: pr.objs.InjectMsg, Attach: ebpf.AttachSkMsgVerdict,
	}); err != nil {
		return nil, fmt.Errorf("attaching the sk_msg program to its sockhash: %w", bpfload.Explain(err))
	}
	pr.skmsg = true
	tps, err := bpfload.AttachRawTracepoints(bpfload.RawTracepoint{Name: "inet_sock_set_state", Program: pr.objs.TrackState})
	if err != nil {
		return nil, err
	}
	pr.links = append(pr.links, tps...)
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupSockOps, Program: pr.objs.TrackSock})
	if err != nil {
		return nil, fmt.Errorf("attaching the sock_ops program to cgroup %s: %w", cg, bpfload.Explain(err))
	}
	pr.links = append(pr.links, l)
	return pr, nil
}

// replacements are the maps http.c shares with propagate.c.
func (pr *propagation) replacements() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"clients":     pr.objs.Clients,
		"socks":       pr.objs.Socks,
		"inject":      pr.objs.Inject,
		"tracestates": pr.objs.Tracestates,
	}
}

// close detaches sock_ops first (no connection is added any more), then
// the tracepoint and sk_msg, and closes the objects: the sockhash, once
// no program holds it, is freed, and the kernel releases its sockets.
func (pr *propagation) close() error {
	var errs []error
	for i := len(pr.links) - 1; i >= 0; i-- {
		errs = append(errs, pr.links[i].Close())
	}
	pr.links = nil
	if pr.skmsg {
		errs = append(errs, link.RawDetachProgram(link.RawDetachProgramOptions{
			Target: pr.objs.Sockhash.FD(), Program: pr.objs.InjectMsg, Attach: ebpf.AttachSkMsgVerdict,
		}))
		pr.skmsg = false
	}
	errs = append(errs, pr.objs.Close())
	return errors.Join(errs...)
}

func (pr *propagation) counters() ([]uint64, error) {
	return bpfload.Counters(pr.objs.Counters, nPCounters)
}
