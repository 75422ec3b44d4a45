package migmanager_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/migmanager"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

// layoutsYAML are the layouts the tests select from, for the 8 H100 80GB GPUs of dgx-h100. Most tests
// start from all-3g.40gb (cheap for the simulator: two instances per GPU).
const layoutsYAML = `version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.10gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
  all-3g.40gb:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.40gb": 2}
  # From all-3g.40gb, GPUs 0 and 1 keep the 3g.40gb at 4 and cut the one at 0 three ways; the
  # others do not change.
  mixed-01:
    - devices: [0, 1]
      mig-enabled: true
      mig-devices: {"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 2}
      placements:
        - {profile: 3g.40gb, start: 4}
    - devices: [2, 3, 4, 5, 6, 7]
      mig-enabled: true
      mig-devices: {"3g.40gb": 2}
`

const nGPUs = 8

// --- fakes ---

type fakeLabels struct {
	mu sync.Mutex
	m  map[string]string
	ch chan struct{}
}

func newLabels(kv ...string) *fakeLabels {
	l := &fakeLabels{m: map[string]string{}, ch: make(chan struct{}, 1)}
	for i := 0; i+1 < len(kv); i += 2 {
		l.m[kv[i]] = kv[i+1]
	}
	return l
}

func (l *fakeLabels) Labels() map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.m)
}

func (l *fakeLabels) Changed() <-chan struct{} { return l.ch }

// set sets a label ("" removes it) and signals the change.
func (l *fakeLabels) set(k, v string) {
	l.mu.Lock()
	if v == "" {
		delete(l.m, k)
	} else {
		l.m[k] = v
	}
	l.mu.Unlock()
	select {
	case l.ch <- struct{}{}:
	default:
	}
}

type fakeStates struct {
	mu     sync.Mutex
	states []string
	// fail makes SetState of this state fail once.
	fail string
}

func (s *fakeStates) SetState(_ context.Context, st string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != "" && s.fail == st {
		s.fail = ""
		return errors.New("API server unreachable")
	}
	s.states = append(s.states, st)
	return nil
}

func (s *fakeStates) all() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.states)
}

func (s *fakeStates) last() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.states) == 0 {
		return "<none>"
	}
	return s.states[len(s.states)-1]
}

type event struct{ Type, Reason, Message string }

type fakeEvents struct {
	mu     sync.Mutex
	events []event
}

func (e *fakeEvents) Event(typ, reason, msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.events = append(e.events, event{typ, reason, msg})
}

func (e *fakeEvents) all() []event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.events)
}

// find returns the events of a reason whose message contains every one of subs.
func (e *fakeEvents) find(reason string, subs ...string) []event {
	var out []event
	for _, ev := range e.all() {
		if ev.Reason != reason {
			continue
		}
		ok := true
		for _, s := range subs {
			ok = ok && strings.Contains(ev.Message, s)
		}
		if ok {
			out = append(out, ev)
		}
	}
	return out
}

// mutation is one MIG-changing NVML call, with the handshake as it was when the call was made.
type mutation struct {
	op    string
	gpu   int
	start int // placement of the GPU instance created or destroyed (-1: SetMigMode)
	plan  *miggate.Plan
}

// watchedLib records every MIG-changing call the manager makes with the plan on disk at that time.
type watchedLib struct {
	nvmlib.Interface
	gate miggate.Dir
	mu   sync.Mutex
	muts []mutation
}

func (w *watchedLib) record(op string, gpu, start int) {
	p, _ := w.gate.ReadPlan()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.muts = append(w.muts, mutation{op: op, gpu: gpu, start: start, plan: p})
}

func (w *watchedLib) mutations() []mutation {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.muts)
}

func (w *watchedLib) SetMigMode(index int, enabled bool) (nvmlib.MigModeChange, error) {
	w.record("SetMigMode", index, -1)
	return w.Interface.SetMigMode(index, enabled)
}

func (w *watchedLib) CreateGpuInstance(index, profileID int, p nvmlib.Placement) (int, error) {
	w.record("CreateGpuInstance", index, p.Start)
	return w.Interface.CreateGpuInstance(index, profileID, p)
}

func (w *watchedLib) DestroyGpuInstance(index, giID int) error {
	start := -2
	if gis, err := w.Interface.GpuInstances(index); err == nil {
		for _, gi := range gis {
			if gi.ID == giID {
				start = gi.Placement.Start
			}
		}
	}
	w.record("DestroyGpuInstance", index, start)
	return w.Interface.DestroyGpuInstance(index, giID)
}

// --- environment ---

type env struct {
	t       *testing.T
	node    *sim.Node
	raw     *sim.Lib
	lib     nvmlib.Interface // what the test reads the node with
	watched *watchedLib      // what the manager changes the node with
	boot    string
	gate    miggate.Dir
	layouts string
	labels  *fakeLabels
	states  *fakeStates
	events  *fakeEvents
}

func newEnv(t *testing.T, kv ...string) *env {
	t.Helper()
	spec, err := sim.BuiltinNode("dgx-h100")
	if err != nil {
		t.Fatal(err)
	}
	node, err := sim.Open(spec, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, node: node, gate: miggate.Dir{Path: filepath.Join(node.Dir(), "mig-manager")},
		layouts: filepath.Join(t.TempDir(), "layouts.yaml"), labels: newLabels(kv...), states: &fakeStates{}, events: &fakeEvents{}}
	e.openLib()
	if err := os.WriteFile(e.layouts, []byte(layoutsYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

// openLib opens NVML as a (re)started process does, and reads the boot ID.
func (e *env) openLib() {
	e.t.Helper()
	e.raw = e.node.NVML()
	lib, err := nvmlib.Wrap(e.raw)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { lib.Shutdown() })
	e.lib = lib
	e.watched = &watchedLib{Interface: lib, gate: e.gate}
	if e.boot, err = e.node.BootID(); err != nil || e.boot == "" {
		e.t.Fatalf("boot ID %q: %v", e.boot, err)
	}
}

func (e *env) options() migmanager.Options {
	return migmanager.Options{Lib: e.watched, GateDir: e.gate.Path, BootID: e.boot, Layouts: e.layouts,
		Labels: e.labels, State: e.states, Events: e.events, Poll: 10 * time.Millisecond}
}

func (e *env) manager(mod ...func(*migmanager.Options)) *migmanager.Manager {
	e.t.Helper()
	o := e.options()
	for _, f := range mod {
		f(&o)
	}
	m, err := migmanager.New(o)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

func (e *env) step(m *migmanager.Manager) miggate.State {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return m.Step(ctx)
}

// stepAsync runs Step in a goroutine; the test ends only after it returned.
func (e *env) stepAsync(m *migmanager.Manager) <-chan miggate.State {
	ctx, cancel := context.WithCancel(context.Background())
	out, done := make(chan miggate.State, 1), make(chan struct{})
	go func() {
		defer close(done)
		out <- m.Step(ctx)
	}()
	e.t.Cleanup(func() { cancel(); <-done })
	return out
}

func (e *env) plan() *miggate.Plan {
	e.t.Helper()
	p, err := e.gate.ReadPlan()
	if err != nil {
		e.t.Fatal(err)
	}
	if p == nil {
		e.t.Fatal("no plan.json")
	}
	return p
}

// ack writes the device plugin's ack: fresh, this boot, owning gpus.
func (e *env) ack(gen int64, gpus map[int]miggate.GPUOwnership, busy ...miggate.Busy) {
	e.t.Helper()
	e.ackAs(miggate.FrontEndDevicePlugin, gen, gpus, busy...)
}

func (e *env) ackAs(fe string, gen int64, gpus map[int]miggate.GPUOwnership, busy ...miggate.Busy) {
	e.t.Helper()
	if err := e.gate.WriteAck(&miggate.Ack{FrontEnd: fe, BootID: e.boot, Generation: gen, GPUs: gpus, Busy: busy, Heartbeat: time.Now()}); err != nil {
		e.t.Fatal(err)
	}
}

// fakeFrontEnd is a front end following the handshake with the real miggate.Follower: it records the
// changes it is handed and reports the GPUs it owns and what the test marks busy.
type fakeFrontEnd struct {
	mu      sync.Mutex
	gpus    map[int]miggate.GPUOwnership
	busy    []miggate.Busy
	changes []miggate.Change
}

func (f *fakeFrontEnd) apply(_ context.Context, ch miggate.Change) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changes = append(f.changes, ch)
}

func (f *fakeFrontEnd) report(map[int]miggate.Hold) (map[int]miggate.GPUOwnership, []miggate.Busy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.gpus), slices.Clone(f.busy)
}

func (f *fakeFrontEnd) setBusy(b ...miggate.Busy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.busy = b
}

func (f *fakeFrontEnd) seen() []miggate.Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.changes)
}

// follow starts a front end that follows the plan every 2ms until the test ends; it has acknowledged
// once when follow returns.
func (e *env) follow(name string, gpus map[int]miggate.GPUOwnership, busy ...miggate.Busy) *fakeFrontEnd {
	e.t.Helper()
	fe := &fakeFrontEnd{gpus: gpus, busy: busy}
	f := miggate.NewFollower(e.gate.Path, name, e.boot, miggate.WithInterval(2*time.Millisecond, time.Second))
	ctx, cancel := context.WithCancel(context.Background())
	f.Step(ctx, fe.apply, fe.report)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.Run(ctx, fe.apply, fe.report)
	}()
	e.t.Cleanup(func() { cancel(); <-done })
	return fe
}

func owning(mode string, gpus ...int) map[int]miggate.GPUOwnership {
	out := map[int]miggate.GPUOwnership{}
	for _, g := range gpus {
		out[g] = miggate.GPUOwnership{Mode: mode}
	}
	return out
}

func allGPUs() []int {
	out := make([]int, nGPUs)
	for i := range out {
		out[i] = i
	}
	return out
}

// nvmlChanges counts the MIG-changing NVML calls made on the node so far.
func (e *env) nvmlChanges() int {
	n := 0
	for _, op := range []string{sim.OpCreateGpuInstance, sim.OpDestroyGpuInstance, sim.OpCreateComputeInstance, sim.OpDestroyComputeInstance, sim.OpSetMigMode} {
		n += e.raw.Calls(op)
	}
	return n
}

// layout reads a GPU's MIG devices as sorted "profile@start" strings.
func (e *env) layout(gpu int) []string {
	e.t.Helper()
	devs, err := e.lib.MigDevices(gpu)
	if err != nil && !errors.Is(err, nvmlib.ErrNotSupported) {
		e.t.Fatal(err)
	}
	var out []string
	for _, d := range devs {
		out = append(out, fmt.Sprintf("%s@%d", d.Profile, d.Placement.Start))
	}
	slices.Sort(out)
	return out
}

func (e *env) layouts8() [][]string {
	out := make([][]string, nGPUs)
	for i := range out {
		out[i] = e.layout(i)
	}
	return out
}

func (e *env) migEnabled(gpu int) bool {
	e.t.Helper()
	g, err := e.lib.GPU(gpu)
	if err != nil {
		e.t.Fatal(err)
	}
	return g.MigEnabled
}

// base is a GPU's layout under all-3g.40gb.
var base = []string{"3g.40gb@0", "3g.40gb@4"}

func all1g() []string {
	var out []string
	for s := range 7 {
		out = append(out, fmt.Sprintf("1g.10gb@%d", s))
	}
	return out
}

func countProfile(layout []string, profile string) int {
	n := 0
	for _, l := range layout {
		if strings.HasPrefix(l, profile+"@") {
			n++
		}
	}
	return n
}

// waitFor polls cond until it holds (5s at most).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// notDone checks that an asynchronous Step has not returned.
func notDone(t *testing.T, ch <-chan miggate.State, what string) {
	t.Helper()
	select {
	case st := <-ch:
		t.Fatalf("%s: Step returned %q instead of waiting", what, st)
	default:
	}
}

func result(t *testing.T, ch <-chan miggate.State) miggate.State {
	t.Helper()
	select {
	case st := <-ch:
		return st
	case <-time.After(10 * time.Second):
		t.Fatal("Step did not return")
		return ""
	}
}

// assertStates compares the state labels published so far. A leading "" (the label removed before the
// first change) is ignored unless want starts with it: TestStartKeepsStateLabel reports it.
func (e *env) assertStates(want ...string) {
	e.t.Helper()
	got := e.states.all()
	if len(got) > 0 && got[0] == "" && (len(want) == 0 || want[0] != "") {
		got = got[1:]
	}
	if !slices.Equal(got, want) {
		e.t.Fatalf("state labels %q, want %q", got, want)
	}
}

// applyBase brings the node to all-3g.40gb through the manager and checks it.
func (e *env) applyBase(m *migmanager.Manager) *miggate.Plan {
	e.t.Helper()
	e.labels.set(migmanager.LabelConfig, "all-3g.40gb")
	if st := e.step(m); st != miggate.StateSuccess {
		e.t.Fatalf("applying all-3g.40gb: %q; events %+v", st, e.events.all())
	}
	for g := range nGPUs {
		if got := e.layout(g); !slices.Equal(got, base) {
			e.t.Fatalf("GPU %d has %v after all-3g.40gb", g, got)
		}
	}
	return e.plan()
}

// startOf parses the placement of a "profile@start" entry.
func startOf(t *testing.T, entry string) int {
	t.Helper()
	var start int
	if _, err := fmt.Sscanf(entry[strings.Index(entry, "@")+1:], "%d", &start); err != nil {
		t.Fatal(err)
	}
	return start
}

// --- tests ---

func TestNewChecksOptions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for name, mod := range map[string]func(*migmanager.Options){
		"no NVML":    func(o *migmanager.Options) { o.Lib = nil },
		"no gate":    func(o *migmanager.Options) { o.GateDir = "" },
		"no boot ID": func(o *migmanager.Options) { o.BootID = "" },
		"no layouts": func(o *migmanager.Options) { o.Layouts = "" },
	} {
		o := e.options()
		mod(&o)
		if _, err := migmanager.New(o); err == nil {
			t.Errorf("%s: New accepted the options", name)
		}
	}
}

func TestSelection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager(func(o *migmanager.Options) { o.DefaultConfig = "all-disabled" })
	check := func(wantName, wantBy string) {
		t.Helper()
		if name, by := m.Selection(); name != wantName || !strings.Contains(by, wantBy) {
			t.Errorf("Selection = %q by %q, want %q by %q", name, by, wantName, wantBy)
		}
	}
	check("all-disabled", "--default-config")
	e.labels.set(migmanager.LabelNVIDIAConfig, "all-3g.40gb")
	check("all-3g.40gb", migmanager.LabelNVIDIAConfig)
	e.labels.set(migmanager.LabelConfig, "all-1g.10gb")
	check("all-1g.10gb", migmanager.LabelConfig)

	// Without labels and default nothing is selected.
	m = e.manager(func(o *migmanager.Options) { o.Labels = nil })
	if name, by := m.Selection(); name != "" || by != "" {
		t.Errorf("Selection without labels = %q, %q", name, by)
	}
}

// 1. The label selects a layout: pending, applying, success; NVML has the instances; the plan says
// success and lists the changed GPUs; the Events say so.
func TestApplyFromLabel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-1g.10gb")
	m := e.manager()
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	e.assertStates("pending", "applying", "success")
	for g := range nGPUs {
		if !e.migEnabled(g) {
			t.Errorf("GPU %d: MIG not enabled", g)
		}
		gis, err := e.lib.GpuInstances(g)
		if err != nil {
			t.Fatal(err)
		}
		if len(gis) != 7 {
			t.Errorf("GPU %d has %d GPU instances, want 7", g, len(gis))
		}
		if got := e.layout(g); !slices.Equal(got, all1g()) {
			t.Errorf("GPU %d layout %v", g, got)
		}
	}
	p := e.plan()
	if p.State != miggate.StateSuccess || p.Config != "all-1g.10gb" || p.BootID != e.boot || p.Generation != 1 {
		t.Errorf("plan = %+v", p)
	}
	if !slices.Equal(p.Managed, allGPUs()) || !slices.Equal(p.Changed, allGPUs()) {
		t.Errorf("plan managed %v changed %v, want every GPU", p.Managed, p.Changed)
	}
	if len(p.Holds) != 0 || len(miggate.HoldsFor(p, e.boot)) != 0 {
		t.Errorf("holds left after success: %v", p.Holds)
	}
	if evs := e.events.find(migmanager.ReasonApplied, "all-1g.10gb", "MIG mode on"); len(evs) != 1 || evs[0].Type != "Normal" {
		t.Errorf("no MIGConfigApplied event: %+v", e.events.all())
	}
	if evs := e.events.find(migmanager.ReasonPending, "every device"); len(evs) != 1 {
		t.Errorf("no MIGConfigPending event for the mode change: %+v", e.events.all())
	}
	if len(e.events.find(migmanager.ReasonFailed)) != 0 {
		t.Errorf("failure events: %+v", e.events.all())
	}
	// Every change happened while the plan said applying, with every device of the GPU held.
	for _, mu := range e.watched.mutations() {
		if mu.plan == nil || mu.plan.State != miggate.StateApplying || mu.plan.Generation != 1 || !miggate.HoldsFor(mu.plan, e.boot)[mu.gpu].All {
			t.Fatalf("%s on GPU %d while the plan was %+v", mu.op, mu.gpu, mu.plan)
		}
	}
	// The metrics say so too.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m.Collectors()...)
	var b strings.Builder
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			var ls []string
			for _, l := range mt.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			v := mt.GetCounter().GetValue() + mt.GetGauge().GetValue() + float64(mt.GetHistogram().GetSampleCount())
			fmt.Fprintf(&b, "%s{%s} %g\n", f.GetName(), strings.Join(ls, ","), v)
		}
	}
	for _, want := range []string{"tessera_mig_reconfigurations_total{result=success} 1", "tessera_mig_config_state{config=all-1g.10gb,state=success} 1",
		"tessera_mig_reconfiguration_seconds{} 1"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("metrics lack %q:\n%s", want, b.String())
		}
	}
}

// The GPU operator's label selects too.
func TestApplyFromNVIDIALabel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelNVIDIAConfig, "all-3g.40gb")
	m := e.manager()
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	if got := e.layout(5); !slices.Equal(got, base) {
		t.Errorf("GPU 5 layout %v", got)
	}
	if evs := e.events.find(migmanager.ReasonApplied, migmanager.LabelNVIDIAConfig); len(evs) != 1 {
		t.Errorf("Applied event does not say which label selected: %+v", e.events.all())
	}
}

// 2. A second Step with unchanged inputs does nothing; a layouts file that changes without changing
// the selected layout's effect runs a change that touches no GPU.
func TestUnchangedInputsDoNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	e.applyBase(m)
	calls, states, events := e.nvmlChanges(), len(e.states.all()), len(e.events.all())
	if calls == 0 {
		t.Fatal("the sim counted no NVML changes for the first apply")
	}
	gen := e.plan().Generation
	for range 3 {
		e.labels.set("unrelated", "x") // a label change that does not change the selection
		if st := e.step(m); st != miggate.StateSuccess {
			t.Fatalf("Step = %q", st)
		}
	}
	if n := e.nvmlChanges() - calls; n != 0 {
		t.Errorf("unchanged inputs made %d NVML changes", n)
	}
	if got := e.states.all(); len(got) != states {
		t.Errorf("unchanged inputs set states %q", got[states:])
	}
	if got := e.events.all(); len(got) != events {
		t.Errorf("unchanged inputs posted events %+v", got[events:])
	}
	if p := e.plan(); p.Generation != gen {
		t.Errorf("plan rewritten: generation %d, was %d", p.Generation, gen)
	}

	// The same bytes written again: same digest, nothing happens.
	if err := os.WriteFile(e.layouts, []byte(layoutsYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	e.step(m)
	if len(e.states.all()) != states {
		t.Errorf("rewriting identical layouts ran a change")
	}

	// The file changes (a layout added): a change runs, but every GPU already matches.
	if err := os.WriteFile(e.layouts, []byte(layoutsYAML+"  extra:\n    - devices: all\n      mig-enabled: false\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	if n := e.nvmlChanges() - calls; n != 0 {
		t.Errorf("a layout that already matches made %d NVML changes", n)
	}
	if got := e.states.all()[states:]; !slices.Equal(got, []string{"pending", "applying", "success"}) {
		t.Errorf("states %q", got)
	}
	p := e.plan()
	if p.Generation != gen+1 || len(p.Changed) != 0 || p.State != miggate.StateSuccess || len(p.Holds) != 0 {
		t.Errorf("plan after a no-op change: %+v", p)
	}
	if evs := e.events.find(migmanager.ReasonApplied, "already matched"); len(evs) != 1 {
		t.Errorf("events %+v", e.events.all())
	}
	if len(e.events.find(migmanager.ReasonPending)) != 1 { // only the first apply's
		t.Errorf("a no-op change posted MIGConfigPending: %+v", e.events.all())
	}
}

// 3. A change that destroys instances waits until the front end that owns the GPUs has withdrawn
// them (acknowledged this generation) and none is in use; only the touched GPUs and placements
// are held; then it applies.
func TestChangeWaitsForFrontEnd(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	p1 := e.applyBase(m)
	before := e.layouts8()
	calls := e.nvmlChanges()
	nStates := len(e.states.all())

	// The device plugin owns every GPU and acknowledged the previous generation only.
	e.ack(p1.Generation, owning("mig-static", allGPUs()...))
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	done := e.stepAsync(m)

	var p *miggate.Plan
	waitFor(t, "the pending plan", func() bool {
		p, _ = e.gate.ReadPlan()
		return p != nil && p.Generation == p1.Generation+1 && p.State == miggate.StatePending
	})
	waitFor(t, "a MIGConfigWaiting event", func() bool {
		return len(e.events.find(migmanager.ReasonWaiting, "device-plugin to withdraw")) > 0
	})
	if p.Config != "mixed-01" || !slices.Equal(p.Changed, []int{0, 1}) || !slices.Equal(p.Managed, allGPUs()) {
		t.Fatalf("pending plan = %+v", p)
	}
	if !slices.Equal(slices.Sorted(maps.Keys(p.Holds)), []int{0, 1}) {
		t.Fatalf("holds %v, want GPUs 0 and 1 only", p.Holds)
	}
	for g, h := range p.Holds {
		if h.All || len(h.Placements) == 0 {
			t.Errorf("GPU %d hold %+v: want the destroyed placements", g, h)
		}
	}
	if got := miggate.HoldsFor(p, e.boot); !reflect.DeepEqual(got, p.Holds) {
		t.Errorf("HoldsFor(pending) = %v", got)
	}
	if e.states.last() != "pending" {
		t.Errorf("state label %q while waiting", e.states.last())
	}
	if len(e.events.find(migmanager.ReasonPending, "mixed-01", "changing GPUs 0,1")) != 1 {
		t.Errorf("events %+v", e.events.all())
	}
	// An older generation keeps blocking it.
	time.Sleep(60 * time.Millisecond) // several polls
	notDone(t, done, "ack of an older generation")

	// The front end withdrew them but one held device is still in use: still waiting. A busy device
	// on a GPU the change does not touch does not matter.
	busy := miggate.Busy{GPU: 0, Device: "nvidia.com/mig-3g.40gb:gpu-0-mig-0", User: "pod default/train"}
	other := miggate.Busy{GPU: 5, Device: "gpu-5-mig-0"}
	e.ack(p.Generation, owning("mig-static", allGPUs()...), busy, other)
	waitFor(t, "a MIGConfigWaiting event naming the busy device", func() bool {
		return len(e.events.find(migmanager.ReasonWaiting, busy.String())) > 0
	})
	time.Sleep(40 * time.Millisecond)
	notDone(t, done, "a held device in use")
	if n := e.nvmlChanges() - calls; n != 0 {
		t.Fatalf("%d NVML changes while waiting", n)
	}
	if got := e.layouts8(); !reflect.DeepEqual(got, before) {
		t.Fatalf("layout changed while waiting")
	}
	for _, ev := range e.events.find(migmanager.ReasonWaiting) {
		if strings.Contains(ev.Message, other.Device) {
			t.Errorf("waits for a device on an untouched GPU: %q", ev.Message)
		}
	}

	// Released: the change completes.
	e.ack(p.Generation, owning("mig-static", allGPUs()...), other)
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	if got := e.states.all()[nStates:]; !slices.Equal(got, []string{"pending", "applying", "success"}) {
		t.Errorf("states %q", got)
	}
	after := e.layouts8()
	for g := 2; g < nGPUs; g++ {
		if !slices.Equal(after[g], before[g]) {
			t.Errorf("GPU %d, untouched by mixed-01, changed: %v", g, after[g])
		}
	}
	for g := range 2 {
		if countProfile(after[g], "1g.10gb") != 2 || countProfile(after[g], "2g.20gb") != 1 || !slices.Contains(after[g], "3g.40gb@4") || len(after[g]) != 4 {
			t.Errorf("GPU %d layout %v, want 3g.40gb@4 + 2g.20gb + 2x 1g.10gb", g, after[g])
		}
		// The held placements are exactly the instances the change destroyed.
		var destroyed []int
		for _, d := range before[g] {
			if !slices.Contains(after[g], d) {
				destroyed = append(destroyed, startOf(t, d))
			}
		}
		if !slices.Equal(p.Holds[g].Placements, destroyed) {
			t.Errorf("GPU %d: held placements %v, destroyed %v", g, p.Holds[g].Placements, destroyed)
		}
	}
	final := e.plan()
	if final.State != miggate.StateSuccess || len(final.Holds) != 0 || !slices.Equal(final.Changed, []int{0, 1}) {
		t.Errorf("final plan %+v", final)
	}
	// Every destroy happened while applying, on a held placement.
	destroys := 0
	for _, mu := range e.watched.mutations() {
		if mu.plan.Generation != final.Generation {
			continue
		}
		if mu.gpu > 1 || mu.plan.State != miggate.StateApplying {
			t.Errorf("%s on GPU %d while the plan was %s", mu.op, mu.gpu, mu.plan.State)
		}
		if mu.op == "DestroyGpuInstance" {
			destroys++
			if !miggate.HoldsFor(mu.plan, e.boot)[mu.gpu].Covers(true, mu.start) {
				t.Errorf("GPU %d: instance at %d destroyed without a hold", mu.gpu, mu.start)
			}
		}
	}
	if destroys != 2 {
		t.Errorf("%d GPU instances destroyed, want 2", destroys)
	}
}

// The manager and real followers: the front end that owns the touched GPUs is handed the holds,
// reports a held device busy until the test frees it, and is told to re-read the changed GPUs once
// the change succeeded; a front end that owns only untouched GPUs is not waited for.
func TestWithFollowers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	e.applyBase(m)
	busy := miggate.Busy{GPU: 1, Device: "gpu-1-mig-0", User: "claim ns/c"}
	dra := e.follow(miggate.FrontEndDRA, owning("mig-static", 0, 1), busy)
	dp := e.follow(miggate.FrontEndDevicePlugin, owning("mig-static", 2, 3, 4, 5, 6, 7))
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	done := e.stepAsync(m)
	waitFor(t, "the DRA driver handed the holds", func() bool {
		for _, ch := range dra.seen() {
			if ch.Plan != nil && ch.Plan.Config == "mixed-01" && ch.Plan.State == miggate.StatePending {
				return slices.Equal(slices.Sorted(maps.Keys(ch.Holds)), []int{0, 1})
			}
		}
		return false
	})
	waitFor(t, "the wait for the busy device", func() bool {
		return len(e.events.find(migmanager.ReasonWaiting, busy.String())) > 0
	})
	time.Sleep(30 * time.Millisecond)
	notDone(t, done, "busy device")
	dra.setBusy()
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	waitFor(t, "the DRA driver told to re-read GPUs 0 and 1", func() bool {
		chs := dra.seen()
		last := chs[len(chs)-1]
		return last.Plan != nil && last.Plan.State == miggate.StateSuccess && len(last.Holds) == 0 && slices.Equal(last.Rescan, []int{0, 1})
	})
	for _, ch := range dp.seen() {
		for g := 2; g < nGPUs; g++ {
			if _, ok := ch.Holds[g]; ok {
				t.Errorf("untouched GPU %d held: %v", g, ch.Holds)
			}
		}
	}
	for _, ev := range e.events.find(migmanager.ReasonWaiting) {
		if strings.Contains(ev.Message, miggate.FrontEndDevicePlugin) {
			t.Errorf("waited for the device plugin, which owns no touched GPU: %q", ev.Message)
		}
	}
}

// A change of MIG mode holds every device of the GPU; a front end that does not own the GPU, an ack
// of another boot and a stale ack do not hold the change up.
func TestModeChangeHoldsAll(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	m := e.manager(func(o *migmanager.Options) {
		o.AckStaleAfter = time.Minute
		o.StartupGrace = 20 * time.Millisecond // the old-boot and stale acks never answer again
	})
	// DRA owns GPU 7 and has not acknowledged anything; the device plugin owns GPU 0.
	e.ackAs(miggate.FrontEndDRA, 0, owning("whole", 7))
	e.ack(0, owning("whole", 0), miggate.Busy{GPU: 0, Device: "gpu-0"})
	// Neither of these speaks for a running front end.
	if err := e.gate.WriteAck(&miggate.Ack{FrontEnd: "old-boot", BootID: "another-boot", GPUs: owning("whole", 1), Heartbeat: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := e.gate.WriteAck(&miggate.Ack{FrontEnd: "stale", BootID: e.boot, GPUs: owning("whole", 2), Heartbeat: time.Now().Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	done := e.stepAsync(m)
	var p *miggate.Plan
	waitFor(t, "the pending plan", func() bool {
		p, _ = e.gate.ReadPlan()
		return p != nil && p.State == miggate.StatePending
	})
	want := map[int]miggate.Hold{}
	for g := range nGPUs {
		want[g] = miggate.Hold{All: true}
	}
	if !reflect.DeepEqual(p.Holds, want) {
		t.Fatalf("holds %v, want every device of every GPU", p.Holds)
	}
	waitFor(t, "both front ends waited for", func() bool {
		return len(e.events.find(migmanager.ReasonWaiting, "the dra to withdraw", "the device-plugin to withdraw")) > 0
	})
	for _, ev := range e.events.find(migmanager.ReasonWaiting) {
		if strings.Contains(ev.Message, "old-boot") || strings.Contains(ev.Message, "stale") {
			t.Errorf("waits for an ack that does not count: %q", ev.Message)
		}
	}
	e.ackAs(miggate.FrontEndDRA, p.Generation, owning("whole", 7))
	e.ack(p.Generation, owning("whole", 0), miggate.Busy{GPU: 0, Device: "gpu-0"})
	waitFor(t, "only the whole GPU in use waited for", func() bool {
		evs := e.events.find(migmanager.ReasonWaiting)
		last := ""
		if len(evs) > 0 {
			last = evs[len(evs)-1].Message
		}
		return strings.Contains(last, "GPU 0: gpu-0") && !strings.Contains(last, "withdraw")
	})
	notDone(t, done, "whole GPU in use")
	if e.migEnabled(0) || e.nvmlChanges() != 0 {
		t.Fatal("NVML changed while the GPU was in use")
	}
	e.ack(p.Generation, owning("whole", 0))
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	for _, mu := range e.watched.mutations() {
		if h := miggate.HoldsFor(mu.plan, e.boot)[mu.gpu]; !h.All || mu.plan.State != miggate.StateApplying {
			t.Fatalf("%s on GPU %d with hold %+v, plan %s", mu.op, mu.gpu, h, mu.plan.State)
		}
	}
}

// The selection changes while a change waits: it starts over with the new selection.
func TestSupersededWhileWaiting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	p1 := e.applyBase(m)
	calls := e.nvmlChanges()
	e.ack(p1.Generation, owning("mig-static", allGPUs()...))
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	done := e.stepAsync(m)
	waitFor(t, "the pending plan", func() bool {
		p, _ := e.gate.ReadPlan()
		return p != nil && p.Config == "mixed-01" && p.State == miggate.StatePending
	})
	// Back to the layout the GPUs have: nothing to hold, nothing to change.
	e.labels.set(migmanager.LabelConfig, "all-3g.40gb")
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	p := e.plan()
	if p.Config != "all-3g.40gb" || p.State != miggate.StateSuccess || p.Generation != p1.Generation+2 || len(p.Changed) != 0 || len(p.Holds) != 0 {
		t.Errorf("plan %+v", p)
	}
	if n := e.nvmlChanges() - calls; n != 0 {
		t.Errorf("%d NVML changes", n)
	}
	for g := range nGPUs {
		if !slices.Equal(e.layout(g), base) {
			t.Errorf("GPU %d changed", g)
		}
	}
	// The next Step sees the inputs it applied: nothing to do.
	n := len(e.states.all())
	e.step(m)
	if len(e.states.all()) != n {
		t.Errorf("Step after a superseded change ran again: %q", e.states.all()[n:])
	}
}

// 4. Busy never clears: the change fails at the drain timeout naming the device, nothing changed,
// no holds; it is not retried before the retry interval; then, with the device released, it is
// tried again and succeeds.
func TestDrainTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const drain, retry = 100 * time.Millisecond, time.Second
	m := e.manager(func(o *migmanager.Options) {
		o.DrainTimeout = drain
		o.RetryInterval = retry
	})
	p1 := e.applyBase(m)
	before, calls, nStates := e.layouts8(), e.nvmlChanges(), len(e.states.all())
	busy := miggate.Busy{GPU: 1, Device: "nvidia.com/mig-3g.40gb:gpu-1-mig-0", User: "pod ml/trainer"}
	// The front end has applied the next generation's holds, but a held device stays in use.
	e.ack(p1.Generation+1, owning("mig-static", allGPUs()...), busy)
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	start := time.Now()
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("Step = %q, want failed", st)
	}
	failedAt := time.Now()
	if el := time.Since(start); el < drain {
		t.Errorf("failed after %s, before the drain timeout", el)
	}
	if got := e.states.all()[nStates:]; !slices.Equal(got, []string{"pending", "failed"}) {
		t.Errorf("states %q", got)
	}
	evs := e.events.find(migmanager.ReasonFailed, busy.String(), "drain-timeout", "mixed-01")
	if len(evs) != 1 || evs[0].Type != "Warning" {
		t.Fatalf("no Warning MIGConfigFailed naming the device and --drain-timeout: %+v", e.events.all())
	}
	if len(e.events.find(migmanager.ReasonWaiting, busy.String())) != 1 {
		t.Errorf("no MIGConfigWaiting naming the device: %+v", e.events.all())
	}
	if n := e.nvmlChanges() - calls; n != 0 {
		t.Errorf("%d NVML changes after a drain timeout", n)
	}
	if got := e.layouts8(); !reflect.DeepEqual(got, before) {
		t.Errorf("layout changed after a drain timeout")
	}
	p := e.plan()
	if p.State != miggate.StateFailed || len(p.Holds) != 0 || len(miggate.HoldsFor(p, e.boot)) != 0 || !strings.Contains(p.Message, busy.Device) {
		t.Errorf("failed plan %+v", p)
	}

	// Not retried before the retry interval.
	n := len(e.states.all())
	if st := e.step(m); st != miggate.StateFailed {
		t.Errorf("Step = %q", st)
	}
	if len(e.states.all()) != n {
		t.Errorf("retried at once: %q", e.states.all()[n:])
	}
	// Released; after the retry interval it is tried again (a new generation) and succeeds.
	e.ack(p.Generation+1, owning("mig-static", allGPUs()...))
	time.Sleep(time.Until(failedAt.Add(retry + 10*time.Millisecond)))
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("retry: %q; events %+v", st, e.events.all())
	}
	if got := e.layout(1); len(got) != 4 || !slices.Contains(got, "3g.40gb@4") {
		t.Errorf("GPU 1 after retry: %v", got)
	}
	if e.states.last() != "success" || e.plan().Generation != p.Generation+1 {
		t.Errorf("state %q, plan %+v", e.states.last(), e.plan())
	}
}

// BUG: RetryInterval is counted from the start of the failed try, not from its failure. A drain
// timeout at least as long as the retry interval (the defaults are 10m and 1m) is therefore retried
// at the very next step: the state label flips failed → pending within a poll and the devices are
// withdrawn again at once, although the failure said "the current layout stays and keeps serving".
func TestRetryIntervalCountsFromFailure(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager(func(o *migmanager.Options) {
		o.DrainTimeout = 150 * time.Millisecond
		o.RetryInterval = 100 * time.Millisecond // shorter than the drain timeout, as by default
	})
	p1 := e.applyBase(m)
	e.ack(p1.Generation+1, owning("mig-static", allGPUs()...), miggate.Busy{GPU: 0, Device: "gpu-0-mig-0"})
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("Step = %q, want failed", st)
	}
	n := len(e.states.all())
	failedAt := time.Now()
	e.step(m) // right after the failure
	gap := time.Since(failedAt)
	if got := e.states.all()[n:]; len(got) > 0 {
		t.Fatalf("retried by the step right after the failure, within RetryInterval (100ms): states %q (the retry took %s)",
			got, gap.Round(time.Millisecond))
	}
}

// Stopping the manager while it waits fails the change and releases the holds.
func TestCancelWhileWaiting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	p1 := e.applyBase(m)
	e.ack(p1.Generation, owning("mig-static", allGPUs()...))
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan miggate.State, 1)
	go func() { done <- m.Step(ctx) }()
	waitFor(t, "the pending plan", func() bool {
		p, _ := e.gate.ReadPlan()
		return p != nil && p.State == miggate.StatePending
	})
	cancel()
	if st := result(t, done); st != miggate.StateFailed {
		t.Fatalf("Step = %q", st)
	}
	if p := e.plan(); p.State != miggate.StateFailed || len(p.Holds) != 0 {
		t.Errorf("plan after cancel %+v", p)
	}
	for g := range nGPUs {
		if !slices.Equal(e.layout(g), base) {
			t.Errorf("GPU %d changed", g)
		}
	}
}

// 5. A label naming a layout the file lacks, an invalid file, a missing file: failed, nothing
// changed; fixing them succeeds.
func TestBadLayouts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "nope")
	m := e.manager()
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("Step = %q", st)
	}
	e.assertStates("pending", "failed")
	evs := e.events.find(migmanager.ReasonFailed, `"nope"`, migmanager.LabelConfig, "all-1g.10gb", "all-3g.40gb", "mixed-01", "all-disabled")
	if len(evs) != 1 || evs[0].Type != "Warning" {
		t.Fatalf("failure event does not name the label and list the layouts: %+v", e.events.all())
	}
	if p := e.plan(); p.State != miggate.StateFailed || p.Config != "nope" || len(p.Holds) != 0 || len(p.Managed) != 0 {
		t.Errorf("plan %+v", p)
	}
	if e.nvmlChanges() != 0 {
		t.Error("a missing layout changed NVML")
	}
	// Not retried while nothing changes.
	e.step(m)
	e.assertStates("pending", "failed")

	// An invalid file.
	e.labels.set(migmanager.LabelConfig, "all-3g.40gb")
	if err := os.WriteFile(e.layouts, []byte("version: v1\nmig-configs: [oops\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("invalid YAML: Step = %q", st)
	}
	if evs := e.events.find(migmanager.ReasonFailed, e.layouts); len(evs) != 1 {
		t.Fatalf("failure event does not name the file: %+v", e.events.all())
	}
	if p := e.plan(); p.State != miggate.StateFailed || !strings.Contains(p.Message, e.layouts) {
		t.Errorf("plan %+v", p)
	}
	// A missing file.
	if err := os.Remove(e.layouts); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("missing file: Step = %q", st)
	}
	if evs := e.events.find(migmanager.ReasonFailed, e.layouts); len(evs) != 2 {
		t.Fatalf("failure event does not name the missing file: %+v", e.events.all())
	}
	if e.nvmlChanges() != 0 || e.migEnabled(0) {
		t.Error("a bad layouts file changed NVML")
	}

	// Fixed: the key changes and the layout applies.
	if err := os.WriteFile(e.layouts, []byte(layoutsYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("fixed: Step = %q; events %+v", st, e.events.all())
	}
	for g := range nGPUs {
		if !slices.Equal(e.layout(g), base) {
			t.Errorf("GPU %d: %v", g, e.layout(g))
		}
	}
	e.assertStates("pending", "failed", "pending", "failed", "pending", "failed", "pending", "applying", "success")
}

// A layout selecting a GPU the node lacks fails without touching any GPU.
func TestLayoutForMissingGPU(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "gpu9")
	if err := os.WriteFile(e.layouts, []byte(layoutsYAML+"  gpu9:\n    - devices: [0, 9]\n      mig-enabled: true\n      mig-devices: {\"7g.80gb\": 1}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m := e.manager()
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("Step = %q", st)
	}
	if len(e.events.find(migmanager.ReasonFailed, "GPU 9")) != 1 || e.nvmlChanges() != 0 {
		t.Errorf("events %+v, NVML changes %d", e.events.all(), e.nvmlChanges())
	}
}

// The layouts may be a mounted ConfigMap directory: config.yaml, or its only key.
func TestLayoutsDirectory(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	dir := t.TempDir()
	// Only key, with ConfigMap-style hidden entries that do not count.
	if err := os.WriteFile(filepath.Join(dir, "layouts.yaml"), []byte(layoutsYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "..data"), 0o755); err != nil {
		t.Fatal(err)
	}
	m := e.manager(func(o *migmanager.Options) { o.Layouts = dir })
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("single key: Step = %q; events %+v", st, e.events.all())
	}
	// Two keys and no config.yaml: ambiguous.
	if err := os.WriteFile(filepath.Join(dir, "other.yaml"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateFailed {
		t.Fatalf("two keys: Step = %q", st)
	}
	if len(e.events.find(migmanager.ReasonFailed, migmanager.LayoutsKey, "layouts.yaml", "other.yaml")) != 1 {
		t.Errorf("events %+v", e.events.all())
	}
	// config.yaml wins.
	if err := os.WriteFile(filepath.Join(dir, migmanager.LayoutsKey), []byte(strings.Replace(layoutsYAML, `{"3g.40gb": 2}`, `{"3g.40gb": 1}`, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("config.yaml: Step = %q; events %+v", st, e.events.all())
	}
	if got := e.layout(0); len(got) != 1 || countProfile(got, "3g.40gb") != 1 {
		t.Errorf("GPU 0 %v, want one 3g.40gb from config.yaml", got)
	}
}

// 6. GPUs a front end serves as mig-dynamic, or whose profile names a layout of its own, are left
// alone, with an Event; "existing" does not count as a layout of its own.
func TestSkips(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	e.ackAs(miggate.FrontEndDRA, 0, map[int]miggate.GPUOwnership{0: {Mode: "mig-dynamic"}})
	// The device plugin (following the plan) owns GPU 2, which the change holds.
	dp := map[int]miggate.GPUOwnership{1: {Mode: "mig-static", Layout: "all-1g.10gb"}, 2: {Mode: "mig-static", Layout: "existing"}}
	e.follow(miggate.FrontEndDevicePlugin, dp)
	m := e.manager()
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	for g := range 2 {
		if e.migEnabled(g) || len(e.layout(g)) != 0 {
			t.Errorf("skipped GPU %d touched: MIG %v, %v", g, e.migEnabled(g), e.layout(g))
		}
	}
	for g := 2; g < nGPUs; g++ {
		if !slices.Equal(e.layout(g), base) {
			t.Errorf("GPU %d: %v", g, e.layout(g))
		}
	}
	p := e.plan()
	if !slices.Equal(p.Managed, []int{2, 3, 4, 5, 6, 7}) || !slices.Equal(p.Changed, []int{2, 3, 4, 5, 6, 7}) {
		t.Errorf("plan managed %v changed %v", p.Managed, p.Changed)
	}
	if len(e.events.find(migmanager.ReasonSkipped, "GPU 0", "mig-dynamic", "dra")) != 1 {
		t.Errorf("no skip event for GPU 0: %+v", e.events.all())
	}
	if len(e.events.find(migmanager.ReasonSkipped, "GPU 1", "all-1g.10gb", "device-plugin")) != 1 {
		t.Errorf("no skip event for GPU 1: %+v", e.events.all())
	}
	if n := len(e.events.find(migmanager.ReasonSkipped)); n != 2 {
		t.Errorf("%d skip events, want 2: %+v", n, e.events.all())
	}
	for _, mu := range e.watched.mutations() {
		if mu.gpu < 2 {
			t.Fatalf("%s on skipped GPU %d", mu.op, mu.gpu)
		}
	}

	// The next change (mixed-01 touches only GPUs 0 and 1): both still skipped, not announced again,
	// and nothing else changes.
	calls := e.nvmlChanges()
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	e.ackAs(miggate.FrontEndDRA, 0, map[int]miggate.GPUOwnership{0: {Mode: "mig-dynamic"}})
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	if n := len(e.events.find(migmanager.ReasonSkipped)); n != 2 {
		t.Errorf("skips announced again: %+v", e.events.all())
	}
	if e.nvmlChanges() != calls || e.migEnabled(0) || e.migEnabled(1) {
		t.Error("the second change touched a GPU")
	}
	if p := e.plan(); !slices.Equal(p.Managed, []int{2, 3, 4, 5, 6, 7}) || len(p.Changed) != 0 {
		t.Errorf("plan %+v", p)
	}
}

// A stale ack does not make the manager skip a GPU.
func TestStaleAckDoesNotSkip(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	if err := e.gate.WriteAck(&miggate.Ack{FrontEnd: miggate.FrontEndDRA, BootID: e.boot, GPUs: map[int]miggate.GPUOwnership{0: {Mode: "mig-dynamic"}}, Heartbeat: time.Now().Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	m := e.manager(func(o *migmanager.Options) { o.StartupGrace = 20 * time.Millisecond })
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	if !slices.Equal(e.layout(0), base) || len(e.events.find(migmanager.ReasonSkipped)) != 0 {
		t.Errorf("GPU 0 skipped on a stale ack: %v %+v", e.layout(0), e.events.all())
	}
}

// The first change waits (up to StartupGrace) for front ends that answered before to answer in
// this boot, so that it knows their mig-dynamic GPUs; later changes do not wait.
func TestAwaitFrontEndsAtStart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	dynamic := map[int]miggate.GPUOwnership{0: {Mode: "mig-dynamic"}}
	earlier := &miggate.Ack{FrontEnd: miggate.FrontEndDRA, BootID: "earlier-boot", GPUs: dynamic, Heartbeat: time.Now()}
	// The DRA driver answered in an earlier boot.
	if err := e.gate.WriteAck(earlier); err != nil {
		t.Fatal(err)
	}
	m := e.manager(func(o *migmanager.Options) { o.StartupGrace = time.Hour })
	done := e.stepAsync(m)
	waitFor(t, "the pending state", func() bool { return e.states.last() == "pending" })
	time.Sleep(50 * time.Millisecond)
	notDone(t, done, "DRA has not answered in this boot")
	if e.nvmlChanges() != 0 {
		t.Fatal("NVML changed before the front ends answered")
	}
	if p, _ := e.gate.ReadPlan(); p != nil && len(p.Managed) > 0 {
		t.Fatalf("plan decided before the front ends answered: %+v", p)
	}
	e.ackAs(miggate.FrontEndDRA, 0, dynamic)
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
	if e.migEnabled(0) || !slices.Equal(e.layout(1), base) {
		t.Errorf("GPU 0 (mig-dynamic) touched or GPU 1 not: %v %v", e.layout(0), e.layout(1))
	}
	if len(e.events.find(migmanager.ReasonSkipped, "GPU 0", "mig-dynamic")) != 1 {
		t.Errorf("events %+v", e.events.all())
	}

	// Later changes do not wait for a front end that stops answering.
	if err := e.gate.WriteAck(earlier); err != nil {
		t.Fatal(err)
	}
	e.labels.set(migmanager.LabelConfig, "all-disabled")
	if st := e.step(m); st != miggate.StateSuccess { // e.step gives up after 10s
		t.Fatalf("second change: %q", st)
	}
	if e.migEnabled(1) {
		t.Error("all-disabled left MIG on")
	}
}

// A front end that never answers again costs StartupGrace once; then the manager goes on without it.
func TestAwaitFrontEndsGrace(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	if err := e.gate.WriteAck(&miggate.Ack{FrontEnd: miggate.FrontEndDRA, BootID: "earlier-boot", GPUs: owning("mig-dynamic", 0), Heartbeat: time.Now()}); err != nil {
		t.Fatal(err)
	}
	const grace = 100 * time.Millisecond
	m := e.manager(func(o *migmanager.Options) { o.StartupGrace = grace })
	start := time.Now()
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	if el := time.Since(start); el < grace {
		t.Errorf("did not wait for the front end (%s)", el)
	}
	if !slices.Equal(e.layout(0), base) {
		t.Error("GPU 0 skipped on an earlier boot's ack")
	}
}

// 7. A reboot keeps MIG mode but not the instances: the front ends hold every managed GPU until the
// restarted manager applies the layout again in the new boot.
func TestReboot(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	before := e.applyBase(m)
	oldBoot := e.boot

	if err := e.node.Reboot(); err != nil {
		t.Fatal(err)
	}
	e.openLib() // the restarted process
	if e.boot == oldBoot {
		t.Fatal("reboot kept the boot ID")
	}
	for g := range nGPUs {
		if !e.migEnabled(g) || len(e.layout(g)) != 0 {
			t.Fatalf("GPU %d after reboot: MIG %v, %v", g, e.migEnabled(g), e.layout(g))
		}
	}
	holds := miggate.HoldsFor(before, e.boot)
	if len(holds) != nGPUs {
		t.Fatalf("HoldsFor(earlier boot) = %v, want every managed GPU", holds)
	}
	for g, h := range holds {
		if !h.All || !slices.Contains(before.Managed, g) {
			t.Errorf("GPU %d hold %+v", g, h)
		}
	}
	// The old boot's plan still holds, as read by a front end of the new boot.
	f := miggate.NewFollower(e.gate.Path, miggate.FrontEndDRA, e.boot)
	if !f.Held(3, true, 0) || !f.Held(3, false, 0) {
		t.Error("a front end of the new boot does not hold GPU 3")
	}

	e.states = &fakeStates{}
	m2 := e.manager()
	if st := e.step(m2); st != miggate.StateSuccess {
		t.Fatalf("Step after reboot = %q; events %+v", st, e.events.all())
	}
	e.assertStates("pending", "applying", "success")
	for g := range nGPUs {
		if !slices.Equal(e.layout(g), base) {
			t.Errorf("GPU %d after re-apply: %v", g, e.layout(g))
		}
	}
	p := e.plan()
	if p.BootID != e.boot || p.State != miggate.StateSuccess || p.Generation <= before.Generation || !slices.Equal(p.Changed, allGPUs()) {
		t.Errorf("plan after reboot %+v (before: generation %d)", p, before.Generation)
	}
	if len(miggate.HoldsFor(p, e.boot)) != 0 {
		t.Errorf("holds after success in the new boot: %v", miggate.HoldsFor(p, e.boot))
	}
	// Its MIG mode survived: no mode change this time.
	if e.raw.Calls(sim.OpSetMigMode) != 0 {
		t.Errorf("SetMigMode called %d times after reboot", e.raw.Calls(sim.OpSetMigMode))
	}
}

// After a reboot the GPUs keep their MIG mode and have no instances to destroy, so a plan built only
// from mode changes and destroyed instances would carry no holds: the manager's first plan of the new
// boot would replace the earlier boot's plan and the front ends would stop holding the managed GPUs
// while their instances are still being created, contrary to "the front ends hold the managed GPUs'
// devices until it reports success in this boot". Every instance must be created while its GPU is
// held whole.
func TestRebootHoldsUntilSuccess(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	before := e.applyBase(e.manager())
	if err := e.node.Reboot(); err != nil {
		t.Fatal(err)
	}
	e.openLib()
	if st := e.step(e.manager()); st != miggate.StateSuccess {
		t.Fatalf("Step after reboot = %q", st)
	}
	creates := 0
	for _, mu := range e.watched.mutations() {
		if mu.op != "CreateGpuInstance" {
			continue
		}
		creates++
		if !slices.Contains(before.Managed, mu.gpu) {
			continue
		}
		if h := miggate.HoldsFor(mu.plan, e.boot)[mu.gpu]; !h.All {
			t.Fatalf("GPU %d: instance at %d created in the new boot while the plan (%s, generation %d) held %v: "+
				"the front ends stopped holding the GPU before the manager succeeded in this boot",
				mu.gpu, mu.start, mu.plan.State, mu.plan.Generation, miggate.HoldsFor(mu.plan, e.boot))
		}
	}
	if creates == 0 {
		t.Fatal("no instances created after the reboot")
	}
}

// 8. No label and no default: idle. The state label is removed once; the plan says success and
// manages nothing (replacing a plan of an earlier boot, so nothing is held).
func TestIdle(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	earlier := &miggate.Plan{Generation: 5, BootID: "an-earlier-boot", Config: "all-3g.40gb", State: miggate.StateSuccess, Managed: allGPUs()}
	if err := e.gate.WritePlan(earlier); err != nil {
		t.Fatal(err)
	}
	m := e.manager()
	for range 3 {
		if st := e.step(m); st != "" {
			t.Fatalf("idle Step = %q", st)
		}
	}
	e.assertStates("")
	p := e.plan()
	if p.BootID != e.boot || p.State != miggate.StateSuccess || len(p.Managed) != 0 || p.Generation != 6 {
		t.Errorf("idle plan %+v", p)
	}
	if h := miggate.HoldsFor(p, e.boot); len(h) != 0 {
		t.Errorf("idle plan holds %v", h)
	}
	if e.nvmlChanges() != 0 || len(e.events.all()) != 0 {
		t.Errorf("idle: %d NVML changes, events %+v", e.nvmlChanges(), e.events.all())
	}

	// A label appears, then goes: MIG is left as it is, the label removed again.
	e.applyBase(m)
	calls := e.nvmlChanges()
	e.labels.set(migmanager.LabelConfig, "")
	if st := e.step(m); st != "" {
		t.Fatalf("Step = %q", st)
	}
	e.assertStates("", "pending", "applying", "success", "")
	if p := e.plan(); len(p.Managed) != 0 || p.State != miggate.StateSuccess || p.Generation != 8 {
		t.Errorf("plan after the label went: %+v", p)
	}
	if e.nvmlChanges() != calls || !slices.Equal(e.layout(0), base) {
		t.Error("MIG changed when the label went")
	}
}

// An idle manager whose plan is already idle in this boot does not rewrite it.
func TestIdleKeepsIdlePlan(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.step(e.manager())
	gen := e.plan().Generation
	m := e.manager() // restarted in the same boot
	e.step(m)
	if p := e.plan(); p.Generation != gen {
		t.Errorf("idle plan rewritten: generation %d, was %d", p.Generation, gen)
	}
}

// Without labels, --default-config selects.
func TestDefaultConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager(func(o *migmanager.Options) { o.Labels = nil; o.DefaultConfig = "all-3g.40gb" })
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	if got := e.layout(7); !slices.Equal(got, base) {
		t.Errorf("GPU 7 %v", got)
	}
	if len(e.events.find(migmanager.ReasonApplied, "--default-config")) != 1 {
		t.Errorf("events %+v", e.events.all())
	}
}

// 9. Drift: an instance destroyed behind the manager's back is recreated at the next resync; without
// drift a resync changes nothing.
func TestDriftResync(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const resync = 30 * time.Millisecond
	m := e.manager(func(o *migmanager.Options) { o.Resync = resync })
	e.applyBase(m)
	calls, nStates := e.nvmlChanges(), len(e.states.all())
	gen := e.plan().Generation

	time.Sleep(resync + 5*time.Millisecond)
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	if e.nvmlChanges() != calls || len(e.states.all()) != nStates || e.plan().Generation != gen {
		t.Fatal("a resync without drift changed something")
	}

	gis, err := e.lib.GpuInstances(3)
	if err != nil || len(gis) != 2 {
		t.Fatalf("GPU 3 instances %v %v", gis, err)
	}
	gi := gis[1]
	for _, ci := range gi.ComputeInstances {
		if err := e.lib.DestroyComputeInstance(3, gi.ID, ci.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.lib.DestroyGpuInstance(3, gi.ID); err != nil {
		t.Fatal(err)
	}
	if len(e.layout(3)) != 1 {
		t.Fatal("instance not destroyed")
	}
	time.Sleep(resync + 5*time.Millisecond)
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step after drift = %q; events %+v", st, e.events.all())
	}
	if !slices.Equal(e.layout(3), base) {
		t.Errorf("GPU 3 not repaired: %v", e.layout(3))
	}
	if got := e.states.all()[nStates:]; !slices.Equal(got, []string{"pending", "applying", "success"}) {
		t.Errorf("states %q", got)
	}
	p := e.plan()
	if p.Generation != gen+1 || !slices.Equal(p.Changed, []int{3}) || len(p.Holds) != 0 {
		t.Errorf("plan after repair %+v", p)
	}
}

// Without Resync, drift is left alone.
func TestNoResync(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	e.applyBase(m)
	gis, _ := e.lib.GpuInstances(1)
	for _, ci := range gis[0].ComputeInstances {
		if err := e.lib.DestroyComputeInstance(1, gis[0].ID, ci.ID); err != nil {
			t.Fatal(err)
		}
	}
	n := len(e.states.all())
	e.step(m)
	if len(e.states.all()) != n {
		t.Error("drift repaired with Resync 0")
	}
}

// A state label that fails to publish is published again on the next step.
func TestStateLabelRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	e.states.fail = "success"
	m := e.manager()
	if st := e.step(m); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
	e.assertStates("pending", "applying")
	e.step(m)
	e.assertStates("pending", "applying", "success")
	e.step(m)
	e.assertStates("pending", "applying", "success")
}

// BUG: the first Step publishes "" (removes the state label) before anything is decided, because
// syncLabel treats "nothing published yet" as different from the zero value it wants. A restarted
// manager thus removes the label a previous run left (e.g. success) and then sets pending: anything
// watching tessera.dev/mig.config.state sees the manager vanish.
func TestStartKeepsStateLabel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "nope") // fails without touching NVML
	e.step(e.manager())
	if got := e.states.all(); len(got) == 0 || got[0] == "" {
		t.Fatalf("state labels %q: the label was removed before the change started", got)
	}
}

// Run follows label changes until its context ends.
func TestRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	e.labels.set(migmanager.LabelConfig, "all-3g.40gb")
	waitFor(t, "success", func() bool { return e.states.last() == "success" })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
	if got := e.layout(0); !slices.Equal(got, base) {
		t.Errorf("GPU 0 %v", got)
	}
}

// BUG: a held device with a process on it makes the dry run refuse the change at once ("in use by
// processes"), before any hold is written: the change fails immediately instead of withdrawing the
// devices and waiting for the workload to end (up to the drain timeout), and the front ends keep
// handing out the devices the change is about to destroy.
func TestProcessOnHeldDeviceWaitsForDrain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := e.manager(func(o *migmanager.Options) { o.DrainTimeout = 5 * time.Second })
	p1 := e.applyBase(m)
	gis, err := e.lib.GpuInstances(0)
	if err != nil {
		t.Fatal(err)
	}
	var gi nvmlib.GpuInstance
	for _, g := range gis {
		if g.Placement.Start == 0 { // the instance mixed-01 destroys
			gi = g
		}
	}
	if err := e.node.AddProcess(0, 4242, 1024, gi.ID, gi.ComputeInstances[0].ID); err != nil {
		t.Fatal(err)
	}
	busy := miggate.Busy{GPU: 0, Device: "gpu-0-mig-0", User: "pod default/train"}
	e.ack(p1.Generation, owning("mig-static", allGPUs()...), busy)
	e.labels.set(migmanager.LabelConfig, "mixed-01")
	done := e.stepAsync(m)

	var p *miggate.Plan
	deadline := time.Now().Add(3 * time.Second)
	for {
		p, _ = e.gate.ReadPlan()
		if p != nil && p.Generation > p1.Generation && p.State == miggate.StatePending && len(p.Holds) > 0 {
			break
		}
		select {
		case st := <-done:
			p := e.plan()
			t.Fatalf("Step returned %q at once instead of withdrawing the devices and waiting for the workload; plan %s: %s",
				st, p.State, p.Message)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no pending plan")
		}
		time.Sleep(2 * time.Millisecond)
	}
	if !miggate.HoldsFor(p, e.boot)[0].Covers(true, gi.Placement.Start) {
		t.Fatalf("the busy instance is not held: %v", p.Holds)
	}
	e.ack(p.Generation, owning("mig-static", allGPUs()...), busy)
	time.Sleep(50 * time.Millisecond)
	notDone(t, done, "process running")
	// The workload ends.
	if err := e.node.EndProcesses(0, 0); err != nil {
		t.Fatal(err)
	}
	e.ack(p.Generation, owning("mig-static", allGPUs()...))
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q; events %+v", st, e.events.all())
	}
}

// BUG: the generation restarts at 1 when the manager starts without a readable plan (plan.json
// deleted, as the corrupt-plan error tells the operator to do), while the front ends' acks still
// carry the generations they acknowledged before. An ack of generation 7 then counts as having
// withdrawn generation 1's holds, and the manager changes the GPUs while the front end still
// advertises their devices.
func TestGenerationAboveAcknowledged(t *testing.T) {
	t.Parallel()
	e := newEnv(t, migmanager.LabelConfig, "all-3g.40gb")
	// A front end that followed an earlier manager up to generation 7; the plan is gone.
	e.ack(7, owning("whole", allGPUs()...))
	m := e.manager()
	done := e.stepAsync(m)
	var p *miggate.Plan
	waitFor(t, "a plan", func() bool {
		p, _ = e.gate.ReadPlan()
		return p != nil
	})
	if p.Generation <= 7 {
		st := result(t, done)
		t.Fatalf("new plan has generation %d, not above the acknowledged 7: the front end's old ack was taken as "+
			"having withdrawn the devices (Step %q, MIG enabled on GPU 0: %v)", p.Generation, st, e.migEnabled(0))
	}
	time.Sleep(40 * time.Millisecond)
	notDone(t, done, "front end has not acknowledged")
	e.ack(p.Generation, owning("whole", allGPUs()...))
	if st := result(t, done); st != miggate.StateSuccess {
		t.Fatalf("Step = %q", st)
	}
}
