package plugin_test

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/plugin"
)

const gateProfile = sp + `spec:
  rules:
  - {selector: {indices: [0, 1]}, owner: device-plugin, mode: mig-static, mig: {layout: existing}}
`

// migAt returns GPU gpu's MIG device whose instance starts at placement start.
func (e *env) migAt(gpu, start int) nvmlib.MigDevice {
	e.t.Helper()
	devs, err := e.lib.MigDevices(gpu)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, d := range devs {
		if d.Placement.Start == start {
			return d
		}
	}
	e.t.Fatalf("GPU %d has no MIG device at placement %d: %+v", gpu, start, devs)
	return nvmlib.MigDevice{}
}

func waitAck(t *testing.T, dir miggate.Dir, cond func(*miggate.Ack) bool) *miggate.Ack {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var last *miggate.Ack
	for time.Now().Before(deadline) {
		acks, _ := dir.ReadAcks()
		if a := acks[miggate.FrontEndDevicePlugin]; a != nil {
			last = a
			if cond(a) {
				return a
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no such ack from the device plugin; last: %+v", last)
	return nil
}

// The plugin follows the MIG manager: held MIG devices leave the kubelet's list while the rest keep
// serving, the ack names held devices still in use, a finished change is read again at once (a kept
// device in use does not hold the re-read back), and a plan of an earlier boot holds every device of
// the GPUs it managed.
func TestMIGGateHoldsAndRescans(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 60*time.Second)
	e.migLayout(map[int]map[string]int{0: {"1g.10gb": 7}, 1: {"1g.10gb": 7}})
	boot, err := e.node.BootID()
	if err != nil {
		t.Fatal(err)
	}
	dir := miggate.Dir{Path: filepath.Join(shortDir(t), "gate")}
	f := miggate.NewFollower(dir.Path, miggate.FrontEndDevicePlugin, boot, miggate.WithInterval(10*time.Millisecond, 50*time.Millisecond))
	p := e.start(gateProfile, plugin.WithMIGGate(f))
	gctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); p.RunMIGGate(gctx) }()
	t.Cleanup(func() { cancel(); <-done })

	e.waitResources(map[string]int{"nvidia.com/gpu": 6, "nvidia.com/mig-1g.10gb": 14})
	a := waitAck(t, dir, func(a *miggate.Ack) bool { return len(a.GPUs) == 8 })
	if a.GPUs[0].Mode != "mig-static" || a.GPUs[0].Layout != "" || a.GPUs[2].Mode != "whole" {
		t.Errorf("ownership in the ack: %+v", a.GPUs)
	}

	// A device at placement 0 of GPU 0 is in use; the manager holds placements 0 and 1.
	busy := e.migAt(0, 0)
	kept := e.migAt(0, 6)
	if _, err := e.kubelet.Allocate(ctx, "nvidia.com/mig-1g.10gb", busy.UUID, kept.UUID); err != nil {
		t.Fatal(err)
	}
	plan := &miggate.Plan{Generation: 1, BootID: boot, Config: "mixed", State: miggate.StatePending, Managed: []int{0, 1},
		Changed: []int{0}, Holds: map[int]miggate.Hold{0: {Placements: []int{0, 1}}}}
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	s := e.waitCount("nvidia.com/mig-1g.10gb", 12)
	for _, start := range []int{0, 1} {
		if slices.Contains(s.IDs(), e.migAt(0, start).UUID) {
			t.Errorf("held MIG device at placement %d still advertised", start)
		}
	}
	if !slices.Contains(s.IDs(), kept.UUID) {
		t.Error("a MIG device the change does not touch was withdrawn")
	}
	a = waitAck(t, dir, func(a *miggate.Ack) bool { return a.Generation == 1 })
	if len(a.Busy) != 1 || a.Busy[0].GPU != 0 || a.Busy[0].Device != "nvidia.com/mig-1g.10gb="+busy.UUID {
		t.Fatalf("busy in the ack: %+v", a.Busy)
	}
	e.kubelet.Release("nvidia.com/mig-1g.10gb", busy.UUID)
	waitAck(t, dir, func(a *miggate.Ack) bool { return a.Generation == 1 && len(a.Busy) == 0 })

	// The manager changes GPU 0: placements 0 and 1 become one 2g.20gb; then reports success.
	for _, start := range []int{0, 1} {
		m := e.migAt(0, start)
		if err := e.lib.DestroyComputeInstance(0, m.GI, m.CI); err != nil {
			t.Fatal(err)
		}
		if err := e.lib.DestroyGpuInstance(0, m.GI); err != nil {
			t.Fatal(err)
		}
	}
	profs, _ := e.lib.MigProfiles(0)
	var twoG nvmlib.MigProfile
	for _, pr := range profs {
		if pr.Name == "2g.20gb" {
			twoG = pr
		}
	}
	gi, err := e.lib.CreateGpuInstance(0, twoG.ID, nvmlib.Placement{Start: 0, Size: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.lib.CreateComputeInstance(0, gi, twoG.ComputeSlices); err != nil {
		t.Fatal(err)
	}
	plan.State, plan.Holds = miggate.StateSuccess, nil
	if err := dir.WritePlan(plan); err != nil {
		t.Fatal(err)
	}
	// The kept device is still allocated: the re-read must not wait for it.
	e.waitResources(map[string]int{"nvidia.com/gpu": 6, "nvidia.com/mig-1g.10gb": 12, "nvidia.com/mig-2g.20gb": 1})
	if pend := p.Pending(); len(pend) != 0 {
		t.Errorf("the re-read waited for devices in use: %v", pend)
	}

	// A plan of an earlier boot: every device of the GPUs it managed is held until the manager
	// succeeds in this boot.
	if err := dir.WritePlan(&miggate.Plan{Generation: 2, BootID: "an-earlier-boot", Config: "mixed", State: miggate.StateSuccess, Managed: []int{1}}); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu": 6, "nvidia.com/mig-1g.10gb": 5, "nvidia.com/mig-2g.20gb": 1})
	if err := dir.WritePlan(&miggate.Plan{Generation: 3, BootID: boot, Config: "mixed", State: miggate.StateSuccess, Managed: []int{0, 1}}); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu": 6, "nvidia.com/mig-1g.10gb": 12, "nvidia.com/mig-2g.20gb": 1})
}

// A GPU whose profile names its own layout is reported with it, so the manager leaves it alone.
func TestMIGGateReportsOwnLayouts(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	boot, _ := e.node.BootID()
	dir := miggate.Dir{Path: filepath.Join(shortDir(t), "gate")}
	f := miggate.NewFollower(dir.Path, miggate.FrontEndDevicePlugin, boot, miggate.WithInterval(10*time.Millisecond, 50*time.Millisecond))
	p := e.start(sp+`spec:
  rules:
  - {selector: {indices: [3]}, owner: device-plugin, mode: mig-static, mig: {layout: all-3g.40gb}}
  - {selector: {indices: [4]}, owner: dra, mode: whole}
`, plugin.WithMIGGate(f))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.RunMIGGate(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	a := waitAck(t, dir, func(a *miggate.Ack) bool { return len(a.GPUs) > 0 })
	if a.GPUs[3].Layout != "all-3g.40gb" || a.GPUs[3].Mode != "mig-static" {
		t.Errorf("GPU 3: %+v", a.GPUs[3])
	}
	if _, ok := a.GPUs[4]; ok {
		t.Errorf("GPU 4 belongs to DRA, yet the device plugin claims it: %+v", a.GPUs)
	}
	if a.BootID != boot {
		t.Errorf("ack boot %q, want %q", a.BootID, boot)
	}
}
