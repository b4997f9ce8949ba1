//go:build linux && amd64

package sql

import (
	"database/sql/driver"
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/flowmill/flowmill/internal/bpfload"
	"github.com/flowmill/flowmill/internal/goexe"
	"github.com/flowmill/flowmill/internal/goprobe"
	"github.com/flowmill/flowmill/internal/gotype"
	"github.com/flowmill/flowmill/internal/probe"
)

// Values of sql_event.kind and .flags (bpf/sql.c).
const (
	kindQuery     = 1
	kindExec      = 2
	kindStmtQuery = 3
	kindStmtExec  = 4

	flagParentCtx    = 1 << 0
	flagParentG      = 1 << 1
	flagSampled      = 1 << 2
	flagRemoteParent = 1 << 3
	flagQueryRO      = 1 << 4 // query holds the address of a read-only string
	flagQueryUnread  = 1 << 5
)

// maxROQuery bounds the text taken in place from the executable's
// read-only data.
const maxROQuery = 64 << 10

// Counter slots (bpf/include/flowmill.h, bpf/sql.c).
const (
	ctrLost = iota
	ctrStmtsAdd
	ctrStmtsDel
	ctrPreempted
	ctrFull      // a statement not traced: stmts refused its entry
	ctrOrphan    // a return without its entry
	ctrDiscarded // a record dropped at the return
	nCounters
)

// Attach finds the probed functions in the program's own executable,
// computes the field offsets from its types, loads the eBPF programs and
// attaches the uprobes. It is called by flowmill.Start.
func (p *Probe) Attach(env *probe.Env) (probe.Attachment, error) {
	self := os.Getpid()
	if env.Scope.Kind == probe.ScopeProcess && env.Scope.PID != uint32(self) {
		return nil, fmt.Errorf("sql: the database/sql probe instruments the calling process only (pid %d), not pid %d: start flowmill inside the service", self, env.Scope.PID)
	}
	lay, err := programLayout()
	if err != nil {
		return nil, fmt.Errorf("sql: %w: reading database/sql's layout in this program: %w", probe.ErrMissingHook, err)
	}
	goidOff, err := goexe.GoroutineIDOffset()
	if err != nil {
		goidOff = ^uint64(0)
	}
	targets, status, err := findTargets("/proc/self/exe")
	if err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	spec, err := loadSqlBPF()
	if err != nil {
		return nil, fmt.Errorf("sql: loading the embedded eBPF object: %w", err)
	}
	if err := bpfload.Configure(spec, env); err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	spec.Maps["stmts"].MaxEntries = p.maxInFlight
	off := sqlBPFSqlOffsets{
		Goid: goidOff, DcCi: lay.dcCI, StmtQuery: lay.stmtQuery, StmtCss: lay.stmtCSS,
		StmtCgds: lay.stmtCgds, CsDc: lay.csDC, DsLocker: lay.dsLocker,
	}
	// Without the read-only range every text is copied, and a text in a
	// page not yet faulted in is missing (counted as incomplete).
	if lo, hi, err := goexe.ReadOnlyRange(); err == nil {
		off.RoLo, off.RoHi = lo, hi
	}
	// The served requests, from the HTTP family if it attached before.
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{}}
	if root, walk, ok := goprobe.ShareHTTPServers(env.Bus, spec, opts, true); ok {
		off.CtxRoot = root
		if walk {
			off.CtxWalk = 1
		}
		status.Parenting = true
	} else {
		status.Skipped = append(status.Skipped, "parenting: no HTTP family (probes/http) attached before this one: statements start traces of their own")
	}
	if err := spec.Variables["off"].Set(off); err != nil {
		return nil, fmt.Errorf("sql: setting field offsets: %w", err)
	}
	floor, err := bpfload.EvictionFloor(p.maxInFlight)
	if err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	a := &attachment{
		boot:       env.BootTime,
		stmts:      probe.Produce[Statement](env.Bus),
		staleAfter: p.staleAfter,
		evictFloor: floor,
		stop:       make(chan struct{}),
		roLo:       off.RoLo,
		roHi:       off.RoHi,
	}
	var e error = errString("")
	a.errTypes = gotype.New(unsafe.Pointer(&e))
	var c driver.Conn = nopConn{}
	a.connTypes = gotype.New(unsafe.Pointer(&c))
	if err := bpfload.LoadWith(spec, env, &a.objs, opts, func() *ebpf.Map { return a.objs.ScopeCgroup }); err != nil {
		return nil, fmt.Errorf("sql: %w", err)
	}
	ex, err := link.OpenExecutable("/proc/self/exe")
	if err != nil {
		a.Close()
		return nil, fmt.Errorf("sql: opening the program's executable: %w", err)
	}
	progs := map[string][2]*ebpf.Program{
		queryFunc:     {a.objs.QueryEnter, a.objs.RetBx},
		execFunc:      {a.objs.ExecEnter, a.objs.RetCx},
		stmtQueryFunc: {a.objs.StmtQueryEnter, a.objs.RetBx},
		stmtExecFunc:  {a.objs.StmtExecEnter, a.objs.RetCx},
	}
	// Returns first: an entry whose return is not yet probed would leave
	// an entry behind.
	for _, t := range targets {
		for _, r := range t.probes.Returns {
			if err := a.uprobe(ex, t.fn, r, progs[t.fn.Name][1], self); err != nil {
				a.Close()
				return nil, err
			}
		}
	}
	for _, t := range targets {
		if err := a.uprobe(ex, t.fn, t.probes.Entry, progs[t.fn.Name][0], self); err != nil {
			a.Close()
			return nil, err
		}
	}
	p.mu.Lock()
	p.status = status
	p.mu.Unlock()
	a.wg.Go(a.sweep)
	return a, nil
}

type errString string

func (e errString) Error() string { return string(e) }

// nopConn gives the itab of driver.Conn, the interface whose itabs name
// drivers' connections.
type nopConn struct{}

func (nopConn) Prepare(string) (driver.Stmt, error) { return nil, driver.ErrSkip }
func (nopConn) Close() error                        { return nil }
func (nopConn) Begin() (driver.Tx, error)           { return nil, driver.ErrSkip }

type target struct {
	fn     goexe.Func
	probes goexe.Probes
}

// findTargets locates the probed functions. One the linker left out is
// reported in the Status; one present but impossible to analyse is an
// error.
func findTargets(path string) ([]target, Status, error) {
	var st Status
	exe, err := goexe.Open(path)
	if err != nil {
		return nil, st, err
	}
	defer exe.Close()
	var out []target
	for _, name := range []string{queryFunc, execFunc, stmtQueryFunc, stmtExecFunc} {
		fn, ok, err := exe.Lookup(name)
		if err != nil {
			return nil, st, err
		}
		if !ok {
			st.Skipped = append(st.Skipped, name+": not in the program (never called), not instrumented")
			continue
		}
		code, err := exe.Code(fn)
		if err != nil {
			return nil, st, err
		}
		pr, err := goexe.Analyze(code)
		if err != nil {
			return nil, st, fmt.Errorf("%w: disassembling %s: %v", probe.ErrMissingHook, name, err)
		}
		out = append(out, target{fn, pr})
		switch name {
		case queryFunc:
			st.Query = true
		case execFunc:
			st.Exec = true
		case stmtQueryFunc:
			st.StmtQuery = true
		case stmtExecFunc:
			st.StmtExec = true
		}
	}
	return out, st, nil
}

type attachment struct {
	objs  sqlBPFObjects
	links []link.Link
	boot  func(uint64) time.Time
	stmts *probe.Topic[Statement]

	ev        sqlBPFSqlEvent // scratch: records need not be aligned
	errTypes  *gotype.Names
	connTypes *gotype.Names
	texts     texts

	malformed, incomplete atomic.Uint64

	roLo, roHi uint64 // the executable's read-only mappings (off.ro_lo, ro_hi)

	staleAfter time.Duration
	stop       chan struct{}

	statsMu    sync.Mutex
	swept      uint64
	evicted    uint64
	evictFloor int64
	wg         sync.WaitGroup
	closeOnce  sync.Once
	closeErr   error
}

func (a *attachment) uprobe(ex *link.Executable, fn goexe.Func, at uint64, prog *ebpf.Program, pid int) error {
	l, err := goprobe.Attach(ex, fn, at, prog, pid)
	if err != nil {
		return fmt.Errorf("sql: %w", err)
	}
	a.links = append(a.links, l)
	return nil
}

func (a *attachment) Rings() []probe.Ring {
	return []probe.Ring{{Map: a.objs.Events, Handle: a.handle}}
}

const eventSize = int(unsafe.Sizeof(sqlBPFSqlEvent{}))

// handle decodes one record and publishes it. The statement's text is
// sanitized here, before anything else sees it.
func (a *attachment) handle(raw []byte) {
	if len(raw) < eventSize {
		a.malformed.Add(1)
		return
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&a.ev)), eventSize), raw)
	e := &a.ev
	if e.Kind < kindQuery || e.Kind > kindStmtExec {
		a.malformed.Add(1)
		return
	}
	if !a.stmts.Active() {
		return
	}
	driverType, ok := a.connTypes.Name(e.ConnItab)
	if !ok {
		driverType = ""
		a.incomplete.Add(1)
	}
	system := systemOf(driverType)
	errType, ok := a.errTypes.Name(e.ErrItab)
	if !ok {
		errType = errTypeOther
		a.incomplete.Add(1)
	}
	text, truncated, ok := a.text(e)
	if !ok {
		a.malformed.Add(1)
		return
	}
	if e.Flags&flagQueryUnread != 0 {
		a.incomplete.Add(1)
	}
	sz := a.texts.get(text, system == "mysql")
	s := Statement{
		Start:      a.boot(e.StartNs),
		End:        a.boot(e.EndNs),
		Query:      sz.Text,
		Truncated:  truncated,
		Operation:  sz.Operation,
		Collection: sz.Collection,
		System:     system,
		Driver:     driverType,
		Error:      errType,
		Prepared:   e.Kind == kindStmtQuery || e.Kind == kindStmtExec,
		Goroutine:  e.Goid,
		PID:        e.Pid,
		TID:        e.Tid,
	}
	s.Span.TraceID = e.TraceId
	binary.BigEndian.PutUint64(s.Span.SpanID[:], e.SpanId)
	if e.ParentSpanId != 0 {
		binary.BigEndian.PutUint64(s.Span.ParentSpanID[:], e.ParentSpanId)
	}
	s.Span.RemoteParent = e.Flags&flagRemoteParent != 0
	s.Span.Sampled = e.Flags&flagSampled != 0
	switch {
	case e.Flags&flagParentCtx != 0:
		s.Parent = ParentByContext
	case e.Flags&flagParentG != 0:
		s.Parent = ParentByGoroutine
	}
	a.stmts.Publish(&s)
}

const errTypeOther = "_OTHER"

// text returns the statement's raw text: the bytes of the record, or,
// with flagQueryRO, the string in the executable's read-only data whose
// address the kernel side put in their place (immutable for the life of
// the process: read in place). An address outside those mappings cannot
// come from our programs: false.
func (a *attachment) text(e *sqlBPFSqlEvent) (b []byte, truncated, ok bool) {
	if e.Flags&flagQueryRO == 0 {
		n := min(int(e.QueryLen), len(e.Query))
		return unsafe.Slice((*byte)(unsafe.Pointer(&e.Query[0])), n), int(e.QueryLen) > n, true
	}
	n := uint64(min(e.QueryLen, maxROQuery))
	addr := binary.LittleEndian.Uint64(unsafe.Slice((*byte)(unsafe.Pointer(&e.Query[0])), 8))
	if a.roLo == 0 || addr < a.roLo || addr+n > a.roHi || addr+n < addr {
		return nil, false, false
	}
	p := *(*unsafe.Pointer)(unsafe.Pointer(&addr))
	return unsafe.Slice((*byte)(p), n), uint64(e.QueryLen) > n, true
}

// texts caches the sanitized form of statement texts (programs run the
// same statements again and again), by dialect (MySQL's or standard),
// bounded; used from the ring's goroutine only. A lookup does not
// allocate.
type texts struct{ m [2]map[string]Sanitized }

func (t *texts) get(raw []byte, mysql bool) Sanitized {
	d := 0
	if mysql {
		d = 1
	}
	if s, ok := t.m[d][string(raw)]; ok {
		return s
	}
	if t.m[d] == nil || len(t.m[d]) >= 4096 {
		t.m[d] = make(map[string]Sanitized)
	}
	q := string(raw)
	s := sanitize(q, mysql)
	t.m[d][q] = s
	return s
}

// sweep drops in-flight entries older than staleAfter: statements whose
// RET never came (a panic in a driver).
func (a *attachment) sweep() { goprobe.Sweep(a.stop, a.staleAfter, a.sweepOnce) }

func (a *attachment) sweepOnce(cutoff uint64) {
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	a.swept += goprobe.DeleteStale(a.objs.Stmts, func(v *sqlBPFSqlEvent) bool { return v.StartNs < cutoff })
}

// Stats reports the statements not traced: lost in the kernel (ring full,
// or an entry overtaken on its CPU), in-flight entries swept as stale or
// evicted by the LRU (more statements in flight than WithMaxInFlight),
// records that did not decode, and statements whose driver or error type
// could not be named (incomplete).
func (a *attachment) Stats() (probe.Stats, error) {
	before, err := bpfload.Counters(a.objs.Counters, nCounters)
	if err != nil {
		return probe.Stats{}, err
	}
	a.statsMu.Lock()
	defer a.statsMu.Unlock()
	inFlight := int64(before[ctrStmtsAdd]) - int64(before[ctrStmtsDel]) - int64(a.swept) - int64(a.evicted)
	if inFlight >= a.evictFloor {
		live, err := bpfload.CountKeys(a.objs.Stmts)
		if err != nil {
			return probe.Stats{}, err
		}
		after, err := bpfload.Counters(a.objs.Counters, nCounters)
		if err != nil {
			return probe.Stats{}, err
		}
		if n := int64(before[ctrStmtsAdd]) - int64(after[ctrStmtsDel]) - int64(a.swept) - live; n > int64(a.evicted) {
			a.evicted = uint64(n)
		}
	}
	return probe.Stats{
		Lost:       lost(before),
		Evicted:    a.swept + a.evicted,
		Missed:     bpfload.Missed(&a.objs.sqlBPFPrograms),
		Malformed:  a.malformed.Load(),
		Incomplete: a.incomplete.Load(),
	}, nil
}

// lost is the statements not traced, from the kernel's counters: records
// the ring had no room for or dropped at the return, and returns that
// found no entry — which covers the entries overtaken on their CPU or
// refused by a full table (counted apart, and not added again), as well
// as any entry that vanished otherwise. (An entry swept as stale whose
// statement returns later counts in Evicted and here.)
func lost(c []uint64) uint64 {
	return c[ctrLost] + c[ctrDiscarded] + max(c[ctrOrphan], c[ctrPreempted]+c[ctrFull])
}

func (a *attachment) Close() error {
	a.closeOnce.Do(func() {
		close(a.stop)
		a.wg.Wait()
		a.closeErr = bpfload.CloseLinks(a.links)
		// The HTTP family's maps, when shared, are clones
		// (MapReplacements): closing them leaves the family's own.
		if err := a.objs.Close(); a.closeErr == nil {
			a.closeErr = err
		}
		for _, n := range []*gotype.Names{a.errTypes, a.connTypes} {
			if err := n.Close(); a.closeErr == nil {
				a.closeErr = err
			}
		}
	})
	return a.closeErr
}
