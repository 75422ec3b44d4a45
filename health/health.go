// Package health turns NVML's health events into device health that both front ends serve, and
// — unlike the anchors, whose "unhealthy" is forever — detects recovery by probing the GPU.
//
// Every event is classified by a published table (Policy):
//
//   - Ignore: application errors (XID 13, 31, 43, 45, 68, 109 by default) and corrected ECC errors say
//     nothing about the GPU. Admins add XIDs in the sharing profile.
//   - UntilQuiet: a transient fault. The GPU is unhealthy until no event has arrived for the quiet
//     period and a probe finds the GPU answering NVML.
//   - UntilReset: a fault the driver will not clear on its own (XID 48 double-bit ECC, 79 fallen off
//     the bus, 95 uncontained ECC; an uncorrected-ECC or GPU-lost event). The GPU is unhealthy until a
//     probe observes a reset: the GPU answers NVML and its volatile uncorrected ECC counter, which a
//     reset restarts at zero, is zero.
//
// An event names a GPU and, for some XIDs, one MIG device on it; a GPU-wide fault makes the GPU and
// everything cut from it unhealthy, a MIG-scoped one only that MIG device.
package health

import (
	"context"
	"fmt"
	"maps"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Action is what an event does to a device's health.
type Action string

// Actions.
const (
	Ignore     Action = "ignore"
	UntilQuiet Action = "until-quiet"
	UntilReset Action = "until-reset"
)

// DefaultIgnoredXIDs are application errors: a bad kernel or an out-of-range access by one program.
var DefaultIgnoredXIDs = []uint64{13, 31, 43, 45, 68, 109}

// DefaultResetXIDs are faults that need a GPU reset before the GPU can be trusted again.
var DefaultResetXIDs = api.ResetXIDs

// DefaultQuietPeriod is how long a transient fault must stay quiet before the GPU is healthy again.
const DefaultQuietPeriod = 5 * time.Minute

// Policy classifies events.
type Policy struct {
	Ignored map[uint64]bool
	Reset   map[uint64]bool
	// Critical, when not empty, lists the only XIDs (besides the reset class) that make a device
	// unhealthy; every other XID is ignored (a profile's health.criticalXIDs).
	Critical    map[uint64]bool
	QuietPeriod time.Duration
}

// DefaultPolicy is the published table.
func DefaultPolicy() Policy {
	p := Policy{Ignored: map[uint64]bool{}, Reset: map[uint64]bool{}, QuietPeriod: DefaultQuietPeriod}
	for _, x := range DefaultIgnoredXIDs {
		p.Ignored[x] = true
	}
	for _, x := range DefaultResetXIDs {
		p.Reset[x] = true
	}
	return p
}

// WithIgnored returns the policy with more XIDs ignored. An XID of the reset class cannot be ignored:
// the GPU is unusable after it, whatever the admin wishes.
func (p Policy) WithIgnored(xids ...uint64) (Policy, error) {
	out := Policy{Ignored: map[uint64]bool{}, Reset: p.Reset, Critical: p.Critical, QuietPeriod: p.QuietPeriod}
	for x := range p.Ignored {
		out.Ignored[x] = true
	}
	for _, x := range xids {
		if p.Reset[x] {
			return p, fmt.Errorf("XID %d cannot be ignored: it leaves the GPU unusable until a reset", x)
		}
		out.Ignored[x] = true
	}
	return out, nil
}

// WithCritical returns the policy with only these XIDs (and the reset class, which is always
// critical) making a device unhealthy. No XIDs means every XID not ignored, as by default.
func (p Policy) WithCritical(xids ...uint64) Policy {
	out := p
	out.Critical = nil
	if len(xids) > 0 {
		out.Critical = map[uint64]bool{}
		for _, x := range xids {
			out.Critical[x] = true
		}
	}
	return out
}

// Classify says what an event does.
func (p Policy) Classify(e nvmlib.Event) Action {
	switch e.Type {
	case nvmlib.EventECCSBE:
		return Ignore
	case nvmlib.EventECCDBE, nvmlib.EventGPULost:
		return UntilReset
	case nvmlib.EventXID:
		switch {
		case p.Reset[e.XID]:
			return UntilReset
		case p.Ignored[e.XID]:
			return Ignore
		case len(p.Critical) > 0 && !p.Critical[e.XID]:
			return Ignore
		}
		return UntilQuiet
	}
	return Ignore
}

// Table renders the policy for docs and `--help`.
func (p Policy) Table() string {
	list := func(m map[uint64]bool) string {
		var xs []int
		for x := range m {
			xs = append(xs, int(x))
		}
		sort.Ints(xs)
		var s []string
		for _, x := range xs {
			s = append(s, strconv.Itoa(x))
		}
		return strings.Join(s, ", ")
	}
	return fmt.Sprintf("ignore: XID %s, corrected ECC\nunhealthy until %s quiet: every other XID\nunhealthy until GPU reset: XID %s, uncorrected ECC, GPU lost\n",
		list(p.Ignored), p.QuietPeriod, list(p.Reset))
}

// Device names what a status is about: a whole GPU (GI, CI = -1) or one MIG device on it.
type Device struct {
	GPU  int    `json:"gpu"`
	UUID string `json:"uuid"`
	GI   int    `json:"gpuInstance"`
	CI   int    `json:"computeInstance"`
}

// Status is one device's health.
type Status struct {
	Device
	Healthy bool      `json:"healthy"`
	Reason  string    `json:"reason,omitempty"`
	Since   time.Time `json:"since"`
	action  Action
	lastAt  time.Time
}

// Monitor watches a node's GPUs. It is safe for concurrent use; lookups take a read lock only.
type Monitor struct {
	lib    nvmlib.Interface
	policy Policy
	clock  clock.WithTicker
	probe  time.Duration

	mu      sync.RWMutex
	status  map[Device]*Status // only unhealthy devices are kept
	lastXID map[int]uint64     // by GPU index: the last XID seen, critical or not
	subs    map[int]chan Status
	nextID  int
}

// Option configures a Monitor.
type Option func(*Monitor)

// WithClock sets the clock (tests use a fake one).
func WithClock(c clock.WithTicker) Option { return func(m *Monitor) { m.clock = c } }

// WithProbeInterval sets how often unhealthy GPUs are probed for recovery.
func WithProbeInterval(d time.Duration) Option { return func(m *Monitor) { m.probe = d } }

// NewMonitor returns a monitor; Run starts it.
func NewMonitor(lib nvmlib.Interface, policy Policy, opts ...Option) *Monitor {
	m := &Monitor{lib: lib, policy: policy, clock: clock.RealClock{}, probe: 10 * time.Second,
		status: map[Device]*Status{}, subs: map[int]chan Status{}, lastXID: map[int]uint64{}}
	for _, o := range opts {
		o(m)
	}
	return m
}

// Subscribe returns a channel of health changes and a function that ends the subscription. A slow
// subscriber never blocks the monitor: changes it cannot take are dropped for it, and it can always
// read the current state with Unhealthy.
func (m *Monitor) Subscribe() (<-chan Status, func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := m.nextID
	m.nextID++
	ch := make(chan Status, 256)
	m.subs[id] = ch
	return ch, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if c, ok := m.subs[id]; ok {
			delete(m.subs, id)
			close(c)
		}
	}
}

// GPUHealthy reports whether a whole GPU is healthy.
func (m *Monitor) GPUHealthy(gpu int) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for d := range m.status {
		if d.GPU == gpu && d.GI < 0 {
			return false
		}
	}
	return true
}

// DeviceHealthy reports whether a device is healthy: a MIG device is unhealthy when it or its GPU is.
func (m *Monitor) DeviceHealthy(gpu, gi, ci int) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for d := range m.status {
		if d.GPU == gpu && (d.GI < 0 || (d.GI == gi && d.CI == ci)) {
			return false
		}
	}
	return true
}

// Unhealthy lists the unhealthy devices, sorted.
func (m *Monitor) Unhealthy() []Status {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]Status, 0, len(m.status))
	for _, s := range m.status {
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].Device, out[j].Device
		if a.GPU != b.GPU {
			return a.GPU < b.GPU
		}
		if a.GI != b.GI {
			return a.GI < b.GI
		}
		return a.CI < b.CI
	})
	return out
}

// LastXIDs returns the last XID seen on each GPU that had one, whether it made the GPU unhealthy
// or not.
func (m *Monitor) LastXIDs() map[int]uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return maps.Clone(m.lastXID)
}

// SetPolicy replaces the policy for events from now on (a changed sharing profile); devices already
// unhealthy keep their state until they recover.
func (m *Monitor) SetPolicy(p Policy) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.policy = p
}

// Policy returns the policy in force.
func (m *Monitor) Policy() Policy {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.policy
}

// Handle applies one event. Run calls it for NVML's events; it is exported for front ends that
// receive events another way and for tests.
func (m *Monitor) Handle(e nvmlib.Event) {
	m.mu.RLock()
	policy := m.policy
	m.mu.RUnlock()
	act := policy.Classify(e)
	if e.XID != 0 && e.GPUIndex >= 0 {
		m.mu.Lock()
		m.lastXID[e.GPUIndex] = e.XID
		m.mu.Unlock()
	}
	if act == Ignore || e.GPUIndex < 0 {
		klog.V(2).InfoS("GPU event ignored", "gpu", e.GPUIndex, "type", e.Type, "xid", e.XID)
		return
	}
	d := Device{GPU: e.GPUIndex, UUID: e.GPUUUID, GI: e.GI, CI: e.CI}
	if d.GI < 0 {
		d.CI = -1
	}
	reason := string(e.Type)
	if e.Type == nvmlib.EventXID || e.XID != 0 {
		reason = fmt.Sprintf("XID %d", e.XID)
	}
	now := m.clock.Now()
	m.mu.Lock()
	s, known := m.status[d]
	if !known {
		s = &Status{Device: d, Since: now}
		m.status[d] = s
	}
	s.Healthy, s.lastAt = false, now
	if !known || s.action != UntilReset { // a reset-class fault is never downgraded to quiet-class
		s.action = act
	}
	s.Reason = fmt.Sprintf("%s (%s)", reason, s.action)
	out := *s
	m.mu.Unlock()
	klog.InfoS("GPU device unhealthy", "gpu", d.GPU, "uuid", d.UUID, "gi", d.GI, "ci", d.CI, "reason", out.Reason)
	m.publish(out)
}

func (m *Monitor) publish(s Status) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, ch := range m.subs {
		select {
		case ch <- s:
		default:
		}
	}
}

// ProbeOnce checks every unhealthy device for recovery and returns the devices that recovered.
func (m *Monitor) ProbeOnce() []Status {
	now := m.clock.Now()
	m.mu.RLock()
	quiet := m.policy.QuietPeriod
	cands := make([]Status, 0, len(m.status))
	for _, s := range m.status {
		cands = append(cands, *s)
	}
	m.mu.RUnlock()
	var recovered []Status
	probed := map[int]bool{}
	for _, s := range cands {
		if s.action == UntilQuiet && now.Sub(s.lastAt) < quiet {
			continue
		}
		ok, ready := probed[s.GPU]
		if !ready {
			ok = m.probeGPU(s.GPU, s.action)
			probed[s.GPU] = ok
		}
		if !ok {
			continue
		}
		m.mu.Lock()
		cur, still := m.status[s.Device]
		if still && cur.lastAt.Equal(s.lastAt) { // no new event arrived meanwhile
			delete(m.status, s.Device)
			s.Healthy, s.Reason, s.Since = true, "recovered: "+s.Reason, now
			recovered = append(recovered, s)
		}
		m.mu.Unlock()
	}
	for _, s := range recovered {
		klog.InfoS("GPU device healthy again", "gpu", s.GPU, "uuid", s.UUID, "gi", s.GI, "ci", s.CI, "reason", s.Reason)
		m.publish(s)
	}
	return recovered
}

// probeGPU asks NVML whether a GPU is usable again after a fault of the given class.
func (m *Monitor) probeGPU(gpu int, act Action) bool {
	if _, err := m.lib.GPU(gpu); err != nil {
		return false
	}
	if act != UntilReset {
		return true
	}
	ecc, err := m.lib.ECCErrors(gpu)
	return err == nil && ecc.VolatileUncorrected == 0
}

// Run watches NVML events and probes unhealthy GPUs until ctx ends.
func (m *Monitor) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- m.lib.WatchEvents(ctx, m.Handle) }()
	t := m.clock.NewTicker(m.probe)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return <-errc
		case err := <-errc:
			if err != nil {
				return fmt.Errorf("watching GPU events: %w", err)
			}
			return nil
		case <-t.C():
			m.ProbeOnce()
		}
	}
}
