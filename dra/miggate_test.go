package dra

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/dynamic-resource-allocation/resourceslice"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// gateEnv is the mixed env (GPUs 0-1 whole, 2-3 mig-static, 4-5 time-sliced, 6-7 device plugin's)
// with a MIG manager handshake directory. Before the driver starts, before() may write a plan (as a
// manager of an earlier boot would have). The follower polls once an hour: the test steps it.
func gateEnv(t *testing.T, before func(dir miggate.Dir, bootID string)) (*env, *miggate.Follower, miggate.Dir) {
	t.Helper()
	lib, node := openSim(t, "dgx-h100")
	applyMIG(t, lib, 2, map[string]int{"1g.10gb": 7})
	applyMIG(t, lib, 3, map[string]int{"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1})
	dir := miggate.Dir{Path: filepath.Join(t.TempDir(), "mig-manager")}
	boot, err := node.BootID()
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(dir, boot)
	}
	f := miggate.NewFollower(dir.Path, miggate.FrontEndDRA, boot, miggate.WithInterval(time.Hour, time.Hour))
	e := newEnv(t, lib, node, mixedProfile, WithMIGGate(f))
	if e.d.BootID() != boot {
		t.Fatalf("driver boot %q, follower boot %q", e.d.BootID(), boot)
	}
	// Run's first step acknowledges; wait for it so the test's steps do not race with it.
	poll(t, "the first ack", func() (bool, error) { return ackOf(t, dir) != nil, nil })
	return e, f, dir
}

func step(e *env, f *miggate.Follower) {
	f.Step(context.Background(), e.d.applyMIGGate, e.d.reportMIGGate)
}

func ackOf(t testing.TB, dir miggate.Dir) *miggate.Ack {
	t.Helper()
	acks, err := dir.ReadAcks()
	if err != nil {
		t.Fatal(err)
	}
	return acks[miggate.FrontEndDRA]
}

// publishedNames lists the devices of published slices, sorted.
func publishedNames(dr resourceslice.DriverResources) []string {
	var out []string
	for _, p := range dr.Pools {
		for _, s := range p.Slices {
			for _, d := range s.Devices {
				out = append(out, d.Name)
			}
		}
	}
	sort.Strings(out)
	return out
}

// migAt returns the name of GPU gpu's MIG device whose instance starts at placement start, from
// NVML (not from the driver's inventory).
func migAt(t testing.TB, lib nvmlib.Interface, gpu, start int) string {
	t.Helper()
	ms, err := lib.MigDevices(gpu)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Placement.Start == start {
			return MIGName(gpu, m.GI, m.CI)
		}
	}
	t.Fatalf("GPU %d has no MIG device at placement %d", gpu, start)
	return ""
}

// startOf returns the placement start of GPU gpu's MIG device of a profile.
func startOf(t testing.TB, lib nvmlib.Interface, gpu int, profile string) int {
	t.Helper()
	ms, err := lib.MigDevices(gpu)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Profile == profile {
			return m.Placement.Start
		}
	}
	t.Fatalf("GPU %d has no %s device", gpu, profile)
	return 0
}

func without(all []string, drop ...string) []string {
	return slices.DeleteFunc(slices.Clone(all), func(s string) bool { return slices.Contains(drop, s) })
}

func TestMIGGateWithdrawsExactlyTheHeldMIGDevices(t *testing.T) {
	e, f, dir := gateEnv(t, nil)
	before := publishedNames(e.pub.last())
	if a := ackOf(t, dir); a.Generation != 0 || a.BootID != e.d.BootID() || len(a.Busy) != 0 {
		t.Fatalf("ack without a plan: %+v", a)
	}
	s2 := startOf(t, e.lib, 3, "2g.20gb")
	held := []string{migAt(t, e.lib, 2, 0), migAt(t, e.lib, 2, 1), migAt(t, e.lib, 3, s2)}
	for _, h := range held {
		if !slices.Contains(before, h) {
			t.Fatalf("%s is not published before the plan: %v", h, before)
		}
	}
	plan := &miggate.Plan{Generation: 7, BootID: e.d.BootID(), Config: "c", State: miggate.StatePending, Managed: []int{2, 3},
		Changed: []int{2, 3}, Holds: map[int]miggate.Hold{2: {Placements: []int{0, 1}}, 3: {Placements: []int{s2}}}}
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)

	after := publishedNames(e.pub.last())
	if want := without(before, held...); !slices.Equal(after, want) {
		t.Fatalf("published after the holds:\n got %v\nwant %v", after, want)
	}
	if n := len(e.d.Inventory().WithheldDevices); n != 3 {
		t.Errorf("%d devices withheld, want 3", n)
	}
	a := ackOf(t, dir)
	if a.Generation != plan.Generation || a.BootID != e.d.BootID() || len(a.Busy) != 0 {
		t.Fatalf("ack %+v, want generation %d and nothing busy", a, plan.Generation)
	}
	wantGPUs := map[int]miggate.GPUOwnership{0: {Mode: "whole"}, 1: {Mode: "whole"}, 2: {Mode: "mig-static"}, 3: {Mode: "mig-static"},
		4: {Mode: "time-sliced"}, 5: {Mode: "time-sliced"}}
	if len(a.GPUs) != len(wantGPUs) {
		t.Errorf("ack GPUs %v, want %v", a.GPUs, wantGPUs)
	}
	for i, w := range wantGPUs {
		if a.GPUs[i] != w {
			t.Errorf("ack GPU %d: %+v, want %+v", i, a.GPUs[i], w)
		}
	}

	// A held device is not prepared; one the change does not touch is.
	c := e.claim("held", []alloc{{"mig", held[2], false}})
	if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "device "+held[2]+" is withdrawn while the MIG manager changes GPU 3's layout") {
		t.Fatalf("Prepare of a held device: %v", r.Err)
	}
	if e.hasSpec(c.UID) {
		t.Error("the refused claim got a CDI spec")
	}
	free := e.claim("free", []alloc{{"mig", migAt(t, e.lib, 3, startOf(t, e.lib, 3, "3g.40gb")), false}})
	e.mustPrepare(free)

	// Applying, then success: the holds go and GPU 3 is read again.
	plan.State = miggate.StateApplying
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	if got := publishedNames(e.pub.last()); !slices.Equal(got, without(before, held...)) {
		t.Fatalf("published while applying: %v", got)
	}
	plan.State, plan.Holds = miggate.StateSuccess, nil
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	if got := publishedNames(e.pub.last()); !slices.Equal(got, before) {
		t.Fatalf("published after success:\n got %v\nwant %v", got, before)
	}
	if a := ackOf(t, dir); a.Generation != plan.Generation || len(a.Busy) != 0 {
		t.Errorf("ack after success: %+v", a)
	}
}

func TestMIGGateReportsPreparedHeldDevicesAsBusy(t *testing.T) {
	e, f, dir := gateEnv(t, nil)
	s1 := startOf(t, e.lib, 3, "1g.10gb")
	s3 := startOf(t, e.lib, 3, "3g.40gb")
	heldDev, freeDev := migAt(t, e.lib, 3, s1), migAt(t, e.lib, 3, s3)
	user := e.claim("user", []alloc{{"mig", heldDev, false}})
	e.mustPrepare(user)
	other := e.claim("other", []alloc{{"mig", freeDev, false}, {"gpu", "gpu-0", false}})
	e.mustPrepare(other)

	plan := &miggate.Plan{Generation: 3, BootID: e.d.BootID(), Config: "c", State: miggate.StatePending, Managed: []int{3},
		Changed: []int{3}, Holds: map[int]miggate.Hold{3: {Placements: []int{s1}}}}
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	a := ackOf(t, dir)
	want := []miggate.Busy{{GPU: 3, Device: heldDev, User: "claim ns/user"}}
	if a.Generation != 3 || !slices.Equal(a.Busy, want) {
		t.Fatalf("ack %+v, want generation 3 and busy %v", a, want)
	}
	if slices.Contains(publishedNames(e.pub.last()), heldDev) {
		t.Fatalf("%s is still published while held", heldDev)
	}
	// Still prepared: asking again answers as before (the kubelet after a restart).
	e.mustPrepare(user)

	if err := e.unprepare(user); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	if a := ackOf(t, dir); a.Generation != 3 || len(a.Busy) != 0 {
		t.Fatalf("ack after Unprepare: %+v", a)
	}
}

// A Prepare that read the inventory before the holds reached it is refused once the holds are
// stored, even though the device is still in the inventory it read.
func TestMIGGatePrepareRacingAHoldIsRefused(t *testing.T) {
	e, f, dir := gateEnv(t, nil)
	dev := migAt(t, e.lib, 2, 0)
	if err := dir.WritePlan(&miggate.Plan{Generation: 2, BootID: e.d.BootID(), State: miggate.StatePending, Managed: []int{2},
		Holds: map[int]miggate.Hold{2: {Placements: []int{0}}}}); err != nil {
		t.Fatal(err)
	}
	// The follower stores the holds; the driver has not rebuilt yet.
	f.Step(context.Background(), func(context.Context, miggate.Change) {},
		func(map[int]miggate.Hold) (map[int]miggate.GPUOwnership, []miggate.Busy) { return nil, nil })
	if _, ok := e.d.Inventory().Device(dev); !ok {
		t.Fatalf("%s left the inventory without a rebuild", dev)
	}
	c := e.claim("late", []alloc{{"mig", dev, false}})
	if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "is withdrawn while the MIG manager changes GPU 2's layout") {
		t.Fatalf("Prepare racing a hold: %v", r.Err)
	}
	if _, err := e.checkpoint(c.UID); err == nil {
		t.Error("the refused claim left a checkpoint")
	}
}

func TestMIGGateEarlierBootHoldsManagedGPUsUntilSuccess(t *testing.T) {
	// A plan of an earlier boot that managed GPUs 2 and 3 (its instances did not survive the reboot).
	e, f, dir := gateEnv(t, func(dir miggate.Dir, _ string) {
		if err := dir.WritePlan(&miggate.Plan{Generation: 4, BootID: "an-earlier-boot", Config: "c", State: miggate.StateSuccess,
			Managed: []int{2, 3}}); err != nil {
			t.Fatal(err)
		}
	})
	first := publishedNames(e.pub.got[0])
	for _, n := range first {
		if strings.HasPrefix(n, "gpu-2") || strings.HasPrefix(n, "gpu-3") {
			t.Fatalf("the first publish has %s of a GPU the earlier boot's plan managed: %v", n, first)
		}
	}
	for _, n := range []string{"gpu-0", "gpu-1", "gpu-4", "gpu-5"} {
		if !slices.Contains(first, n) {
			t.Fatalf("the first publish lacks %s, which no plan holds: %v", n, first)
		}
	}
	a := ackOf(t, dir)
	if a.Generation != 0 || a.BootID != e.d.BootID() || a.GPUs[2].Mode != "mig-static" {
		t.Fatalf("ack %+v", a)
	}
	dev := migAt(t, e.lib, 2, 0)
	c := e.claim("early", []alloc{{"mig", dev, false}})
	if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "withdrawn while the MIG manager changes GPU 2's layout") {
		t.Fatalf("Prepare before the manager succeeded in this boot: %v", r.Err)
	}

	// The manager succeeds in this boot: everything is published again.
	if err := dir.WritePlan(&miggate.Plan{Generation: 5, BootID: e.d.BootID(), Config: "c", State: miggate.StateSuccess,
		Managed: []int{2, 3}}); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	got := publishedNames(e.pub.last())
	for _, g := range []int{2, 3} {
		ms, _ := e.lib.MigDevices(g)
		for _, m := range ms {
			if n := MIGName(g, m.GI, m.CI); !slices.Contains(got, n) {
				t.Errorf("%s is not published after the manager's success: %v", n, got)
			}
		}
	}
	if want := len(first) + 7 + 3; len(got) != want {
		t.Errorf("%d devices published after success, want %d", len(got), want)
	}
	if len(e.d.Inventory().WithheldDevices) != 0 {
		t.Errorf("still withheld: %v", e.d.Inventory().WithheldDevices)
	}
	e.mustPrepare(c)
}

func TestMIGGateHoldAllWithdrawsWholeAndTimeSlicedGPUs(t *testing.T) {
	e, f, dir := gateEnv(t, nil)
	before := publishedNames(e.pub.last())
	user := e.claim("ts", []alloc{{"gpu", "gpu-4", true}})
	e.mustPrepare(user)
	plan := &miggate.Plan{Generation: 9, BootID: e.d.BootID(), State: miggate.StatePending, Managed: []int{0, 4},
		Changed: []int{0, 4}, Holds: map[int]miggate.Hold{0: {All: true}, 4: {All: true}}}
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	if got, want := publishedNames(e.pub.last()), without(before, "gpu-0", "gpu-4"); !slices.Equal(got, want) {
		t.Fatalf("published with GPUs 0 and 4 held whole:\n got %v\nwant %v", got, want)
	}
	if _, ok := e.d.Inventory().TimeSliced[4]; ok {
		t.Error("a held GPU keeps its time-slice interval entry")
	}
	a := ackOf(t, dir)
	if want := []miggate.Busy{{GPU: 4, Device: "gpu-4", User: "claim ns/ts"}}; a.Generation != 9 || !slices.Equal(a.Busy, want) {
		t.Fatalf("ack %+v, want busy %v", a, want)
	}
	c := e.claim("whole", []alloc{{"gpu", "gpu-0", false}})
	if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "device gpu-0 is withdrawn while the MIG manager changes GPU 0's layout") {
		t.Fatalf("Prepare of a GPU held whole: %v", r.Err)
	}
	// Health keeps being reported for withheld devices (claims may still use them).
	var names []string
	for _, h := range e.d.healthReport().Devices {
		names = append(names, h.DeviceName)
	}
	if !slices.Contains(names, "gpu-4") {
		t.Errorf("health report %v lacks the withheld gpu-4", names)
	}

	plan.State, plan.Holds = miggate.StateFailed, nil
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	if got := publishedNames(e.pub.last()); !slices.Equal(got, before) {
		t.Fatalf("published after a failed change:\n got %v\nwant %v", got, before)
	}
	if _, ok := e.d.Inventory().TimeSliced[4]; !ok {
		t.Error("GPU 4's interval entry is not back")
	}
}

// Hold.All drops every device of a GPU offered in several modes and its counter set; the other
// GPUs' devices and counter sets stay, and a placement hold never touches mig-dynamic devices.
func TestMIGGateWithholdKeepsCountersConsistent(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, siblingProfile), Features{})
	w := inv.withhold(map[int]miggate.Hold{0: {All: true}})
	var names []string
	for _, d := range w.Devices {
		names = append(names, d.Name)
	}
	if !slices.Equal(names, []string{"gpu-1"}) || len(w.CounterSets) != 0 || len(w.WithheldDevices) != 2 {
		t.Fatalf("siblings held: devices %v, %d counter sets, %d withheld", names, len(w.CounterSets), len(w.WithheldDevices))
	}
	if len(inv.Devices) != 3 || len(inv.CounterSets) != 1 {
		t.Fatal("withhold changed the inventory it was given")
	}
	if _, ok := w.Withheld("gpu-0-time-sliced"); !ok {
		t.Error("gpu-0-time-sliced is not listed as withheld")
	}

	dyn := dynamicInventory(t, lib, dynamicProfile)
	count := func(inv *Inventory, gpu int) int {
		n := 0
		for _, d := range inv.Devices {
			if d.GPU.Index == gpu {
				n++
			}
		}
		return n
	}
	w = dyn.withhold(map[int]miggate.Hold{0: {All: true}, 1: {Placements: []int{0, 1, 2}}})
	if count(w, 0) != 0 || count(w, 1) != count(dyn, 1) || count(w, 2) != 1 {
		t.Fatalf("mig-dynamic holds: GPU 0 %d, GPU 1 %d of %d, GPU 2 %d devices", count(w, 0), count(w, 1), count(dyn, 1), count(w, 2))
	}
	if len(w.CounterSets) != 1 || w.CounterSets[0].Name != CounterSetName(1) {
		t.Fatalf("counter sets %v, want only GPU 1's", w.CounterSets)
	}
	// Every counter set a published device consumes is published.
	sets := map[string]bool{}
	for _, s := range w.DriverResources(nil, attrOptions{}).Pools[testNode].Slices {
		for _, cs := range s.SharedCounters {
			sets[cs.Name] = true
		}
	}
	for _, d := range w.Devices {
		for _, c := range d.consumes {
			if !sets[c.CounterSet] {
				t.Errorf("%s consumes unpublished counter set %s", d.Name, c.CounterSet)
			}
		}
	}
	if got := dyn.withhold(map[int]miggate.Hold{1: {Placements: []int{0}}}); got != dyn {
		t.Error("a placement hold on a mig-dynamic GPU withheld something")
	}
}

func TestMIGGateReporterModes(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, siblingProfile)
	gpus, busy := e.d.reportMIGGate(nil)
	if len(busy) != 0 || len(gpus) != 2 || gpus[0].Mode != string(api.ModeWhole) || gpus[1].Mode != "whole" || gpus[0].Layout != "" {
		t.Fatalf("gpus %v busy %v", gpus, busy)
	}
	// mig-static with a named layout: the driver does not apply it, so the manager may.
	doc := `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  migLayouts:
    small: {"1g.10gb": 7}
  rules:
    - name: mig
      selector: {indices: [1]}
      owner: dra
      mode: mig-static
      mig: {layout: small}
`
	if err := e.d.SetResolution(context.Background(), resolve(t, lib, doc)); err != nil {
		t.Fatal(err)
	}
	gpus, _ = e.d.reportMIGGate(nil)
	if len(gpus) != 1 || gpus[1] != (miggate.GPUOwnership{Mode: "mig-static"}) {
		t.Fatalf("gpus %v", gpus)
	}
}

// flakyPublisher fails while fail is set.
type flakyPublisher struct {
	memPublisher
	fail atomic.Bool
}

func (p *flakyPublisher) PublishResources(ctx context.Context, r resourceslice.DriverResources) error {
	if p.fail.Load() {
		return errors.New("API server unreachable")
	}
	return p.memPublisher.PublishResources(ctx, r)
}

// Held devices the driver could not withdraw from the slices are reported in use, so the manager
// waits; once a publish goes through they are not.
func TestMIGGateHeldDevicesStillPublishedAreBusy(t *testing.T) {
	e, f, dir := gateEnv(t, nil)
	pub := &flakyPublisher{}
	if err := e.d.SetPublisher(e.ctx, pub); err != nil {
		t.Fatal(err)
	}
	dev := migAt(t, e.lib, 2, 0)
	pub.fail.Store(true)
	if err := dir.WritePlan(&miggate.Plan{Generation: 6, BootID: e.d.BootID(), State: miggate.StatePending, Managed: []int{2},
		Holds: map[int]miggate.Hold{2: {Placements: []int{0}}}}); err != nil {
		t.Fatal(err)
	}
	step(e, f)
	a := ackOf(t, dir)
	if want := []miggate.Busy{{GPU: 2, Device: dev, User: "still published by the DRA driver"}}; a.Generation != 6 || !slices.Equal(a.Busy, want) {
		t.Fatalf("ack with the publish failing: %+v, want busy %v", a, want)
	}
	if !slices.Contains(publishedNames(pub.last()), dev) {
		t.Fatalf("%s is not in the last published slices", dev)
	}
	pub.fail.Store(false)
	step(e, f)
	if a := ackOf(t, dir); len(a.Busy) != 0 {
		t.Fatalf("ack once the publish went through: %+v", a)
	}
	if slices.Contains(publishedNames(pub.last()), dev) {
		t.Fatalf("%s is still published", dev)
	}
}
