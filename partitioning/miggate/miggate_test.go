package miggate_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/miggate"
)

const boot = "boot-1"

// tempFiles lists files the atomic writer may have left behind (".plan.json.*", ".ack-….json.*").
func tempFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out
}

func samplePlan() *miggate.Plan {
	return &miggate.Plan{
		Generation: 7,
		BootID:     boot,
		Config:     "all-1g.10gb",
		State:      miggate.StatePending,
		Message:    "changing",
		Managed:    []int{0, 1, 2},
		Changed:    []int{1, 2},
		Holds:      map[int]miggate.Hold{1: {All: true}, 2: {Placements: []int{0, 4}}},
		Updated:    time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC),
	}
}

func TestPlanRoundTrip(t *testing.T) {
	d := miggate.Dir{Path: filepath.Join(t.TempDir(), "sub", "gate")} // created on write
	want := samplePlan()
	if err := d.WritePlan(want); err != nil {
		t.Fatal(err)
	}
	got, err := d.ReadPlan()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
	}
	// Replacing it keeps one file and no temporaries.
	want.State, want.Holds, want.Generation = miggate.StateSuccess, nil, 8
	if err := d.WritePlan(want); err != nil {
		t.Fatal(err)
	}
	got, err = d.ReadPlan()
	if err != nil {
		t.Fatal(err)
	}
	if got.State != miggate.StateSuccess || got.Generation != 8 || got.Holds != nil {
		t.Fatalf("second write not read back: %+v", got)
	}
	if tmp := tempFiles(t, d.Path); len(tmp) > 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
	ents, _ := os.ReadDir(d.Path)
	if len(ents) != 1 || ents[0].Name() != "plan.json" {
		t.Fatalf("directory holds %v, want only plan.json", ents)
	}
}

func TestReadPlanMissing(t *testing.T) {
	for name, dir := range map[string]string{
		"empty dir":   t.TempDir(),
		"missing dir": filepath.Join(t.TempDir(), "nope"),
	} {
		p, err := miggate.Dir{Path: dir}.ReadPlan()
		if p != nil || err != nil {
			t.Errorf("%s: ReadPlan = %v, %v; want nil, nil", name, p, err)
		}
	}
}

func TestReadPlanCorrupt(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "plan.json"), []byte(`{"generation": 3, "state": `), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := miggate.Dir{Path: dir}.ReadPlan()
	if err == nil || p != nil {
		t.Fatalf("ReadPlan of corrupt JSON = %v, %v; want an error", p, err)
	}
	if !strings.Contains(err.Error(), filepath.Join(dir, "plan.json")) {
		t.Errorf("error does not name the file: %v", err)
	}
}

// TestWritePlanAtomic: a reader never sees a partly written plan while it is replaced.
func TestWritePlanAtomic(t *testing.T) {
	d := miggate.Dir{Path: t.TempDir()}
	big := samplePlan()
	big.Message = strings.Repeat("x", 64<<10) // large enough that a torn read would show
	if err := d.WritePlan(big); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var readErr error
	var reads int
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			p, err := d.ReadPlan()
			if err == nil && p == nil {
				err = fmt.Errorf("plan missing while it is being replaced")
			}
			if err == nil && len(p.Message) != len(big.Message) {
				err = fmt.Errorf("torn plan: message of %d bytes", len(p.Message))
			}
			if err != nil {
				readErr = err
				return
			}
			reads++
		}
	}()
	for i := range 40 { // each write syncs: keep it short
		big.Generation = int64(i)
		if err := d.WritePlan(big); err != nil {
			close(stop)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if readErr != nil {
		t.Fatalf("reader saw a partial plan after %d reads: %v", reads, readErr)
	}
	if reads == 0 {
		t.Fatal("the reader never read while the plan was replaced")
	}
	if tmp := tempFiles(t, d.Path); len(tmp) > 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
}

// TestWriteFailureLeavesNoTemp: when the rename fails the temporary file is removed and the error
// names the target.
func TestWriteFailureLeavesNoTemp(t *testing.T) {
	dir := t.TempDir()
	// plan.json is a non-empty directory: the rename onto it fails.
	if err := os.MkdirAll(filepath.Join(dir, "plan.json", "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := miggate.Dir{Path: dir}.WritePlan(samplePlan())
	if err == nil {
		t.Fatal("WritePlan onto a directory succeeded")
	}
	if !strings.Contains(err.Error(), filepath.Join(dir, "plan.json")) {
		t.Errorf("error does not name the file: %v", err)
	}
	if tmp := tempFiles(t, dir); len(tmp) > 0 {
		t.Fatalf("temporary files left after a failed write: %v", tmp)
	}
}

func TestAcks(t *testing.T) {
	d := miggate.Dir{Path: t.TempDir()}
	hb := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	a := &miggate.Ack{FrontEnd: miggate.FrontEndDRA, BootID: boot, Generation: 4,
		GPUs: map[int]miggate.GPUOwnership{0: {Mode: "mig-static"}, 3: {Mode: "mig-static", Layout: "all-3g.40gb"}},
		Busy: []miggate.Busy{{GPU: 0, Device: "gpu-0-mig-1g10gb-0", User: "claim ns/c"}}, Heartbeat: hb}
	b := &miggate.Ack{FrontEnd: miggate.FrontEndDevicePlugin, BootID: boot, Generation: 2, Heartbeat: hb}
	for _, x := range []*miggate.Ack{a, b} {
		if err := d.WriteAck(x); err != nil {
			t.Fatal(err)
		}
	}
	for _, bad := range []string{"", "../evil", `a\b`} {
		if err := d.WriteAck(&miggate.Ack{FrontEnd: bad}); err == nil {
			t.Errorf("WriteAck accepted front end name %q", bad)
		}
	}
	// Unrelated files are ignored; the plan is not an ack.
	if err := d.WritePlan(samplePlan()); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.Path, "notes.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	acks, err := d.ReadAcks()
	if err != nil {
		t.Fatal(err)
	}
	if len(acks) != 2 || !reflect.DeepEqual(acks[miggate.FrontEndDRA], a) || !reflect.DeepEqual(acks[miggate.FrontEndDevicePlugin], b) {
		t.Fatalf("ReadAcks = %+v", acks)
	}
	if tmp := tempFiles(t, d.Path); len(tmp) > 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}

	// A corrupt ack is reported by name, and the others are still returned.
	if err := os.WriteFile(filepath.Join(d.Path, "ack-broken.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	acks, err = d.ReadAcks()
	if err == nil || !strings.Contains(err.Error(), "ack-broken.json") {
		t.Errorf("corrupt ack: err = %v, want one naming ack-broken.json", err)
	}
	if len(acks) != 2 {
		t.Errorf("corrupt ack hid the good ones: %v", acks)
	}

	// No directory: no acks, no error.
	acks, err = miggate.Dir{Path: filepath.Join(d.Path, "missing")}.ReadAcks()
	if err != nil || len(acks) != 0 {
		t.Errorf("ReadAcks of a missing dir = %v, %v", acks, err)
	}
}

func TestAckFreshAndBusyString(t *testing.T) {
	now := time.Now()
	a := miggate.Ack{Heartbeat: now.Add(-10 * time.Second)}
	if !a.Fresh(now, 30*time.Second) {
		t.Error("10s-old ack is not fresh with a 30s limit")
	}
	if a.Fresh(now, 5*time.Second) {
		t.Error("10s-old ack is fresh with a 5s limit")
	}
	// The wording may change; what it names may not.
	s := (miggate.Busy{GPU: 2, Device: "gpu-2-mig-1", User: "pod ns/p"}).String()
	for _, want := range []string{"GPU 2", "gpu-2-mig-1", "pod ns/p"} {
		if !strings.Contains(s, want) {
			t.Errorf("Busy.String = %q lacks %q", s, want)
		}
	}
	if s := (miggate.Busy{GPU: 2, Device: "gpu-2-mig-1"}).String(); !strings.Contains(s, "GPU 2") || !strings.Contains(s, "gpu-2-mig-1") || strings.Contains(s, "()") {
		t.Errorf("Busy.String without user = %q", s)
	}
}

func TestHoldsFor(t *testing.T) {
	holds := map[int]miggate.Hold{1: {All: true}, 2: {Placements: []int{0, 4}}}
	plan := func(state miggate.State, bootID string) *miggate.Plan {
		return &miggate.Plan{Generation: 3, BootID: bootID, State: state, Managed: []int{0, 1, 2}, Holds: holds}
	}
	all := map[int]miggate.Hold{0: {All: true}, 1: {All: true}, 2: {All: true}}
	for _, tc := range []struct {
		name string
		plan *miggate.Plan
		want map[int]miggate.Hold
	}{
		{"no plan", nil, nil},
		{"pending", plan(miggate.StatePending, boot), holds},
		{"applying", plan(miggate.StateApplying, boot), holds},
		{"success", plan(miggate.StateSuccess, boot), nil},
		{"failed", plan(miggate.StateFailed, boot), nil},
		{"earlier boot, success", plan(miggate.StateSuccess, "boot-0"), all},
		{"earlier boot, pending", plan(miggate.StatePending, "boot-0"), all},
		{"earlier boot, failed", plan(miggate.StateFailed, "boot-0"), all},
	} {
		got := miggate.HoldsFor(tc.plan, boot)
		if len(got) != len(tc.want) || (len(tc.want) > 0 && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("%s: HoldsFor = %v, want %v", tc.name, got, tc.want)
		}
	}
	// The returned map is the caller's: changing it does not change the plan.
	p := plan(miggate.StatePending, boot)
	got := miggate.HoldsFor(p, boot)
	delete(got, 1)
	if _, ok := p.Holds[1]; !ok {
		t.Error("HoldsFor returned the plan's own map")
	}
	// An earlier boot's plan without managed GPUs holds nothing.
	if got := miggate.HoldsFor(&miggate.Plan{BootID: "boot-0", State: miggate.StateSuccess}, boot); len(got) != 0 {
		t.Errorf("earlier boot, nothing managed: %v", got)
	}
}

func TestHoldCovers(t *testing.T) {
	all := miggate.Hold{All: true}
	some := miggate.Hold{Placements: []int{0, 4}}
	for _, tc := range []struct {
		h     miggate.Hold
		isMIG bool
		start int
		want  bool
	}{
		{all, false, 0, true},
		{all, true, 3, true},
		{some, true, 0, true},
		{some, true, 4, true},
		{some, true, 1, false},
		{some, false, 0, false}, // the whole GPU is not a held MIG device
		{miggate.Hold{}, true, 0, false},
		{miggate.Hold{}, false, 0, false},
	} {
		if got := tc.h.Covers(tc.isMIG, tc.start); got != tc.want {
			t.Errorf("%+v.Covers(%v, %d) = %v, want %v", tc.h, tc.isMIG, tc.start, got, tc.want)
		}
	}
}

func TestFormatHolds(t *testing.T) {
	if s := miggate.FormatHolds(nil); s != "nothing" {
		t.Errorf("FormatHolds(nil) = %q", s)
	}
	s := miggate.FormatHolds(map[int]miggate.Hold{3: {Placements: []int{0, 4}}, 1: {All: true}})
	if want := "GPU 1: every device; GPU 3: MIG devices at placements 0,4"; s != want {
		t.Errorf("FormatHolds = %q, want %q", s, want)
	}
}

func TestPlanActive(t *testing.T) {
	for st, want := range map[miggate.State]bool{miggate.StatePending: true, miggate.StateApplying: true, miggate.StateSuccess: false, miggate.StateFailed: false, "": false} {
		if got := (&miggate.Plan{State: st}).Active(); got != want {
			t.Errorf("Active(%q) = %v", st, got)
		}
	}
}

// --- Follower ---

// frontEnd is a fake front end: it records every Change and reports what the test sets.
type frontEnd struct {
	mu      sync.Mutex
	changes []miggate.Change
	reports []map[int]miggate.Hold
	gpus    map[int]miggate.GPUOwnership
	busy    []miggate.Busy
}

func (f *frontEnd) apply(_ context.Context, ch miggate.Change) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changes = append(f.changes, ch)
}

func (f *frontEnd) report(h map[int]miggate.Hold) (map[int]miggate.GPUOwnership, []miggate.Busy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reports = append(f.reports, h)
	return f.gpus, slices.Clone(f.busy)
}

func (f *frontEnd) setBusy(b ...miggate.Busy) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.busy = b
}

func (f *frontEnd) nChanges() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.changes)
}

func (f *frontEnd) last() miggate.Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changes[len(f.changes)-1]
}

func readAck(t *testing.T, d miggate.Dir, fe string) *miggate.Ack {
	t.Helper()
	acks, err := d.ReadAcks()
	if err != nil {
		t.Fatal(err)
	}
	return acks[fe]
}

func TestFollowerStep(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	fe := &frontEnd{gpus: map[int]miggate.GPUOwnership{0: {Mode: "mig-static"}, 1: {Mode: "mig-static"}, 2: {Mode: "whole"}}}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDevicePlugin, boot)
	if f.Dir() != d.Path {
		t.Errorf("Dir = %q", f.Dir())
	}
	if len(f.Holds()) != 0 {
		t.Fatalf("holds without a plan: %v", f.Holds())
	}

	// No plan: nothing to apply, but the front end says what it owns.
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 0 {
		t.Fatalf("apply called without a plan: %+v", fe.changes)
	}
	a := readAck(t, d, miggate.FrontEndDevicePlugin)
	if a == nil || a.Generation != 0 || a.BootID != boot || !reflect.DeepEqual(a.GPUs, fe.gpus) {
		t.Fatalf("first ack = %+v", a)
	}

	// A pending plan: holds are applied, then acknowledged with the generation and what is busy.
	holds := map[int]miggate.Hold{0: {Placements: []int{0, 1}}, 1: {All: true}}
	plan := &miggate.Plan{Generation: 5, BootID: boot, Config: "c", State: miggate.StatePending, Managed: []int{0, 1}, Changed: []int{0, 1}, Holds: holds}
	if err := d.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	busy := miggate.Busy{GPU: 0, Device: "gpu-0-mig-0", User: "pod a"}
	fe.setBusy(busy)
	before := time.Now()
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 1 {
		t.Fatalf("apply called %d times, want 1", fe.nChanges())
	}
	ch := fe.last()
	if !reflect.DeepEqual(ch.Holds, holds) || ch.Rescan != nil || ch.Plan == nil || ch.Plan.Generation != 5 {
		t.Fatalf("pending change = %+v", ch)
	}
	if !reflect.DeepEqual(f.Holds(), holds) {
		t.Fatalf("Holds = %v", f.Holds())
	}
	if !f.Held(0, true, 1) || f.Held(0, true, 2) || f.Held(0, false, 0) || !f.Held(1, false, 0) || f.Held(2, false, 0) {
		t.Error("Held does not follow the holds")
	}
	a = readAck(t, d, miggate.FrontEndDevicePlugin)
	if a.Generation != 5 || !reflect.DeepEqual(a.Busy, []miggate.Busy{busy}) || a.Heartbeat.Before(before) || !reflect.DeepEqual(a.GPUs, fe.gpus) {
		t.Fatalf("ack of the pending plan = %+v", a)
	}
	if got := fe.reports[len(fe.reports)-1]; !reflect.DeepEqual(got, holds) {
		t.Errorf("reporter got holds %v", got)
	}

	// Nothing changed: no apply, no new ack.
	hb := a.Heartbeat
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 1 {
		t.Fatal("apply called again without a change")
	}
	if a = readAck(t, d, miggate.FrontEndDevicePlugin); !a.Heartbeat.Equal(hb) {
		t.Fatalf("ack rewritten without a change: %+v", a)
	}

	// Busy changes while the plan is active: acknowledged again at once, without apply.
	fe.setBusy()
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 1 {
		t.Fatal("apply called for a change of busy devices")
	}
	a = readAck(t, d, miggate.FrontEndDevicePlugin)
	if a.Generation != 5 || len(a.Busy) != 0 || !a.Heartbeat.After(hb) {
		t.Fatalf("ack after busy cleared = %+v", a)
	}

	// Applying: a new change (same holds), acknowledged.
	plan.State = miggate.StateApplying
	if err := d.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 2 || !reflect.DeepEqual(fe.last().Holds, holds) || fe.last().Rescan != nil {
		t.Fatalf("applying change = %+v", fe.last())
	}

	// Success: holds released; the previously held GPUs and the changed ones are read again.
	plan.State, plan.Holds, plan.Changed = miggate.StateSuccess, nil, []int{1, 3}
	if err := d.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	hb = readAck(t, d, miggate.FrontEndDevicePlugin).Heartbeat
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 3 {
		t.Fatalf("apply called %d times, want 3", fe.nChanges())
	}
	ch = fe.last()
	if len(ch.Holds) != 0 || !reflect.DeepEqual(ch.Rescan, []int{0, 1, 3}) || ch.Plan.State != miggate.StateSuccess {
		t.Fatalf("success change = %+v, want no holds and rescan [0 1 3]", ch)
	}
	if len(f.Holds()) != 0 || f.Held(1, false, 0) {
		t.Errorf("holds after success: %v", f.Holds())
	}
	a = readAck(t, d, miggate.FrontEndDevicePlugin)
	if !a.Heartbeat.After(hb) || a.Generation != 5 {
		t.Fatalf("no ack after success: %+v", a)
	}

	// Idle within the heartbeat: nothing happens.
	hb = a.Heartbeat
	fe.setBusy(busy) // not reported until the heartbeat is due
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 3 || !readAck(t, d, miggate.FrontEndDevicePlugin).Heartbeat.Equal(hb) {
		t.Fatal("idle step applied or acknowledged")
	}
}

func TestFollowerHeartbeat(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	if err := d.WritePlan(&miggate.Plan{Generation: 2, BootID: boot, State: miggate.StateSuccess}); err != nil {
		t.Fatal(err)
	}
	fe := &frontEnd{}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot, miggate.WithInterval(time.Millisecond, 20*time.Millisecond))
	f.Step(ctx, fe.apply, fe.report)
	a := readAck(t, d, miggate.FrontEndDRA)
	if a == nil {
		t.Fatal("no first ack")
	}
	if fe.nChanges() != 0 {
		t.Fatalf("apply called for the plan read at start: %+v", fe.changes)
	}
	time.Sleep(25 * time.Millisecond)
	f.Step(ctx, fe.apply, fe.report)
	b := readAck(t, d, miggate.FrontEndDRA)
	if !b.Heartbeat.After(a.Heartbeat) {
		t.Fatalf("heartbeat not renewed: %v then %v", a.Heartbeat, b.Heartbeat)
	}
	if fe.nChanges() != 0 {
		t.Fatal("heartbeat called apply")
	}
}

// TestFollowerActiveAtStart: a front end that starts while a plan is active holds its devices before
// Run and acknowledges that generation on its first step without a new apply.
func TestFollowerActiveAtStart(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	holds := map[int]miggate.Hold{4: {Placements: []int{4}}}
	if err := d.WritePlan(&miggate.Plan{Generation: 9, BootID: boot, State: miggate.StatePending, Managed: []int{4}, Holds: holds}); err != nil {
		t.Fatal(err)
	}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot)
	if !reflect.DeepEqual(f.Holds(), holds) || !f.Held(4, true, 4) {
		t.Fatalf("holds at start = %v", f.Holds())
	}
	fe := &frontEnd{}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 0 {
		t.Fatalf("apply called: %+v", fe.changes)
	}
	if a := readAck(t, d, miggate.FrontEndDRA); a == nil || a.Generation != 9 {
		t.Fatalf("ack = %+v, want generation 9", a)
	}
}

// TestFollowerEarlierBoot: a plan of an earlier boot holds every managed GPU until the manager
// succeeds in this boot; then the held GPUs are read again.
func TestFollowerEarlierBoot(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	if err := d.WritePlan(&miggate.Plan{Generation: 3, BootID: "boot-0", State: miggate.StateSuccess, Managed: []int{1, 2}, Changed: []int{1}}); err != nil {
		t.Fatal(err)
	}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot)
	if want := map[int]miggate.Hold{1: {All: true}, 2: {All: true}}; !reflect.DeepEqual(f.Holds(), want) {
		t.Fatalf("holds = %v, want %v", f.Holds(), want)
	}
	if !f.Held(1, false, 0) || !f.Held(2, true, 3) || f.Held(0, false, 0) {
		t.Error("Held does not follow the earlier boot's plan")
	}
	fe := &frontEnd{}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 0 {
		t.Fatal("apply called without a change")
	}
	// The manager applies again in this boot and succeeds (GPU 2 only changed).
	if err := d.WritePlan(&miggate.Plan{Generation: 4, BootID: boot, State: miggate.StateSuccess, Managed: []int{1, 2}, Changed: []int{2}}); err != nil {
		t.Fatal(err)
	}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 1 {
		t.Fatalf("apply called %d times", fe.nChanges())
	}
	if ch := fe.last(); len(ch.Holds) != 0 || !reflect.DeepEqual(ch.Rescan, []int{1, 2}) {
		t.Fatalf("change = %+v, want holds released and rescan [1 2]", ch)
	}
}

// TestFollowerCorruptPlan: an unreadable plan keeps the holds as they are and calls nothing.
func TestFollowerCorruptPlan(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	holds := map[int]miggate.Hold{0: {All: true}}
	if err := d.WritePlan(&miggate.Plan{Generation: 1, BootID: boot, State: miggate.StatePending, Managed: []int{0}, Holds: holds}); err != nil {
		t.Fatal(err)
	}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot)
	if err := os.WriteFile(filepath.Join(d.Path, "plan.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	fe := &frontEnd{}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 0 || !reflect.DeepEqual(f.Holds(), holds) {
		t.Fatalf("corrupt plan changed the holds: %v (changes %d)", f.Holds(), fe.nChanges())
	}
	// The plan disappears (no manager any more): holds released, the held GPU read again.
	if err := os.Remove(filepath.Join(d.Path, "plan.json")); err != nil {
		t.Fatal(err)
	}
	f.Step(ctx, fe.apply, fe.report)
	if fe.nChanges() != 1 || fe.last().Plan != nil || len(fe.last().Holds) != 0 || !reflect.DeepEqual(fe.last().Rescan, []int{0}) {
		t.Fatalf("plan removed: changes %+v", fe.changes)
	}
}

// TestFollowerRun: Run steps until its context ends.
func TestFollowerRun(t *testing.T) {
	d := miggate.Dir{Path: t.TempDir()}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot, miggate.WithInterval(2*time.Millisecond, time.Hour))
	fe := &frontEnd{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.Run(ctx, fe.apply, fe.report); close(done) }()
	if err := d.WritePlan(&miggate.Plan{Generation: 1, BootID: boot, State: miggate.StatePending, Holds: map[int]miggate.Hold{0: {All: true}}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if a := readAck(t, d, miggate.FrontEndDRA); a != nil && a.Generation == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Run did not acknowledge the plan")
		}
		time.Sleep(2 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
	if fe.nChanges() != 1 {
		t.Errorf("apply called %d times, want 1", fe.nChanges())
	}
}

// The JSON field names are the contract with the other processes.
func TestPlanJSONNames(t *testing.T) {
	data, err := json.Marshal(samplePlan())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`"generation":7`, `"bootID":"boot-1"`, `"state":"pending"`, `"managed":[0,1,2]`, `"changed":[1,2]`, `"holds":{"1":{"all":true},"2":{"placements":[0,4]}}`} {
		if !strings.Contains(string(data), k) {
			t.Errorf("plan JSON lacks %s: %s", k, data)
		}
	}
}

// TestFollowerPoke: between heartbeats a changed ownership is acknowledged only after Poke.
func TestFollowerPoke(t *testing.T) {
	ctx := context.Background()
	d := miggate.Dir{Path: t.TempDir()}
	fe := &frontEnd{gpus: map[int]miggate.GPUOwnership{0: {Mode: "mig-static"}}}
	f := miggate.NewFollower(d.Path, miggate.FrontEndDRA, boot)
	f.Step(ctx, fe.apply, fe.report)
	hb := readAck(t, d, miggate.FrontEndDRA).Heartbeat

	fe.mu.Lock()
	fe.gpus = map[int]miggate.GPUOwnership{0: {Mode: "mig-dynamic"}}
	fe.mu.Unlock()
	f.Step(ctx, fe.apply, fe.report)
	if a := readAck(t, d, miggate.FrontEndDRA); !a.Heartbeat.Equal(hb) || a.GPUs[0].Mode != "mig-static" {
		t.Fatalf("acknowledged before the heartbeat without a poke: %+v", a)
	}
	f.Poke()
	f.Step(ctx, fe.apply, fe.report)
	if a := readAck(t, d, miggate.FrontEndDRA); a.GPUs[0].Mode != "mig-dynamic" || !a.Heartbeat.After(hb) {
		t.Fatalf("poke not acknowledged: %+v", a)
	}
	if fe.nChanges() != 0 {
		t.Errorf("poke called apply: %+v", fe.changes)
	}
	// Once only.
	hb = readAck(t, d, miggate.FrontEndDRA).Heartbeat
	f.Step(ctx, fe.apply, fe.report)
	if a := readAck(t, d, miggate.FrontEndDRA); !a.Heartbeat.Equal(hb) {
		t.Error("a poke acknowledged twice")
	}
}
