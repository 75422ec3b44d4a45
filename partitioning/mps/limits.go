package mps

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// MaxClients is how many client CUDA contexts one MPS server serves per GPU on Volta and later
// GPUs (16 before Volta), as NVIDIA's MPS documentation gives it.
const MaxClients = 48

// Limits cap what MPS clients use of one GPU. A zero field means no limit.
//
// As a daemon's limits (Config.Limits, Daemon.SetLimits) they are server-side: the control daemon
// applies them to every client of every MPS server it starts, and nothing inside a container lifts
// them. As one client's limits (AddClient, ClientEnv, a Split's parts) they reach the client as
// CUDA_MPS_* environment variables, which only ever lower the daemon's limits: that part is
// cooperative.
type Limits struct {
	// ActiveThreadPercentage caps the share of the GPU's threads (and so SMs) a client's contexts
	// may use, 1 to 100. It is a cap, not a reservation: clients' percentages may add up to more
	// than 100.
	ActiveThreadPercentage int `json:"activeThreadPercentage,omitempty"`
	// PinnedMemoryMiB caps the device memory a client may allocate, CUDA's own allocations
	// included.
	PinnedMemoryMiB uint64 `json:"pinnedMemoryMiB,omitempty"`
}

// IsZero reports whether l limits nothing.
func (l Limits) IsZero() bool { return l == Limits{} }

func (l Limits) String() string {
	if l.IsZero() {
		return "no limits"
	}
	var parts []string
	if l.ActiveThreadPercentage > 0 {
		parts = append(parts, fmt.Sprintf("%d%% of threads", l.ActiveThreadPercentage))
	}
	if l.PinnedMemoryMiB > 0 {
		parts = append(parts, fmt.Sprintf("%d MiB", l.PinnedMemoryMiB))
	}
	return strings.Join(parts, ", ")
}

// validate checks l for a GPU; field names l in errors (e.g. "limits", "split[1]").
func (l Limits) validate(field string, g nvmlib.GPU) error {
	var errs []error
	if p := l.ActiveThreadPercentage; p < 0 || p > 100 {
		errs = append(errs, fmt.Errorf("%s.activeThreadPercentage: %d is not a percentage: use 1 to 100, or 0 for no limit", field, p))
	}
	if m := l.PinnedMemoryMiB; g.MemoryMiB > 0 && m > g.MemoryMiB {
		errs = append(errs, fmt.Errorf("%s.pinnedMemoryMiB: %d MiB is more than %s has (%d MiB): lower it, or use 0 for no limit", field, m, gpuName(g), g.MemoryMiB))
	}
	if !l.IsZero() && !volta(g) {
		errs = append(errs, fmt.Errorf("%s: %s has compute capability %s; MPS thread and memory limits need Volta or newer (7.0+): remove the limits or use another GPU", field, gpuName(g), g.ComputeCapability))
	}
	return errors.Join(errs...)
}

// SplitPart is Count clients with the same limits.
type SplitPart struct {
	// Count is how many clients get these limits; 0 means 1.
	Count  int `json:"count,omitempty"`
	Limits `json:",inline"`
}

// Split divides one GPU among MPS clients, equally or not: for example two clients of 20 GiB and
// 30% of the threads plus four of 10 GiB and 10%:
//
//	mps.Split{{Count: 2, Limits: mps.Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 << 10}},
//		{Count: 4, Limits: mps.Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 10 << 10}}}
//
// The daemon enforces the Ceiling for every client (server-side); each client's own, lower limits
// are cooperative (see Enforce).
type Split []SplitPart

// EqualSplit divides a GPU of memoryMiB equally among n clients: 100/n percent of the threads and
// memoryMiB/n of memory each. Every limit is then the ceiling, so all of it is server-side.
func EqualSplit(n int, memoryMiB uint64) Split {
	if n <= 0 {
		return nil
	}
	return Split{{Count: n, Limits: Limits{ActiveThreadPercentage: max(1, 100/n), PinnedMemoryMiB: memoryMiB / uint64(n)}}}
}

// Clients lists the limits of every client slot, in order.
func (s Split) Clients() []Limits {
	var out []Limits
	for _, p := range s {
		for range max(1, p.Count) {
			out = append(out, p.Limits)
		}
	}
	return out
}

// Ceiling is the largest limit of any client, per field: what the daemon enforces for all of them.
// A client without a limit of its own leaves that field unlimited.
func (s Split) Ceiling() Limits {
	var c Limits
	unlimitedThreads, unlimitedMemory := false, false
	for _, l := range s.Clients() {
		if l.ActiveThreadPercentage == 0 {
			unlimitedThreads = true
		}
		if l.PinnedMemoryMiB == 0 {
			unlimitedMemory = true
		}
		c.ActiveThreadPercentage = max(c.ActiveThreadPercentage, l.ActiveThreadPercentage)
		c.PinnedMemoryMiB = max(c.PinnedMemoryMiB, l.PinnedMemoryMiB)
	}
	if unlimitedThreads {
		c.ActiveThreadPercentage = 0
	}
	if unlimitedMemory {
		c.PinnedMemoryMiB = 0
	}
	return c
}

// Uniform reports whether every client has the ceiling's limits, so that every limit is
// server-side.
func (s Split) Uniform() bool {
	c := s.Ceiling()
	for _, l := range s.Clients() {
		if l != c {
			return false
		}
	}
	return true
}

// Validate checks the split against the GPU it divides: at least one and at most MaxClients
// clients, percentages of 1 to 100, and memory limits that fit the GPU one by one and together.
// Each error names the field (split[i].…) and the fix.
func (s Split) Validate(g nvmlib.GPU) error {
	var errs []error
	if len(s) == 0 {
		return fmt.Errorf("split: no clients: give at least one part, e.g. EqualSplit(2, %d)", g.MemoryMiB)
	}
	n := 0
	var total uint64
	for i, p := range s {
		field := "split[" + strconv.Itoa(i) + "]"
		if p.Count < 0 {
			errs = append(errs, fmt.Errorf("%s.count: %d is negative: use 1 or more (0 means 1)", field, p.Count))
		}
		c := max(1, p.Count)
		n += c
		if err := p.Limits.validate(field, g); err != nil {
			errs = append(errs, err)
		}
		total += uint64(c) * p.PinnedMemoryMiB
	}
	if n > MaxClients {
		errs = append(errs, fmt.Errorf("split: %d clients, an MPS server serves at most %d per GPU: lower the counts", n, MaxClients))
	}
	if g.MemoryMiB > 0 && total > g.MemoryMiB {
		errs = append(errs, fmt.Errorf("split: the clients' memory limits add up to %d MiB, %s has %d MiB: lower the limits or the counts so that they fit", total, gpuName(g), g.MemoryMiB))
	}
	return errors.Join(errs...)
}

// Level is how strongly a limit holds against the container it applies to.
type Level string

// Isolation levels, strongest first.
const (
	// LevelHardware: the GPU partitions the resource (MIG); no software on the node can lift it.
	LevelHardware Level = "hardware"
	// LevelServerSide: enforced outside the container (the MPS control daemon and server, or the
	// driver); a container cannot lift it by anything it does to itself.
	LevelServerSide Level = "server-side"
	// LevelCooperative: enforced only because the container keeps what it was given (an
	// environment variable); a container that drops it escapes up to the server-side limit.
	LevelCooperative Level = "cooperative"
	// LevelNone: nothing limits it.
	LevelNone Level = "none"
)

// Enforcement says how one MPS client's limits hold, given the daemon's limits.
type Enforcement struct {
	// Memory is the level of the client's memory limit.
	Memory Level `json:"memory"`
	// MemoryLimitMiB is the memory limit the client runs with (0: none).
	MemoryLimitMiB uint64 `json:"memoryLimitMiB,omitempty"`
	// MemoryCeilingMiB is what the container reaches if it drops its environment: the daemon's
	// limit (0: the whole GPU).
	MemoryCeilingMiB uint64 `json:"memoryCeilingMiB,omitempty"`
	// Compute is the level of the client's thread limit.
	Compute Level `json:"compute"`
	// ActiveThreadPercentage is the thread limit the client runs with (100: none).
	ActiveThreadPercentage int `json:"activeThreadPercentage"`
	// ThreadCeiling is what the container reaches if it drops its environment (100: none).
	ThreadCeiling int `json:"threadCeiling"`
	// Faults is always LevelNone: a fatal GPU fault of one MPS client is reported to every client
	// of the GPU, which must all exit before the server takes new clients.
	Faults Level `json:"faults"`
}

// Enforce says how a client with limits own holds under a daemon with limits daemon.
func Enforce(daemon, own Limits) Enforcement {
	e := Enforcement{Faults: LevelNone}
	var memLimit, memCeil uint64
	e.Memory, memLimit, memCeil = level(daemon.PinnedMemoryMiB, own.PinnedMemoryMiB)
	e.MemoryLimitMiB, e.MemoryCeilingMiB = memLimit, memCeil
	var thr, thrCeil uint64
	e.Compute, thr, thrCeil = level(uint64(daemon.ActiveThreadPercentage), uint64(own.ActiveThreadPercentage))
	e.ActiveThreadPercentage, e.ThreadCeiling = 100, 100
	if thr > 0 {
		e.ActiveThreadPercentage = int(thr)
	}
	if thrCeil > 0 {
		e.ThreadCeiling = int(thrCeil)
	}
	return e
}

// level rates one limit: ceil is the daemon's (server-side) value, own the client's; 0 is none.
// It returns the level, the limit in force, and the ceiling a container reaches by dropping its own.
func level(ceil, own uint64) (Level, uint64, uint64) {
	switch {
	case own == 0 && ceil == 0:
		return LevelNone, 0, 0
	case ceil > 0 && (own == 0 || own >= ceil):
		return LevelServerSide, ceil, ceil
	default: // 0 < own < ceil, or no ceiling
		return LevelCooperative, own, ceil
	}
}

// gpuName is "GPU 3 (NVIDIA H100 80GB HBM3, GPU-…)" for errors.
func gpuName(g nvmlib.GPU) string {
	if g.UUID == "" && g.ProductName == "" {
		return fmt.Sprintf("GPU %d", g.Index)
	}
	return fmt.Sprintf("GPU %d (%s, %s)", g.Index, g.ProductName, g.UUID)
}

// volta reports whether g is Volta or newer (compute capability 7.0+). An unknown compute
// capability counts as new enough.
func volta(g nvmlib.GPU) bool {
	major, _, ok := computeCapability(g)
	return !ok || major >= 7
}

func computeCapability(g nvmlib.GPU) (major, minor int, ok bool) {
	a, b, found := strings.Cut(g.ComputeCapability, ".")
	if !found {
		return 0, 0, false
	}
	ma, err1 := strconv.Atoi(a)
	mi, err2 := strconv.Atoi(b)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return ma, mi, true
}
