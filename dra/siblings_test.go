package dra

import (
	"slices"
	"strings"
	"testing"

	"github.com/tessera-gpu/tessera/api"
)

// GPU 0 offered whole or time-sliced (for at most three claims, interval Long); GPU 1 whole.
const siblingProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - name: either
      selector: {indices: [0]}
      owner: dra
      modes: [whole, time-sliced]
      timeSlicing: {replicas: 3, interval: Long}
    - name: whole
      selector: {indices: [1]}
      owner: dra
      mode: whole
`

func TestSiblingModesPublished(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, siblingProfile), Features{})
	var names []string
	for _, d := range inv.Devices {
		names = append(names, d.Name+"="+string(d.Mode))
	}
	if want := []string{"gpu-0=whole", "gpu-0-time-sliced=time-sliced", "gpu-1=whole"}; !slices.Equal(names, want) {
		t.Fatalf("devices %v, want %v", names, want)
	}
	sl := inv.DriverResources(nil, attrOptions{}).Pools[testNode].Slices
	if len(sl[0].SharedCounters) != 1 || qv(sl[0].SharedCounters[0].Counters["gpu"].Value) != 1 {
		t.Fatalf("counter slice %+v", sl[0])
	}
	for _, d := range sl[1].Devices {
		if len(d.ConsumesCounters) != 1 || d.ConsumesCounters[0].CounterSet != "gpu-0-counters" {
			t.Errorf("%s consumes %v", d.Name, d.ConsumesCounters)
		}
	}
	if sl[1].PartitionTypeAttribute != nil {
		t.Error("sibling devices have no profile attribute; naming it as partition type is invalid")
	}
	if len(sl[2].Devices[0].ConsumesCounters) != 0 {
		t.Error("a single-mode GPU consumes counters")
	}
	// Without shared counters the GPU is offered in its first mode only.
	inv = build(t, lib, resolve(t, lib, siblingProfile), Features{NoPartitionable: true})
	if len(inv.Devices) != 2 || len(inv.CounterSets) != 0 || inv.Devices[0].Name != "gpu-0" || inv.Devices[0].Sibling() {
		t.Fatalf("without counters: %d devices, %d counter sets", len(inv.Devices), len(inv.CounterSets))
	}
}

// The scheduler's allocator gives the GPU one mode at a time: many claims on the time-sliced
// sibling (up to its clients), none on the whole sibling meanwhile — and the other way round.
func TestSiblingModesExcludeEachOtherInAllocator(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, siblingProfile), Features{})
	onGPU0 := `device.attributes["gpu.tessera.dev"].index == 0`
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	for i := range 3 {
		cl := c.allocate(request("time-sliced.gpu.tessera.dev", 1))
		if cl == nil || devicesOf(cl)[0] != "gpu-0-time-sliced" {
			t.Fatalf("time-sliced claim %d: %v", i, cl)
		}
	}
	if cl := c.allocate(request("time-sliced.gpu.tessera.dev", 1)); cl != nil {
		t.Fatalf("a 4th claim beyond clients=3: %v", devicesOf(cl))
	}
	if cl := c.allocate(request("gpu.tessera.dev", 1, onGPU0)); cl != nil {
		t.Fatalf("GPU 0 given whole while time-sliced: %v", devicesOf(cl))
	}
	if cl := c.allocate(request("gpu.tessera.dev", 1)); cl == nil || devicesOf(cl)[0] != "gpu-1" {
		t.Fatalf("whole GPU 1: %v", cl)
	}

	c = newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	if cl := c.allocate(request("gpu.tessera.dev", 1, onGPU0)); cl == nil || devicesOf(cl)[0] != "gpu-0" {
		t.Fatalf("whole GPU 0: %v", cl)
	}
	if cl := c.allocate(request("time-sliced.gpu.tessera.dev", 1)); cl != nil {
		t.Fatalf("GPU 0 time-sliced while given whole: %v", devicesOf(cl))
	}
}

func TestSiblingTimeSlicedIntervalFollowsItsClaims(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	e := newEnv(t, lib, node, siblingProfile)
	if calls := e.slicer.Calls(); len(calls) != 0 {
		t.Fatalf("intervals set at start for a GPU offered in several modes: %v", calls)
	}
	a := e.claim("a", []alloc{{"gpu", "gpu-0-time-sliced", true}})
	b := e.claim("b", []alloc{{"gpu", "gpu-0-time-sliced", true}})
	e.mustPrepare(a)
	e.mustPrepare(b)
	if calls := e.slicer.Calls(); !slices.Equal(calls, []string{"0=Long", "0=Long"}) {
		t.Fatalf("intervals %v", calls)
	}
	// The driver refuses the whole sibling while the GPU is time-sliced.
	w := e.claim("w", []alloc{{"gpu", "gpu-0", false}})
	if r := e.prepare(w)[w.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "in use") {
		t.Fatalf("whole sibling prepared beside time-sliced claims: %v", r.Err)
	}
	if err := e.unprepare(a); err != nil {
		t.Fatal(err)
	}
	if calls := e.slicer.Calls(); len(calls) != 2 {
		t.Fatalf("interval put back while claim b still time-slices the GPU: %v", calls)
	}
	if err := e.unprepare(b); err != nil {
		t.Fatal(err)
	}
	if calls := e.slicer.Calls(); !slices.Equal(calls, []string{"0=Long", "0=Long", "0=Default"}) {
		t.Fatalf("intervals after the last claim: %v", calls)
	}
	e.mustPrepare(w)
}

func TestSiblingModesValidation(t *testing.T) {
	for _, tc := range []struct{ rule, want string }{
		{`{selector: {indices: [0]}, owner: dra, mode: whole, modes: [whole, time-sliced]}`, "mode and modes are both set"},
		{`{selector: {indices: [0]}, owner: device-plugin, modes: [whole, time-sliced]}`, "modes needs the DRA driver"},
		{`{selector: {indices: [0]}, owner: dra, modes: [whole, mig-dynamic]}`, "spec.rules[0].modes[1]"},
		{`{selector: {indices: [0]}, owner: dra, modes: [whole, whole]}`, "listed twice"},
		{`{selector: {indices: [0]}, owner: dra, modes: [whole]}`, "two or more"},
		{`{selector: {indices: [0]}, owner: dra, modes: [whole, time-sliced], mps: {replicas: 2}}`, "spec.rules[0].mps"},
	} {
		_, err := api.ParseProfile([]byte("apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  rules:\n    - " + tc.rule + "\n"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.rule, err, tc.want)
		}
	}
}

// A GPU offered whole or shared by memory: 10 GiB shares until its memory is used, all on the one
// shared sibling; the whole sibling only once they are gone.
func TestSiblingSharedAndWhole(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	doc := strings.Replace(siblingProfile, "modes: [whole, time-sliced]\n      timeSlicing: {replicas: 3, interval: Long}", "modes: [shared, whole]", 1)
	inv := build(t, lib, resolve(t, lib, doc), Features{})
	if d, ok := inv.Device("gpu-0-whole"); !ok || d.Mode != api.ModeWhole {
		t.Fatalf("whole sibling missing: %+v", inv.Devices)
	}
	if d, ok := inv.Device("gpu-0"); !ok || d.Capacity == nil || !d.Shared() {
		t.Fatalf("shared sibling missing or without capacity")
	}
	onGPU0 := `device.attributes["gpu.tessera.dev"].index == 0`
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	n := 0
	for ; n < 20; n++ {
		cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1), "memory", "10Gi"))
		if cl == nil {
			break
		}
		if devicesOf(cl)[0] != "gpu-0" {
			t.Fatalf("share %d on %v", n, devicesOf(cl))
		}
	}
	if n != 7 { // 81559 MiB reported: seven 10 GiB shares, not eight
		t.Fatalf("%d shares of 10Gi fit, want 7", n)
	}
	if cl := c.allocate(request("gpu.tessera.dev", 1, onGPU0)); cl != nil {
		t.Fatalf("GPU 0 given whole while shared: %v", devicesOf(cl))
	}
	c = newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	if cl := c.allocate(request("gpu.tessera.dev", 1, onGPU0)); cl == nil || devicesOf(cl)[0] != "gpu-0-whole" {
		t.Fatalf("whole sibling: %v", cl)
	}
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1), "memory", "1Gi")); cl != nil {
		t.Fatalf("a share of GPU 0 while it is given whole: %v", devicesOf(cl))
	}
}
