package syscalls

import (
	"runtime"
	"sort"
)

// Profile is a seccomp profile in the JSON format of the OCI runtime
// specification's linux.seccomp, which Docker (--security-opt
// seccomp=FILE), Podman, containerd and Kubernetes (localhost profiles)
// accept. Marshal it with encoding/json.
type Profile struct {
	// DefaultAction applies to every system call no rule matches.
	DefaultAction string `json:"defaultAction"`
	// Architectures lists the system call tables the rules apply to;
	// empty means the runtime's native one.
	Architectures []string `json:"architectures,omitempty"`
	// Syscalls are the rules.
	Syscalls []Rule `json:"syscalls"`
}

// Rule applies Action to the system calls in Names.
type Rule struct {
	Names  []string `json:"names"`
	Action string   `json:"action"`
}

// SeccompProfile returns the profile that allows exactly the system calls
// in used with a nonzero count and makes every other one fail with an
// error (SCMP_ACT_ERRNO, EPERM by default), as Inspektor Gadget's seccomp
// advisor does. Pass Probe.Totals for everything observed, or one
// process's Counts.Syscalls.
//
// The profile is only as complete as the observation: run the workload
// through all its paths (start-up, shutdown, error handling) while
// observing. Only native x86-64 calls are observed, so the profile lists
// only that architecture. Numbers without a name in the table cannot be
// written in a profile; they are returned in unnamed.
func SeccompProfile(used []Count) (p Profile, unnamed []Syscall) {
	p = Profile{
		DefaultAction: "SCMP_ACT_ERRNO",
		Architectures: archNames(),
		Syscalls:      []Rule{{Names: []string{}, Action: "SCMP_ACT_ALLOW"}},
	}
	seen := make(map[string]bool, len(used))
	for _, c := range used {
		if c.N == 0 {
			continue
		}
		n, ok := c.Syscall.Name()
		switch {
		case !ok:
			unnamed = append(unnamed, c.Syscall)
		case !seen[n]:
			seen[n] = true
			p.Syscalls[0].Names = append(p.Syscalls[0].Names, n)
		}
	}
	sort.Strings(p.Syscalls[0].Names)
	return p, unnamed
}

// archNames names the architecture whose calls are counted, as the OCI
// specification spells it; nil (native) when it has no name there.
func archNames() []string {
	switch runtime.GOARCH {
	case "amd64":
		return []string{"SCMP_ARCH_X86_64"}
	case "arm64":
		return []string{"SCMP_ARCH_AARCH64"}
	}
	return nil
}
