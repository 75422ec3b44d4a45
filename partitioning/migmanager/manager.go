// Package migmanager is the node MIG manager (`tessera mig manager`, run by a DaemonSet): it makes
// the node's MIG layout follow the node label tessera.dev/mig.config, picking a named layout from a
// ConfigMap in mig-parted's v1 format, as the GPU operator's MIG manager does — but without stopping
// the front ends: only the devices a change touches are withdrawn, and only while it runs.
//
// A change goes: state label pending → holds written to the node-local handshake (miggate) → each
// front end withdraws the held devices and says which are still in use → once none is (or the drain
// timeout passes: failed, nothing changed) → applying → mig.Apply on the GPUs that change → success
// or failed (a GPU that fails is rolled back by mig.Apply) → holds released, the front ends re-read
// the changed GPUs. Every step is an Event on the Node and a value of tessera.dev/mig.config.state.
//
// A reboot keeps MIG mode but not the instances: at start the manager applies the selected layout
// again, and the front ends hold the managed GPUs' devices until it reports success in this boot.
// GPUs a front end serves as mig-dynamic (the DRA driver owns their instances) and GPUs whose
// sharing profile names a layout of its own are never touched.
package migmanager

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Node labels.
const (
	// LabelConfig selects the layout by name.
	LabelConfig = "tessera.dev/mig.config"
	// LabelNVIDIAConfig is the GPU operator's label for the same, honoured when ours is absent.
	LabelNVIDIAConfig = "nvidia.com/mig.config"
	// LabelState reports the manager's state: pending, applying, success or failed.
	LabelState = "tessera.dev/mig.config.state"
)

// Event reasons.
const (
	ReasonPending = "MIGConfigPending"
	ReasonWaiting = "MIGConfigWaiting"
	ReasonApplied = "MIGConfigApplied"
	ReasonFailed  = "MIGConfigFailed"
	ReasonSkipped = "MIGConfigGPUSkipped"
)

// LayoutsKey is the key of the layouts ConfigMap the manager reads in a mounted directory (the GPU
// operator's default-mig-parted-config uses it too).
const LayoutsKey = "config.yaml"

// Labels gives the node's labels (profile.NodeLabels watches them through the API server).
type Labels interface {
	Labels() map[string]string
	Changed() <-chan struct{}
}

// StateSink publishes the state label; "" removes it.
type StateSink interface {
	SetState(ctx context.Context, state string) error
}

// EventRecorder posts Events on the Node.
type EventRecorder interface {
	Event(eventType, reason, message string)
}

// Options configure a Manager.
type Options struct {
	// Lib is the node's NVML.
	Lib nvmlib.Interface
	// GateDir is the handshake directory shared with the front ends.
	GateDir string
	// BootID is the current boot's ID.
	BootID string
	// Layouts is the layouts file, or a directory (a mounted ConfigMap) holding config.yaml or a
	// single file.
	Layouts string
	// Labels are the node's labels; nil: only DefaultConfig selects.
	Labels Labels
	// DefaultConfig is the layout used when the node has no tessera.dev/mig.config label ("": none,
	// the manager leaves MIG alone).
	DefaultConfig string
	// State publishes the state label; nil: none.
	State StateSink
	// Events receives Events; nil: none.
	Events EventRecorder
	// DrainTimeout bounds the wait for held devices in use (default 10m); then the change fails and
	// the old layout keeps serving.
	DrainTimeout time.Duration
	// RetryInterval is how long a failed change waits before it is tried again without any change
	// of input (default 1m).
	RetryInterval time.Duration
	// Poll is how often labels, the layouts and the acks are read (default 1s).
	Poll time.Duration
	// Resync is how often a successful layout is checked against the hardware and applied again if
	// it drifted (a GPU reset clears instances; default 1m; 0 never).
	Resync time.Duration
	// AckStaleAfter is how old an ack may be and still speak for a running front end (default 30s).
	AckStaleAfter time.Duration
	// StartupGrace bounds how long the first change waits for front ends that answered in an
	// earlier boot (or before a restart) to answer again, so that it knows which GPUs they serve in
	// mode mig-dynamic (default AckStaleAfter).
	StartupGrace time.Duration
}

// Manager makes the node's MIG layout follow its label.
type Manager struct {
	o    Options
	gate miggate.Dir

	gen        int64
	lastKey    string
	lastState  miggate.State
	lastTry    time.Time
	lastResync time.Time
	labelWant  string
	labelSet   *string
	// labelWanted is set once a state has been decided: until then there is nothing to publish.
	labelWanted bool
	skipped     map[int]string
	started     bool
	lastFail    string
	config      string // the layout of the change in progress or last made, for the state gauge
	changes     *prometheus.CounterVec
	state       *prometheus.GaugeVec
	duration    prometheus.Histogram
	// rebooted: the plan found at start was made in an earlier boot, so the front ends hold every
	// managed GPU; until the first success, every managed GPU that changes stays held whole.
	rebooted bool
}

// New checks the options.
func New(o Options) (*Manager, error) {
	switch {
	case o.Lib == nil:
		return nil, errors.New("mig manager: no NVML")
	case o.GateDir == "":
		return nil, errors.New("mig manager: no handshake directory")
	case o.BootID == "":
		return nil, errors.New("mig manager: no boot ID")
	case o.Layouts == "":
		return nil, errors.New("mig manager: no layouts file or directory (--config-file)")
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 10 * time.Minute
	}
	if o.RetryInterval <= 0 {
		o.RetryInterval = time.Minute
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.AckStaleAfter <= 0 {
		o.AckStaleAfter = 30 * time.Second
	}
	if o.StartupGrace <= 0 {
		o.StartupGrace = o.AckStaleAfter
	}
	m := &Manager{o: o, gate: miggate.Dir{Path: o.GateDir}, skipped: map[int]string{},
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tessera_mig_reconfigurations_total",
			Help: "MIG layout changes the manager finished, by result (success, failed, superseded by a newer selection)."}, []string{"result"}),
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tessera_mig_config_state",
			Help: "1 for the selected layout and the manager's state (as the node label tessera.dev/mig.config.state)."}, []string{"config", "state"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tessera_mig_reconfiguration_seconds",
			Help:    "Time from a change's start to its end, waiting for devices in use included.",
			Buckets: []float64{0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600}}),
	}
	prev, err := m.gate.ReadPlan()
	if err != nil {
		klog.ErrorS(err, "Previous MIG manager plan unreadable; starting a new one")
	}
	if prev != nil {
		m.gen = prev.Generation
		m.rebooted = prev.BootID != o.BootID
	}
	// Stay above every generation a front end acknowledged, even if the plan was lost: an ack of an
	// older generation must never count as having applied a new plan's holds.
	acks, _ := m.gate.ReadAcks()
	for _, a := range acks {
		m.gen = max(m.gen, a.Generation)
	}
	return m, nil
}

// Collectors are the manager's metrics, for a Prometheus registry.
func (m *Manager) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.changes, m.state, m.duration}
}

// Selection is the layout the node's labels select, and by which label.
func (m *Manager) Selection() (name, by string) {
	var labels map[string]string
	if m.o.Labels != nil {
		labels = m.o.Labels.Labels()
	}
	if v := labels[LabelConfig]; v != "" {
		return v, "label " + LabelConfig
	}
	if v := labels[LabelNVIDIAConfig]; v != "" {
		return v, "label " + LabelNVIDIAConfig
	}
	if m.o.DefaultConfig != "" {
		return m.o.DefaultConfig, "--default-config"
	}
	return "", ""
}

// readLayouts reads the layouts file and its digest.
func (m *Manager) readLayouts() ([]byte, string, error) {
	path := m.o.Layouts
	fi, err := os.Stat(path)
	if err != nil {
		return nil, "", fmt.Errorf("MIG layouts %s: %w", path, err)
	}
	if fi.IsDir() {
		p, err := layoutsFileIn(path)
		if err != nil {
			return nil, "", err
		}
		path = p
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, "", fmt.Errorf("MIG layouts: %w", err)
	}
	sum := sha256.Sum256(data)
	return data, path + "@" + hex.EncodeToString(sum[:8]), nil
}

// layoutsFileIn picks the layouts file of a mounted ConfigMap: config.yaml, else its only key.
func layoutsFileIn(dir string) (string, error) {
	if _, err := os.Stat(filepath.Join(dir, LayoutsKey)); err == nil {
		return filepath.Join(dir, LayoutsKey), nil
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("MIG layouts directory: %w", err)
	}
	var keys []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || e.IsDir() {
			continue
		}
		keys = append(keys, e.Name())
	}
	if len(keys) == 1 {
		return filepath.Join(dir, keys[0]), nil
	}
	return "", fmt.Errorf("MIG layouts directory %s: no key %s, and %d keys (%s): name the layouts key %s",
		dir, LayoutsKey, len(keys), strings.Join(keys, ", "), LayoutsKey)
}

// Run follows the labels and the layouts until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	t := time.NewTicker(m.o.Poll)
	defer t.Stop()
	var changed <-chan struct{}
	if m.o.Labels != nil {
		changed = m.o.Labels.Changed()
	}
	for {
		m.Step(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-changed:
		}
	}
}

// Step looks at the inputs once and runs a change when they call for one. It returns the state
// after it.
func (m *Manager) Step(ctx context.Context) miggate.State {
	m.syncLabel(ctx)
	name, by := m.Selection()
	data, digest, readErr := m.readLayouts()
	key := name + "\x00" + digest + "\x00" + m.o.BootID
	if readErr != nil {
		key = name + "\x00error:" + readErr.Error()
	}
	if name == "" {
		m.idle(ctx)
		return m.lastState
	}
	now := time.Now()
	switch {
	case key != m.lastKey:
	case m.lastState == miggate.StateFailed && now.Sub(m.lastTry) >= m.o.RetryInterval:
		klog.InfoS("Retrying the failed MIG layout", "config", name)
	case m.lastState == miggate.StateSuccess && m.o.Resync > 0 && now.Sub(m.lastResync) >= m.o.Resync:
		m.lastResync = now
		if !m.drifted(ctx, data, name) {
			return m.lastState
		}
	default:
		return m.lastState
	}
	m.lastKey, m.lastTry, m.lastResync = key, now, now
	for {
		start := time.Now()
		st, superseded := m.change(ctx, name, by, data, readErr, key)
		m.lastState = st
		m.duration.Observe(time.Since(start).Seconds())
		switch {
		case superseded:
			m.changes.WithLabelValues("superseded").Inc()
		case st == miggate.StateSuccess:
			m.changes.WithLabelValues("success").Inc()
		default:
			m.changes.WithLabelValues("failed").Inc()
		}

		if !superseded || ctx.Err() != nil {
			if st == miggate.StateFailed {
				m.lastTry = time.Now() // RetryInterval counts from the failure, not from the start of the try
			}
			return st
		}
		// The inputs changed while waiting: start over with them.
		name, by = m.Selection()
		data, digest, readErr = m.readLayouts()
		key = name + "\x00" + digest + "\x00" + m.o.BootID
		if readErr != nil {
			key = name + "\x00error:" + readErr.Error()
		}
		m.lastKey, m.lastTry = key, time.Now()
		if name == "" {
			m.idle(ctx)
			return m.lastState
		}
	}
}

// idle runs when no layout is selected: nothing is managed, and a plan of an earlier boot no longer
// holds the front ends' devices.
func (m *Manager) idle(ctx context.Context) {
	if m.lastKey == "idle" {
		return
	}
	m.lastKey, m.lastState = "idle", ""
	prev, _ := m.gate.ReadPlan()
	if prev == nil || prev.BootID != m.o.BootID || prev.Active() || len(prev.Managed) > 0 {
		m.gen++
		if err := m.gate.WritePlan(&miggate.Plan{Generation: m.gen, BootID: m.o.BootID, State: miggate.StateSuccess,
			Message: "no MIG layout selected", Updated: time.Now()}); err != nil {
			klog.ErrorS(err, "Writing the MIG manager plan")
		}
	}
	m.setLabel(ctx, "")
	klog.InfoS("No MIG layout selected; MIG is left as it is", "label", LabelConfig)
}

// drifted reports whether the hardware no longer matches the layout that succeeded.
func (m *Manager) drifted(ctx context.Context, data []byte, name string) bool {
	cfg, err := mig.ParseConfig(data, m.o.Layouts)
	if err != nil {
		return false
	}
	prev, _ := m.gate.ReadPlan()
	if prev == nil {
		return true
	}
	rep, err := mig.Apply(ctx, m.o.Lib, cfg, name, mig.Options{DryRun: true, GPUs: orEmpty(prev.Managed)})
	if err != nil {
		return false
	}
	for _, g := range rep.GPUs {
		if g.Status == mig.StatusPlanned {
			klog.InfoS("MIG layout drifted (a GPU reset clears instances); applying it again", "config", name, "gpu", g.GPU)
			return true
		}
	}
	return false
}

func orEmpty(xs []int) []int {
	if xs == nil {
		return []int{}
	}
	return xs
}

// change runs one change. superseded is true when the inputs changed while it waited.
func (m *Manager) change(ctx context.Context, name, by string, data []byte, readErr error, key string) (st miggate.State, superseded bool) {
	m.gen++
	gen := m.gen
	m.config = name
	log := klog.LoggerWithValues(klog.FromContext(ctx), "config", name, "generation", gen)
	log.Info("MIG layout change", "selectedBy", by)
	m.setLabel(ctx, string(miggate.StatePending))
	plan := &miggate.Plan{Generation: gen, BootID: m.o.BootID, Config: name, State: miggate.StatePending}
	fail := func(msg string) (miggate.State, bool) {
		plan.State, plan.Message, plan.Holds, plan.Updated = miggate.StateFailed, msg, nil, time.Now()
		if err := m.gate.WritePlan(plan); err != nil {
			log.Error(err, "Writing the MIG manager plan")
		}
		m.setLabel(ctx, string(miggate.StateFailed))
		log.Error(nil, "MIG layout not applied", "reason", msg)
		// A retry that fails the same way is logged, not posted again.
		if ev := name + "\x00" + msg; ev != m.lastFail {
			m.event("Warning", ReasonFailed, fmt.Sprintf("MIG layout %q not applied: %s", name, msg))
			m.lastFail = ev
		}
		return miggate.StateFailed, false
	}
	if readErr != nil {
		return fail(readErr.Error() + "; the current layout stays")
	}
	cfg, err := mig.ParseConfig(data, m.o.Layouts)
	if err != nil {
		return fail(err.Error() + "; the current layout stays")
	}
	if _, ok := cfg.MigConfigs[name]; !ok {
		return fail(fmt.Sprintf("%s selects layout %q, which the layouts ConfigMap does not have (it has %s): fix the label or add the layout; the current layout stays",
			by, name, strings.Join(cfg.Names(), ", ")))
	}
	gpus, err := m.gpus()
	if err != nil {
		return fail(err.Error())
	}
	sel, err := mig.Select(cfg, name, gpus)
	if err != nil {
		return fail(err.Error() + "; the current layout stays")
	}
	if !m.started {
		m.started = true
		m.awaitFrontEnds(ctx)
	}
	skipped := m.skips()
	var managed []int
	for _, i := range slices.Sorted(maps.Keys(sel)) {
		if why, ok := skipped[i]; ok {
			if m.skipped[i] != why {
				m.event("Normal", ReasonSkipped, fmt.Sprintf("MIG layout %q leaves GPU %d alone: %s", name, i, why))
			}
			continue
		}
		managed = append(managed, i)
	}
	m.skipped = skipped
	plan.Managed = orEmpty(managed)

	// Force: processes on instances the change destroys are what the drain waits for, not a reason to
	// refuse before the devices are withdrawn; the real Apply below still refuses if any remain.
	dry, err := mig.Apply(ctx, m.o.Lib, cfg, name, mig.Options{DryRun: true, Force: true, GPUs: plan.Managed})
	if err != nil {
		return fail(err.Error())
	}
	var refusals []string
	holds := map[int]miggate.Hold{}
	var changed []int
	for _, g := range dry.GPUs {
		switch g.Status {
		case mig.StatusRefused, mig.StatusFailed, mig.StatusPendingReset:
			refusals = append(refusals, gpuProblem(g))
		case mig.StatusPlanned:
			changed = append(changed, g.GPU)
			// After a reboot the front ends hold every managed GPU; they keep holding the ones that
			// change until the layout is complete again, so no half-made layout is advertised.
			if g.ModeChange || m.rebooted {
				holds[g.GPU] = miggate.Hold{All: true}
				continue
			}
			var starts []int
			for _, d := range g.Destroyed {
				starts = append(starts, d.Placement.Start)
			}
			if len(starts) > 0 {
				slices.Sort(starts)
				holds[g.GPU] = miggate.Hold{Placements: starts}
			}
		}
	}
	if len(refusals) > 0 {
		return fail(strings.Join(refusals, "; ") + "; nothing was changed")
	}
	plan.Changed, plan.Holds, plan.Updated = changed, holds, time.Now()
	if err := m.gate.WritePlan(plan); err != nil {
		return fail(fmt.Sprintf("writing the handshake for the front ends: %v", err))
	}
	if len(changed) > 0 {
		m.event("Normal", ReasonPending, fmt.Sprintf("MIG layout %q (%s): changing GPUs %s; withdrawn until done: %s",
			name, by, ints(changed), miggate.FormatHolds(holds)))
	}

	// Wait until no front end serves a held device any more.
	if len(holds) > 0 {
		if sup, msg := m.drain(ctx, gen, holds, key); sup {
			return miggate.StatePending, true
		} else if msg != "" {
			return fail(msg)
		}
	}

	plan.State, plan.Updated = miggate.StateApplying, time.Now()
	if err := m.gate.WritePlan(plan); err != nil {
		return fail(fmt.Sprintf("writing the handshake for the front ends: %v", err))
	}
	m.setLabel(ctx, string(miggate.StateApplying))
	var rep mig.Report
	if len(changed) > 0 {
		rep, err = mig.Apply(ctx, m.o.Lib, cfg, name, mig.Options{GPUs: changed})
		if err != nil {
			return fail(err.Error())
		}
	}
	var problems, done []string
	for _, g := range rep.GPUs {
		switch g.Status {
		case mig.StatusRefused, mig.StatusFailed, mig.StatusPendingReset:
			problems = append(problems, gpuProblem(g))
		case mig.StatusChanged:
			done = append(done, fmt.Sprintf("GPU %d: %s", g.GPU, describe(g)))
		}
	}
	if len(problems) > 0 {
		return fail(strings.Join(problems, "; "))
	}
	m.lastFail, m.rebooted = "", false
	plan.State, plan.Holds, plan.Message, plan.Updated = miggate.StateSuccess, nil, strings.Join(done, "; "), time.Now()
	if err := m.gate.WritePlan(plan); err != nil {
		log.Error(err, "Writing the MIG manager plan")
	}
	m.setLabel(ctx, string(miggate.StateSuccess))
	msg := fmt.Sprintf("MIG layout %q applied (%s)", name, by)
	if len(done) > 0 {
		msg += ": " + strings.Join(done, "; ")
	} else {
		msg += ": the GPUs already matched it"
	}
	log.Info("MIG layout applied", "changed", changed)
	m.event("Normal", ReasonApplied, msg)
	return miggate.StateSuccess, false
}

// gpuProblem says what went wrong on one GPU, naming it once.
func gpuProblem(g mig.GPUResult) string {
	label := fmt.Sprintf("GPU %d (%s)", g.GPU, g.Product)
	msg := strings.TrimPrefix(g.Message, label+": ")
	return fmt.Sprintf("%s: %s: %s", label, g.Status, msg)
}

func describe(g mig.GPUResult) string {
	var parts []string
	if g.ModeChange {
		if g.MIG {
			parts = append(parts, "MIG mode on")
		} else {
			parts = append(parts, "MIG mode off")
		}
	}
	if len(g.Destroyed) > 0 {
		parts = append(parts, "destroyed "+instances(g.Destroyed))
	}
	if len(g.Created) > 0 {
		parts = append(parts, "created "+instances(g.Created))
	}
	if len(parts) == 0 {
		return "changed"
	}
	return strings.Join(parts, ", ")
}

func instances(is []mig.Instance) string {
	var s []string
	for _, i := range is {
		s = append(s, i.String())
	}
	return strings.Join(s, " ")
}

func ints(xs []int) string {
	var s []string
	for _, x := range xs {
		s = append(s, strconv.Itoa(x))
	}
	return strings.Join(s, ",")
}

// drain waits until every front end that owns a held GPU has withdrawn the held devices and none of
// them is in use. It returns superseded when the inputs changed meanwhile, or a failure message.
func (m *Manager) drain(ctx context.Context, gen int64, holds map[int]miggate.Hold, key string) (superseded bool, failure string) {
	deadline := time.Now().Add(m.o.DrainTimeout)
	t := time.NewTicker(min(m.o.Poll, 500*time.Millisecond))
	defer t.Stop()
	lastWaiting := ""
	for {
		waiting := m.waitingFor(gen, holds)
		if len(waiting) == 0 {
			return false, ""
		}
		w := strings.Join(waiting, "; ")
		if w != lastWaiting {
			klog.InfoS("MIG layout change waits for devices to be released", "generation", gen, "waitingFor", w)
			m.event("Normal", ReasonWaiting, "MIG layout change waits: "+w)
			lastWaiting = w
		}
		if time.Now().After(deadline) {
			return false, fmt.Sprintf("timed out after %s waiting for: %s; delete the workloads holding them (or raise --drain-timeout); the current layout stays and keeps serving", m.o.DrainTimeout, w)
		}
		select {
		case <-ctx.Done():
			return false, "stopped: " + ctx.Err().Error()
		case <-t.C:
		}
		name, _ := m.Selection()
		_, digest, readErr := m.readLayouts()
		k := name + "\x00" + digest + "\x00" + m.o.BootID
		if readErr != nil {
			k = name + "\x00error:" + readErr.Error()
		}
		if k != key {
			klog.InfoS("MIG layout selection changed while waiting; starting over", "generation", gen)
			return true, ""
		}
	}
}

// waitingFor lists what the change still waits for: a front end that owns a held GPU and has not
// applied this generation's holds, or held devices in use.
func (m *Manager) waitingFor(gen int64, holds map[int]miggate.Hold) []string {
	acks, err := m.gate.ReadAcks()
	if err != nil {
		klog.ErrorS(err, "Reading front-end acks")
	}
	now := time.Now()
	var out []string
	for _, fe := range slices.Sorted(maps.Keys(acks)) {
		a := acks[fe]
		if a.BootID != m.o.BootID || !a.Fresh(now, m.o.AckStaleAfter) {
			continue
		}
		owns := false
		for i := range holds {
			if _, ok := a.GPUs[i]; ok {
				owns = true
			}
		}
		if !owns {
			continue
		}
		if a.Generation < gen {
			out = append(out, fmt.Sprintf("the %s to withdraw the devices", fe))
			continue
		}
		for _, b := range a.Busy {
			if _, held := holds[b.GPU]; held {
				out = append(out, fmt.Sprintf("%s (%s)", b, fe))
			}
		}
	}
	return out
}

// awaitFrontEnds waits, up to StartupGrace, until every front end that has answered before (an ack
// file exists) answers in this boot: until then the manager cannot know which GPUs it serves in mode
// mig-dynamic. A front end that is gone for good costs this wait once, at start.
func (m *Manager) awaitFrontEnds(ctx context.Context) {
	deadline := time.Now().Add(m.o.StartupGrace)
	for {
		acks, _ := m.gate.ReadAcks()
		var missing []string
		now := time.Now()
		for _, fe := range slices.Sorted(maps.Keys(acks)) {
			if a := acks[fe]; a.BootID != m.o.BootID || !a.Fresh(now, m.o.AckStaleAfter) {
				missing = append(missing, fe)
			}
		}
		if len(missing) == 0 {
			return
		}
		if now.After(deadline) {
			klog.InfoS("Front ends that answered before have not answered since the start; going on without them", "frontEnds", missing)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(m.o.Poll, 500*time.Millisecond)):
		}
	}
}

// skips says which GPUs the manager leaves alone, from the fresh acks of the front ends.
func (m *Manager) skips() map[int]string {
	acks, _ := m.gate.ReadAcks()
	now := time.Now()
	out := map[int]string{}
	for _, fe := range slices.Sorted(maps.Keys(acks)) {
		a := acks[fe]
		if a.BootID != m.o.BootID || !a.Fresh(now, m.o.AckStaleAfter) {
			continue
		}
		for i, g := range a.GPUs {
			switch {
			case g.Mode == string(api.ModeMIGDynamic):
				out[i] = fmt.Sprintf("the %s serves it in mode mig-dynamic and makes its MIG devices itself", fe)
			case g.Layout != "" && g.Layout != api.LayoutExisting:
				out[i] = fmt.Sprintf("its sharing profile sets mig.layout %q, which the %s applies; set mig.layout: existing to let the MIG manager decide", g.Layout, fe)
			}
		}
	}
	return out
}

func (m *Manager) gpus() ([]nvmlib.GPU, error) {
	n, err := m.o.Lib.DeviceCount()
	if err != nil {
		return nil, fmt.Errorf("counting GPUs: %w", err)
	}
	out := make([]nvmlib.GPU, n)
	for i := range n {
		if out[i], err = m.o.Lib.GPU(i); err != nil {
			return nil, fmt.Errorf("reading GPU %d: %w", i, err)
		}
	}
	return out, nil
}

func (m *Manager) setLabel(ctx context.Context, state string) {
	m.state.Reset()
	if state != "" {
		m.state.WithLabelValues(m.config, state).Set(1)
	}
	m.labelWant, m.labelWanted = state, true
	m.syncLabel(ctx)
}

// syncLabel publishes the state label if it differs from what was published (an earlier failure is
// retried on every step).
func (m *Manager) syncLabel(ctx context.Context) {
	if m.o.State == nil || !m.labelWanted || (m.labelSet != nil && *m.labelSet == m.labelWant) {
		return
	}
	if err := m.o.State.SetState(ctx, m.labelWant); err != nil {
		klog.ErrorS(err, "Publishing the MIG state label; retrying", "state", m.labelWant)
		return
	}
	v := m.labelWant
	m.labelSet = &v
}

func (m *Manager) event(typ, reason, msg string) {
	if m.o.Events != nil {
		m.o.Events.Event(typ, reason, msg)
	}
}
