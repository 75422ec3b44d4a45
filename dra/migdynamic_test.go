package dra

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tessera-gpu/tessera/health"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// GPU 0 (and 1) mig-dynamic, GPU 2 whole; the rest to the device plugin.
const dynamicProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - name: dynamic
      selector: {indices: [0, 1]}
      owner: dra
      mode: mig-dynamic
    - name: whole
      selector: {indices: [2]}
      owner: dra
      mode: whole
`

// dynamicInventory turns MIG mode on for GPUs 0 and 1 (as the driver does) and builds the devices.
func dynamicInventory(t testing.TB, lib nvmlib.Interface, doc string) *Inventory {
	t.Helper()
	for _, g := range []int{0, 1} {
		if _, err := lib.SetMigMode(g, true); err != nil {
			t.Fatal(err)
		}
	}
	return build(t, lib, resolve(t, lib, doc), Features{})
}

func profileIs(p string) string {
	return fmt.Sprintf(`device.attributes["gpu.tessera.dev"].profile == %q`, p)
}

func TestDynamicMIGPublishesCountersAndPlacements(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := dynamicInventory(t, lib, dynamicProfile)
	dr := inv.DriverResources(nil, attrOptions{})
	sl := dr.Pools[testNode].Slices
	// First the counters-only slice with the two GPUs' counter sets, then one slice per GPU.
	if len(sl) != 4 || len(sl[0].SharedCounters) != 2 || len(sl[0].Devices) != 0 {
		t.Fatalf("slices: %d, first has %d counter sets and %d devices", len(sl), len(sl[0].SharedCounters), len(sl[0].Devices))
	}
	cs := sl[0].SharedCounters[0]
	if cs.Name != "gpu-0-counters" || len(cs.Counters) > resourceapi.ResourceSliceMaxCountersPerCounterSet {
		t.Fatalf("counter set %s with %d counters", cs.Name, len(cs.Counters))
	}
	for name, want := range map[string]int64{"memory-slice-0": 1, "memory-slice-7": 1, "compute-slices": 7, "copy-engines": 8, "decoders": 7, "jpeg-engines": 7, "ofa-engines": 1} {
		if got := qv(cs.Counters[name].Value); got != want {
			t.Errorf("counter %s = %d, want %d", name, got, want)
		}
	}
	if _, ok := cs.Counters["encoders"]; ok {
		t.Errorf("H100 MIG profiles have no encoders; a zero counter was published")
	}
	// GPU 0: whole device, 7+1+4+3+2+1+1 placements (1g.10gb, 1g.10gb+me, 1g.20gb, 2g, 3g, 4g, 7g).
	devs := sl[1].Devices
	if len(devs) != 1+7+7+4+3+2+1+1 {
		t.Fatalf("GPU 0 has %d devices", len(devs))
	}
	if sl[1].PartitionTypeAttribute == nil || *sl[1].PartitionTypeAttribute != PartitionTypeAttribute {
		t.Errorf("partitionTypeAttribute not set on a slice of partitionable devices")
	}
	byName := map[string]resourceapi.Device{}
	for _, d := range devs {
		byName[d.Name] = d
		if len(d.ConsumesCounters) != 1 || d.ConsumesCounters[0].CounterSet != "gpu-0-counters" {
			t.Fatalf("%s consumes %v", d.Name, d.ConsumesCounters)
		}
		if _, ok := d.Attributes["uuid"]; ok {
			t.Errorf("%s has a uuid before its MIG device exists", d.Name)
		}
	}
	whole := byName["gpu-0"]
	if len(whole.ConsumesCounters[0].Counters) != len(cs.Counters) || *whole.Attributes["type"].StringValue != TypeGPU {
		t.Errorf("whole-GPU device consumes %d of %d counters", len(whole.ConsumesCounters[0].Counters), len(cs.Counters))
	}
	g3 := byName["gpu-0-mig-3g-40gb-4"].ConsumesCounters[0].Counters
	for _, k := range []string{"memory-slice-4", "memory-slice-7"} {
		if qv(g3[k].Value) != 1 {
			t.Errorf("3g.40gb@4 does not consume %s: %v", k, g3)
		}
	}
	if _, ok := g3["memory-slice-3"]; ok || qv(g3["compute-slices"].Value) != 3 {
		t.Errorf("3g.40gb@4 consumes %v", g3)
	}
	if me := byName["gpu-0-mig-1g-10gb-me-0"]; me.Name == "" || *me.Attributes["profile"].StringValue != "1g.10gb+me" {
		t.Errorf("1g.10gb+me placement 0 missing or misnamed")
	}
	// Small placements come from the top of the GPU first.
	if devs[1].Name != "gpu-0-mig-1g-10gb-6" {
		t.Errorf("first placement is %s, want gpu-0-mig-1g-10gb-6", devs[1].Name)
	}
}

func TestDynamicMIGAllocatorCountersExclude(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := dynamicInventory(t, lib, strings.Replace(dynamicProfile, "indices: [0, 1]", "indices: [0]", 1))
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	seen := map[string]bool{}
	for i := range 7 {
		cl := c.allocate(request("mig.tessera.dev", 1, profileIs("1g.10gb")))
		if cl == nil {
			t.Fatalf("1g.10gb claim %d not allocated", i)
		}
		d := devicesOf(cl)[0]
		if seen[d] || !strings.HasPrefix(d, "gpu-0-mig-1g-10gb-") {
			t.Fatalf("claim %d got %s", i, d)
		}
		seen[d] = true
	}
	for _, spec := range []resourceapi.ResourceClaimSpec{
		request("mig.tessera.dev", 1, profileIs("1g.10gb")),
		request("mig.tessera.dev", 1, profileIs("1g.10gb+me")),
		request("gpu.tessera.dev", 1, `device.attributes["gpu.tessera.dev"].mode == "mig-dynamic"`),
	} {
		if cl := c.allocate(spec); cl != nil {
			t.Fatalf("after 7×1g.10gb the allocator still gave %v", devicesOf(cl))
		}
	}
	// The whole GPU (GPU 2, mode whole) is still there for gpu.tessera.dev.
	if cl := c.allocate(request("gpu.tessera.dev", 1)); cl == nil || devicesOf(cl)[0] != "gpu-2" {
		t.Fatalf("whole GPU: %v", cl)
	}

	// The other way round: the whole-GPU device first, then no placement at all.
	c = newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	if cl := c.allocate(request("gpu.tessera.dev", 1, `device.attributes["gpu.tessera.dev"].mode == "mig-dynamic"`)); cl == nil || devicesOf(cl)[0] != "gpu-0" {
		t.Fatalf("whole mig-dynamic GPU: %v", cl)
	}
	if cl := c.allocate(request("mig.tessera.dev", 1)); cl != nil {
		t.Fatalf("a placement next to the whole GPU: %v", devicesOf(cl))
	}
}

func TestDynamicMIGFirstAvailableMIGElseWhole(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := dynamicInventory(t, lib, strings.Replace(dynamicProfile, "indices: [0, 1]", "indices: [0]", 1))
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	tmpl := shippedTemplates(t)["mig-else-gpu"]
	for i := range 7 {
		cl := c.allocate(tmpl)
		if cl == nil || !strings.HasPrefix(devicesOf(cl)[0], "gpu-0-mig-1g-10gb-") || cl.Status.Allocation.Devices.Results[0].Request != "gpu/mig" {
			t.Fatalf("claim %d: %v", i, cl)
		}
	}
	cl := c.allocate(tmpl)
	if cl == nil || devicesOf(cl)[0] != "gpu-2" || cl.Status.Allocation.Devices.Results[0].Request != "gpu/whole" {
		t.Fatalf("8th claim: %+v, want the whole GPU 2", cl)
	}
}

// Every combination the scheduler's allocator gives must be one NVML accepts: random claims of
// random profiles on A100 and H100 tables, each allocation created on the simulated GPU at once.
func TestDynamicMIGAllocationsAreCreatable(t *testing.T) {
	for _, node := range []string{"dgx-a100", "dgx-h100"} {
		t.Run(node, func(t *testing.T) {
			lib, _ := openSim(t, node)
			inv := dynamicInventory(t, lib, strings.Replace(dynamicProfile, "indices: [0, 1]", "indices: [0]", 1))
			ps, err := lib.MigProfiles(0)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			created := map[string]int{}
			for round := range 12 {
				c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
				for misses := 0; misses < 6; {
					p := ps[rng.IntN(len(ps))]
					cl := c.allocate(request("mig.tessera.dev", 1, profileIs(p.Name)))
					if cl == nil {
						misses++
						continue
					}
					name := devicesOf(cl)[0]
					dev, _ := inv.Device(name)
					dm := DynamicMIG{ProfileID: dev.Dynamic.Profile.ID, Profile: dev.Dynamic.Profile.Name, Placement: dev.Dynamic.Placement, GI: -1, CI: -1}
					if _, err := createDynamic(lib, dev.CDI().GPU, &dm); err != nil {
						t.Fatalf("round %d: allocator gave %s, NVML refused it: %v", round, name, err)
					}
					created[p.Name]++
				}
				gis, err := lib.GpuInstances(0)
				if err != nil {
					t.Fatal(err)
				}
				for _, gi := range gis {
					if err := destroyInstances(lib, 0, gi.ID); err != nil {
						t.Fatal(err)
					}
				}
			}
			for _, p := range ps {
				if created[p.Name] == 0 {
					t.Errorf("profile %s was never allocated", p.Name)
				}
			}
			t.Logf("created: %v", created)
		})
	}
}

func migDevicesOn(t testing.TB, lib nvmlib.Interface, gpu int) []nvmlib.MigDevice {
	t.Helper()
	m, err := lib.MigDevices(gpu)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestDynamicMIGPrepareCreatesAndUnprepareDestroys(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, dynamicProfile)
	if inv := e.d.Inventory(); len(inv.Skipped) != 0 {
		t.Fatalf("skipped: %+v (the driver turns MIG mode on itself)", inv.Skipped)
	}
	cl := e.claim("mig", []alloc{{"mig", "gpu-0-mig-3g-40gb-4", false}})
	devs := e.mustPrepare(cl)
	migs := migDevicesOn(t, lib, 0)
	if len(migs) != 1 || migs[0].Profile != "3g.40gb" || migs[0].Placement != (nvmlib.Placement{Start: 4, Size: 4}) {
		t.Fatalf("MIG devices after Prepare: %+v", migs)
	}
	spec, err := os.ReadFile(e.specPath(cl.UID))
	if err != nil || !strings.Contains(string(spec), migs[0].UUID) {
		t.Fatalf("claim spec does not hand out %s: %v\n%s", migs[0].UUID, err, spec)
	}
	if len(devs) != 1 || len(devs[0].CDIDeviceIDs) != 1 {
		t.Fatalf("prepare result %+v", devs)
	}
	ck, err := e.checkpoint(cl.UID)
	if err != nil || ck.Phase != PhaseCompleted || ck.Devices[0].Dynamic.GI != migs[0].GI || ck.Devices[0].CDI.MIG.UUID != migs[0].UUID {
		t.Fatalf("checkpoint %+v: %v", ck, err)
	}
	// Prepare again (a kubelet retry): same answer, no second instance.
	if again := e.mustPrepare(cl); !slices.Equal(again[0].CDIDeviceIDs, devs[0].CDIDeviceIDs) || len(migDevicesOn(t, lib, 0)) != 1 {
		t.Fatalf("second prepare: %+v", again)
	}
	// Our own instance does not hide the placements next to it.
	if err := e.d.rebuild(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.d.Inventory().Device("gpu-0-mig-3g-40gb-0"); !ok || len(e.d.Inventory().Hidden) != 0 {
		t.Fatalf("hidden after our own prepare: %v", e.d.Inventory().Hidden)
	}
	if err := e.unprepare(cl); err != nil {
		t.Fatal(err)
	}
	if m := migDevicesOn(t, lib, 0); len(m) != 0 {
		t.Fatalf("MIG devices after Unprepare: %+v", m)
	}
	if gis, _ := lib.GpuInstances(0); len(gis) != 0 {
		t.Fatalf("GPU instances after Unprepare: %+v", gis)
	}
	if e.hasSpec(cl.UID) {
		t.Fatal("claim spec left behind")
	}

	// The whole-GPU device of the MIG-mode GPU is one instance of the full profile.
	w := e.claim("whole", []alloc{{"gpu", "gpu-1", false}})
	e.mustPrepare(w)
	if m := migDevicesOn(t, lib, 1); len(m) != 1 || m[0].Profile != "7g.80gb" {
		t.Fatalf("whole device of a mig-dynamic GPU made %+v", m)
	}
	// A placement overlapping a prepared one is refused by the driver (last line of defense).
	other := e.claim("overlap", []alloc{{"mig", "gpu-1-mig-1g-10gb-0", false}})
	if r := e.prepare(other)[other.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "in use") {
		t.Fatalf("overlapping placement prepared: %v", r.Err)
	}
	if err := e.unprepare(w); err != nil || len(migDevicesOn(t, lib, 1)) != 0 {
		t.Fatalf("unprepare whole: %v", err)
	}
}

func TestDynamicMIGCrashBetweenCreateAndCheckpointLeavesNothing(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, dynamicProfile)
	crash := errors.New("simulated crash")
	e.d.hooks.beforeCompleted = func(ClaimRef) error { return crash }
	cl := e.claim("mig", []alloc{{"mig", "gpu-0-mig-2g-20gb-2", false}})
	if r := e.prepare(cl)[cl.UID]; !errors.Is(r.Err, crash) {
		t.Fatalf("prepare: %v", r.Err)
	}
	if len(migDevicesOn(t, lib, 0)) != 1 {
		t.Fatal("the crash came after the instance was created; it should exist now")
	}
	if ck, err := e.checkpoint(cl.UID); err != nil || ck.Phase != PhaseStarted || ck.Devices[0].Dynamic.GI != migDevicesOn(t, lib, 0)[0].GI {
		t.Fatalf("checkpoint at the crash: %+v %v", ck, err)
	}
	e.start() // restart: reconciliation destroys the recorded instance
	if gis, _ := lib.GpuInstances(0); len(gis) != 0 {
		t.Fatalf("leaked GPU instances after restart: %+v", gis)
	}
	if _, err := e.checkpoint(cl.UID); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("checkpoint after restart: %v", err)
	}
	// And the claim prepares cleanly afterwards.
	e.mustPrepare(cl)
	if len(migDevicesOn(t, lib, 0)) != 1 {
		t.Fatal("prepare after restart made no instance")
	}

	// A crash right after NVML made the instance, before its ID was recorded: the checkpoint has
	// only the profile and placement, and the restart finds the instance by them.
	p := profileByName(t, lib, 0, "1g.10gb")
	e.d.hooks.afterStarted = func(ClaimRef) error {
		gi, err := lib.CreateGpuInstance(0, p.ID, nvmlib.Placement{Start: 6, Size: 1})
		if err == nil {
			_, err = lib.CreateComputeInstance(0, gi, 1)
		}
		return errors.Join(crash, err)
	}
	c2 := e.claim("mig2", []alloc{{"mig", "gpu-0-mig-1g-10gb-6", false}})
	if r := e.prepare(c2)[c2.UID]; !errors.Is(r.Err, crash) {
		t.Fatalf("prepare: %v", r.Err)
	}
	if ck, err := e.checkpoint(c2.UID); err != nil || ck.Devices[0].Dynamic.GI != -1 || len(migDevicesOn(t, lib, 0)) != 2 {
		t.Fatalf("at the crash: %+v %v", ck, err)
	}
	e.start()
	if m := migDevicesOn(t, lib, 0); len(m) != 1 || m[0].Profile != "2g.20gb" {
		t.Fatalf("after restart: %+v (the unrecorded 1g.10gb must go, the prepared 2g.20gb stay)", m)
	}
}

func TestDynamicMIGForeignInstanceHidesPlacements(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, dynamicProfile)
	// Someone else makes a 3g.40gb at placement 4 on GPU 0.
	p3 := profileByName(t, lib, 0, "3g.40gb")
	gi, err := lib.CreateGpuInstance(0, p3.ID, nvmlib.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lib.CreateComputeInstance(0, gi, 3); err != nil {
		t.Fatal(err)
	}
	if err := e.d.rebuild(e.ctx); err != nil {
		t.Fatal(err)
	}
	inv := e.d.Inventory()
	for _, hidden := range []string{"gpu-0", "gpu-0-mig-1g-10gb-4", "gpu-0-mig-1g-10gb-6", "gpu-0-mig-3g-40gb-4", "gpu-0-mig-2g-20gb-4", "gpu-0-mig-7g-80gb-0"} {
		if _, ok := inv.Device(hidden); ok {
			t.Errorf("%s is published though a foreign instance overlaps it", hidden)
		}
		if !slices.Contains(inv.Hidden, hidden) {
			t.Errorf("%s not reported hidden", hidden)
		}
	}
	for _, shown := range []string{"gpu-0-mig-1g-10gb-0", "gpu-0-mig-3g-40gb-0", "gpu-0-mig-4g-40gb-0", "gpu-1", "gpu-1-mig-3g-40gb-4"} {
		if _, ok := inv.Device(shown); !ok {
			t.Errorf("%s is not published", shown)
		}
	}
	// Its removal brings them back.
	if err := destroyInstances(lib, 0, gi); err != nil {
		t.Fatal(err)
	}
	if err := e.d.rebuild(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.d.Inventory().Device("gpu-0"); !ok || len(e.d.Inventory().Hidden) != 0 {
		t.Fatalf("after the foreign instance went: hidden %v", e.d.Inventory().Hidden)
	}
}

func profileByName(t testing.TB, lib nvmlib.Interface, gpu int, name string) nvmlib.MigProfile {
	t.Helper()
	ps, err := lib.MigProfiles(gpu)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no profile %s", name)
	return nvmlib.MigProfile{}
}

func qv(q resource.Quantity) int64 { return q.Value() }

func devTaints(dr map[string]resourceapi.Device, name string) []resourceapi.DeviceTaint {
	return dr[name].Taints
}

func publishedDevices(e *env) map[string]resourceapi.Device {
	out := map[string]resourceapi.Device{}
	for _, s := range e.pub.last().Pools[testNode].Slices {
		for _, d := range s.Devices {
			out[d.Name] = d
		}
	}
	return out
}

func TestDynamicMIGInUseDestroyTaintsInsteadOfOffering(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, dynamicProfile)
	cl := e.claim("mig", []alloc{{"mig", "gpu-0-mig-1g-10gb-6", false}})
	e.mustPrepare(cl)
	m := migDevicesOn(t, lib, 0)[0]
	if err := node.AddProcess(0, 4242, 512, m.GI, m.CI); err != nil {
		t.Fatal(err)
	}
	if err := e.unprepare(cl); err != nil {
		t.Fatalf("unprepare must succeed for the kubelet (the pod is gone): %v", err)
	}
	if ck, err := e.checkpoint(cl.UID); err != nil || ck.Phase != PhaseDestroyPending {
		t.Fatalf("checkpoint: %+v %v", ck, err)
	}
	if e.hasSpec(cl.UID) {
		t.Error("the claim's CDI spec outlived its unprepare")
	}
	pub := publishedDevices(e)
	for _, name := range []string{"gpu-0-mig-1g-10gb-6", "gpu-0", "gpu-0-mig-3g-40gb-4", "gpu-0-mig-1g-20gb-6"} {
		if ts := devTaints(pub, name); len(ts) != 1 || ts[0].Key != InUseTaintKey || ts[0].Effect != resourceapi.DeviceTaintEffectNoSchedule {
			t.Errorf("%s taints %+v", name, ts)
		}
	}
	for _, name := range []string{"gpu-0-mig-1g-10gb-5", "gpu-0-mig-3g-40gb-0", "gpu-1"} {
		if ts := devTaints(pub, name); len(ts) != 0 {
			t.Errorf("%s tainted: %+v", name, ts)
		}
	}
	// The scheduler's allocator does not place a claim there; the driver refuses one that comes anyway.
	c := newCluster(t, toSlices(e.pub.last(), 1))
	if got := c.allocate(request("mig.tessera.dev", 1, profileIs("1g.10gb"), `device.attributes["gpu.tessera.dev"].index == 0`)); got == nil || devicesOf(got)[0] == "gpu-0-mig-1g-10gb-6" {
		t.Fatalf("allocator: %v", got)
	}
	again := e.claim("again", []alloc{{"mig", "gpu-0-mig-1g-10gb-6", false}})
	if r := e.prepare(again)[again.UID]; r.Err == nil {
		t.Fatal("a placement whose instance is still in use was prepared")
	}
	// A restart keeps it pending.
	e.start()
	if ck, err := e.checkpoint(cl.UID); err != nil || ck.Phase != PhaseDestroyPending {
		t.Fatalf("checkpoint after restart: %+v %v", ck, err)
	}
	e.d.retryPending(e.ctx)
	if len(migDevicesOn(t, lib, 0)) != 1 {
		t.Fatal("destroyed while its process runs")
	}
	// The process ends: the next retry destroys it and the taints go.
	if err := node.EndProcesses(0, 4242); err != nil {
		t.Fatal(err)
	}
	e.d.retryPending(e.ctx)
	if len(migDevicesOn(t, lib, 0)) != 0 {
		t.Fatal("instance not destroyed after its process ended")
	}
	if _, err := e.checkpoint(cl.UID); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("checkpoint after destroy: %v", err)
	}
	if ts := devTaints(publishedDevices(e), "gpu-0"); len(ts) != 0 {
		t.Fatalf("taints left: %+v", ts)
	}
	e.mustPrepare(again)
}

func TestDynamicMIGProfilesLimitAndNames(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	doc := strings.Replace(dynamicProfile, "mode: mig-dynamic", "mode: mig-dynamic\n      migDynamic: {profiles: [1g.10gb, 3g.40gb]}", 1)
	inv := dynamicInventory(t, lib, doc)
	var names []string
	for _, d := range inv.Devices {
		if d.GPU.Index == 0 {
			names = append(names, d.Name)
		}
	}
	want := []string{"gpu-0-mig-1g-10gb-6", "gpu-0-mig-1g-10gb-5", "gpu-0-mig-1g-10gb-4", "gpu-0-mig-1g-10gb-3", "gpu-0-mig-1g-10gb-2", "gpu-0-mig-1g-10gb-1", "gpu-0-mig-1g-10gb-0", "gpu-0-mig-3g-40gb-4", "gpu-0-mig-3g-40gb-0"}
	if !slices.Equal(names, want) {
		t.Fatalf("devices %v\nwant    %v", names, want)
	}
	if DynamicName(3, "1g.10gb+me", 6) != "gpu-3-mig-1g-10gb-me-6" {
		t.Fatal(DynamicName(3, "1g.10gb+me", 6))
	}
}

// An XID on a MIG instance made for a claim taints that placement only, and goes after the quiet
// period; a GPU-wide XID taints every placement of the GPU.
func TestDynamicMIGScopedXIDTaintsItsPlacement(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	clk := clocktesting.NewFakeClock(time.Now())
	m := health.NewMonitor(lib, health.DefaultPolicy(), health.WithClock(clk), health.WithProbeInterval(time.Second))
	e := newEnv(t, lib, node, dynamicProfile, WithHealth(m), WithHealthResend(20*time.Millisecond))
	cl := e.claim("mig", []alloc{{"mig", "gpu-0-mig-2g-20gb-2", false}})
	e.mustPrepare(cl)
	inst := migDevicesOn(t, lib, 0)[0]
	if err := node.InjectXID(0, 94, inst.GI, inst.CI); err != nil {
		t.Fatal(err)
	}
	poll(t, "the placement tainted", func() (bool, error) { return len(taintsOf(e.pub)["gpu-0-mig-2g-20gb-2"]) == 1, nil })
	if n := len(taintsOf(e.pub)); n != 1 {
		t.Errorf("%d devices tainted, want only the faulty instance's placement: %v", n, taintsOf(e.pub))
	}
	clk.Step(health.DefaultQuietPeriod + time.Second)
	m.ProbeOnce()
	poll(t, "taint gone after the quiet period", func() (bool, error) { return len(taintsOf(e.pub)) == 0, nil })

	if err := node.InjectXID(1, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	poll(t, "GPU 1 tainted", func() (bool, error) { return len(taintsOf(e.pub)["gpu-1-mig-1g-10gb-0"]) == 1, nil })
	if _, ok := taintsOf(e.pub)["gpu-0-mig-2g-20gb-2"]; ok {
		t.Error("GPU 1's fault tainted GPU 0")
	}
}

// The driver's own first publish (before the helper's controller takes over) carries the counter
// sets: without them the scheduler would see devices that consume nothing.
func TestFirstPublishKeepsCounterSets(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, dynamicProfile)
	n := 0
	e.client.PrependReactor("create", "resourceslices", func(a k8stesting.Action) (bool, runtime.Object, error) {
		obj := a.(k8stesting.CreateAction).GetObject().(*resourceapi.ResourceSlice)
		if obj.Name == "" {
			n++
			obj.Name = fmt.Sprintf("%s%d", obj.GenerateName, n) // the fake API server does not generate names
		}
		return false, nil, nil
	})
	e.d.firstPublish(e.ctx, e.d.Inventory().DriverResources(nil, attrOptions{}))
	list, err := e.client.ResourceV1().ResourceSlices().List(e.ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sets, devices := 0, 0
	for _, s := range list.Items {
		sets += len(s.Spec.SharedCounters)
		devices += len(s.Spec.Devices)
	}
	if sets != 2 || devices != 2*26+1 {
		t.Fatalf("first publish: %d slices, %d counter sets, %d devices", len(list.Items), sets, devices)
	}
}

// A foreign instance holds the GPU's only OFA engine (a +me profile): no other +me placement is
// offered as allocatable, while plain 1g placements are.
func TestDynamicMIGForeignInstanceEnginesNotOffered(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, strings.Replace(dynamicProfile, "indices: [0, 1]", "indices: [0]", 1))
	me := profileByName(t, lib, 0, "1g.10gb+me")
	gi, err := lib.CreateGpuInstance(0, me.ID, nvmlib.Placement{Start: 6, Size: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lib.CreateComputeInstance(0, gi, 1); err != nil {
		t.Fatal(err)
	}
	if err := e.d.rebuild(e.ctx); err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, toSlices(e.pub.last(), 1))
	if cl := c.allocate(request("mig.tessera.dev", 1, profileIs("1g.10gb+me"))); cl != nil {
		t.Fatalf("a second +me allocated beside a foreign one: %v", devicesOf(cl))
	}
	for i := range 6 {
		if cl := c.allocate(request("mig.tessera.dev", 1, profileIs("1g.10gb"))); cl == nil {
			t.Fatalf("1g.10gb claim %d beside the foreign instance not allocated", i)
		}
	}
	if cl := c.allocate(request("mig.tessera.dev", 1, profileIs("1g.10gb"))); cl != nil {
		t.Fatalf("a 7th 1g.10gb beside the foreign one: %v", devicesOf(cl))
	}
}
