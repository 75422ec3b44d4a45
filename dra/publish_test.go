package dra

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/structured"
	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/api"
)

// classes reads the DeviceClasses we ship.
type classes map[string]*resourceapi.DeviceClass

func (c classes) List() ([]*resourceapi.DeviceClass, error) {
	var out []*resourceapi.DeviceClass
	for _, v := range c {
		out = append(out, v)
	}
	return out, nil
}

func (c classes) Get(name string) (*resourceapi.DeviceClass, error) {
	if v, ok := c[name]; ok {
		return v, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Group: "resource.k8s.io", Resource: "deviceclasses"}, name)
}

func yamlDocs(t testing.TB, file string) [][]byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "deployments", "dra", file))
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, d := range bytes.Split(data, []byte("\n---\n")) {
		if len(bytes.TrimSpace(d)) > 0 {
			out = append(out, d)
		}
	}
	return out
}

func shippedClasses(t testing.TB) classes {
	t.Helper()
	out := classes{}
	for _, f := range []string{"deviceclasses.yaml", "extended-resource.yaml"} {
		for _, d := range yamlDocs(t, f) {
			var dc resourceapi.DeviceClass
			if err := yaml.UnmarshalStrict(d, &dc); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			out[dc.Name] = &dc
		}
	}
	return out
}

func shippedTemplates(t testing.TB) map[string]resourceapi.ResourceClaimSpec {
	t.Helper()
	out := map[string]resourceapi.ResourceClaimSpec{}
	for _, d := range yamlDocs(t, "claims.yaml") {
		var rct resourceapi.ResourceClaimTemplate
		if err := yaml.UnmarshalStrict(d, &rct); err != nil {
			t.Fatalf("claims.yaml: %v", err)
		}
		spec := rct.Spec.Spec
		defaultClaimSpec(&spec)
		out[rct.Name] = spec
	}
	return out
}

// cluster is the scheduler's view: slices, classes and what is allocated, fed to the scheduler's own
// allocator (k8s.io/dynamic-resource-allocation/structured) one claim at a time.
type cluster struct {
	t       testing.TB
	slices  []*resourceapi.ResourceSlice
	classes classes
	state   structured.AllocatedState
	n       int
}

func newCluster(t testing.TB, slices []*resourceapi.ResourceSlice) *cluster {
	return &cluster{t: t, slices: slices, classes: shippedClasses(t), state: structured.AllocatedState{
		AllocatedDevices:         sets.New[structured.DeviceID](),
		AllocatedSharedDeviceIDs: sets.New[structured.SharedDeviceID](),
		AggregatedCapacity:       structured.NewConsumedCapacityCollection(),
	}}
}

var allocFeatures = structured.Features{AdminAccess: true, PrioritizedList: true, PartitionableDevices: true,
	DeviceTaints: true, ConsumableCapacity: true, DeviceBindingAndStatus: true}

// allocate allocates one claim; nil when it does not fit.
func (c *cluster) allocate(spec resourceapi.ResourceClaimSpec) *resourceapi.ResourceClaim {
	c.t.Helper()
	c.n++
	claim := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: fmt.Sprintf("claim-%d", c.n), UID: types.UID(fmt.Sprintf("00000000-0000-0000-0000-%012d", c.n))},
		Spec:       spec,
	}
	ctx := context.Background()
	a, err := structured.NewAllocator(ctx, allocFeatures, c.state, c.classes, c.slices, cel.NewCache(10, cel.Features{}))
	if err != nil {
		c.t.Fatal(err)
	}
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode, Labels: map[string]string{"kubernetes.io/hostname": testNode}}}
	res, err := a.Allocate(ctx, node, []*resourceapi.ResourceClaim{claim})
	if err != nil {
		c.t.Fatalf("allocate: %v", err)
	}
	if len(res) == 0 {
		return nil
	}
	claim.Status.Allocation = &res[0]
	for _, r := range res[0].Devices.Results {
		id := structured.MakeDeviceID(r.Driver, r.Pool, r.Device)
		if r.ShareID != nil {
			c.state.AllocatedSharedDeviceIDs.Insert(structured.MakeSharedDeviceID(id, r.ShareID))
			c.state.AggregatedCapacity.Insert(structured.NewDeviceConsumedCapacity(id, r.ConsumedCapacity))
		} else {
			c.state.AllocatedDevices.Insert(id)
		}
	}
	return claim
}

// defaultClaimSpec applies the API server's defaults to requests read from YAML.
func defaultClaimSpec(spec *resourceapi.ResourceClaimSpec) {
	def := func(mode *resourceapi.DeviceAllocationMode, count *int64) {
		if *mode == "" {
			*mode = resourceapi.DeviceAllocationModeExactCount
		}
		if *mode == resourceapi.DeviceAllocationModeExactCount && *count == 0 {
			*count = 1
		}
	}
	for i := range spec.Devices.Requests {
		r := &spec.Devices.Requests[i]
		if r.Exactly != nil {
			def(&r.Exactly.AllocationMode, &r.Exactly.Count)
		}
		for j := range r.FirstAvailable {
			def(&r.FirstAvailable[j].AllocationMode, &r.FirstAvailable[j].Count)
		}
	}
}

func devicesOf(c *resourceapi.ResourceClaim) []string {
	var out []string
	for _, r := range c.Status.Allocation.Devices.Results {
		out = append(out, r.Device)
	}
	return out
}

func request(class string, count int64, cel ...string) resourceapi.ResourceClaimSpec {
	req := resourceapi.DeviceRequest{Name: "r", Exactly: &resourceapi.ExactDeviceRequest{
		DeviceClassName: class, AllocationMode: resourceapi.DeviceAllocationModeExactCount, Count: count}}
	for _, e := range cel {
		req.Exactly.Selectors = append(req.Exactly.Selectors, resourceapi.DeviceSelector{CEL: &resourceapi.CELDeviceSelector{Expression: e}})
	}
	return resourceapi.ResourceClaimSpec{Devices: resourceapi.DeviceClaim{Requests: []resourceapi.DeviceRequest{req}}}
}

func TestPublishedDevicesAttributes(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	applyMIG(t, lib, 2, map[string]int{"1g.10gb": 7})
	applyMIG(t, lib, 3, map[string]int{"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1})
	inv := build(t, lib, resolve(t, lib, mixedProfile), Features{})
	var names []string
	for _, d := range inv.Devices {
		names = append(names, d.Name)
	}
	want := []string{"gpu-0", "gpu-1"}
	// GPU 2: seven 1g.10gb in placement order; GPU 3: three devices in placement order.
	for _, d := range inv.Devices {
		if d.GPU.Index == 2 || d.GPU.Index == 3 {
			want = append(want, d.Name)
		}
	}
	want = append(want, "gpu-4", "gpu-5")
	if !slices.Equal(names, want) || len(names) != 2+7+3+2 {
		t.Fatalf("devices %v", names)
	}
	for i := 1; i < len(inv.Devices); i++ {
		a, b := inv.Devices[i-1], inv.Devices[i]
		if a.GPU.Index == b.GPU.Index && a.MIG != nil && b.MIG != nil && a.MIG.Placement.Start >= b.MIG.Placement.Start {
			t.Errorf("MIG devices of GPU %d not in placement order: %s then %s", a.GPU.Index, a.Name, b.Name)
		}
	}

	dr := inv.DriverResources(nil, attrOptions{pcieRoot: func(bus string) string { return "pci" + bus[:7] }})
	pool := dr.Pools[testNode]
	if len(pool.Slices) != 6 {
		t.Fatalf("%d slices, want one per GPU with devices (6)", len(pool.Slices))
	}
	byName := map[string]resourceapi.Device{}
	for si, s := range pool.Slices {
		if len(s.Devices) > MaxDevicesPerTaintedSlice {
			t.Errorf("slice %d has %d devices", si, len(s.Devices))
		}
		for _, d := range s.Devices {
			byName[d.Name] = d
		}
	}
	g0 := byName["gpu-0"]
	s := func(d resourceapi.Device, k resourceapi.QualifiedName) string {
		a, ok := d.Attributes[k]
		switch {
		case !ok:
			return "<none>"
		case a.StringValue != nil:
			return *a.StringValue
		case a.IntValue != nil:
			return fmt.Sprint(*a.IntValue)
		case a.VersionValue != nil:
			return "v" + *a.VersionValue
		}
		return "?"
	}
	for k, v := range map[resourceapi.QualifiedName]string{
		"type": "gpu", "mode": "whole", "productName": "NVIDIA H100 80GB HBM3", "brand": "nvidia",
		"architecture": "hopper", "cudaComputeCapability": "v9.0.0", "driverVersion": "v570.133.20",
		"cudaDriverVersion": "v12.8.0", "index": "0", "minor": "0",
		"resource.kubernetes.io/pciBusID": "0000:18:00.0", "resource.kubernetes.io/pcieRoot": "pci0000:18",
		"resource.kubernetes.io/numaNode": "0",
	} {
		if got := s(g0, k); got != v {
			t.Errorf("gpu-0 %s = %s, want %s", k, got, v)
		}
	}
	if !strings.HasPrefix(s(g0, "uuid"), "GPU-") {
		t.Errorf("gpu-0 uuid %s", s(g0, "uuid"))
	}
	if m := g0.Capacity["memory"].Value; m.Value() != 81559<<20 {
		t.Errorf("gpu-0 memory %s", m.String())
	}
	var mig resourceapi.Device
	for _, d := range inv.Devices {
		if d.GPU.Index == 3 && d.MIG.Profile == "3g.40gb" {
			mig = byName[d.Name]
		}
	}
	for k, v := range map[resourceapi.QualifiedName]string{"type": "mig", "profile": "3g.40gb", "placementSize": "4", "index": "3"} {
		if got := s(mig, k); got != v {
			t.Errorf("%s %s = %s, want %s", mig.Name, k, got, v)
		}
	}
	if !strings.HasPrefix(s(mig, "uuid"), "MIG-") || !strings.HasPrefix(s(mig, "parentUUID"), "GPU-") {
		t.Errorf("%s uuids %s %s", mig.Name, s(mig, "uuid"), s(mig, "parentUUID"))
	}
	// The 3g.40gb figures NVML reports for an H100 80GB (the simulator's table: nvidia-smi mig -lgip).
	for k, v := range map[resourceapi.QualifiedName]int64{"memory": 40448 << 20, "multiprocessors": 60, "copyEngines": 3, "decoders": 3, "encoders": 0} {
		q := mig.Capacity[k].Value
		if q.Value() != v {
			t.Errorf("%s capacity %s = %s, want %d", mig.Name, k, q.String(), v)
		}
	}
	ts := byName["gpu-4"]
	if ts.AllowMultipleAllocations == nil || !*ts.AllowMultipleAllocations || s(ts, "timeSliceInterval") != "Medium" {
		t.Errorf("gpu-4 is not a shared, Medium time-sliced device: %+v", ts)
	}
	if c := ts.Capacity["clients"].Value; c.Value() != 2 {
		t.Errorf("gpu-4 clients %s, want 2", c.String())
	}
	if _, ok := byName["gpu-5"].Capacity["clients"]; ok {
		t.Error("gpu-5 has no bound on its sharers but publishes clients")
	}
	if _, ok := byName["gpu-6"]; ok {
		t.Error("GPU 6 belongs to the device plugin but is published")
	}

	// Deterministic: the same input gives the same slices.
	again := build(t, lib, resolve(t, lib, mixedProfile), Features{}).DriverResources(nil, attrOptions{pcieRoot: func(bus string) string { return "pci" + bus[:7] }})
	if !reflect.DeepEqual(again, dr) {
		t.Error("two builds of the same node differ")
	}
}

// The slices we publish, given to the scheduler's own allocator with the DeviceClasses and example
// claims we ship, allocate as intended.
func TestSlicesAllocateWithSchedulerAllocator(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	applyMIG(t, lib, 2, map[string]int{"1g.10gb": 7})
	applyMIG(t, lib, 3, map[string]int{"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1})
	inv := build(t, lib, resolve(t, lib, mixedProfile), Features{})
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	tmpl := shippedTemplates(t)

	// Whole GPUs: the two whole GPUs in slice order, then nothing.
	for _, want := range []string{"gpu-0", "gpu-1"} {
		cl := c.allocate(tmpl["whole-gpu"])
		if cl == nil || !slices.Equal(devicesOf(cl), []string{want}) {
			t.Fatalf("whole-gpu: %v, want %s", cl, want)
		}
	}
	if cl := c.allocate(tmpl["whole-gpu"]); cl != nil {
		t.Fatalf("a third whole GPU was allocated: %v (time-sliced GPUs must not serve gpu.tessera.dev)", devicesOf(cl))
	}

	// Static 1g.10gb: eight exist (seven on GPU 2, one on GPU 3); the ninth claim falls back to...
	// nothing for mig-1g-10gb, and mig-else-gpu's whole-GPU alternative has no GPU left.
	seen := map[string]bool{}
	for i := 0; i < 8; i++ {
		cl := c.allocate(tmpl["mig-1g-10gb"])
		if cl == nil {
			t.Fatalf("1g.10gb claim %d not allocated", i)
		}
		d := devicesOf(cl)[0]
		if seen[d] || !strings.Contains(d, "-mig-") {
			t.Fatalf("1g.10gb claim %d got %s", i, d)
		}
		seen[d] = true
	}
	if cl := c.allocate(tmpl["mig-1g-10gb"]); cl != nil {
		t.Fatalf("a ninth 1g.10gb: %v", devicesOf(cl))
	}
	if cl := c.allocate(tmpl["mig-else-gpu"]); cl != nil {
		t.Fatalf("mig-else-gpu with neither left: %v", devicesOf(cl))
	}
	// Bigger MIG devices by capacity.
	cl := c.allocate(request("mig.tessera.dev", 1, `device.capacity["gpu.tessera.dev"].multiprocessors.compareTo(quantity("50")) >= 0`))
	if cl == nil || s3g(inv, devicesOf(cl)[0]) != "3g.40gb" {
		t.Fatalf("a MIG device with ≥50 SMs: %v", cl)
	}

	// Time-sliced: GPU 4 takes two claims (clients 2), then GPU 5 takes any number.
	var ts []string
	for i := 0; i < 5; i++ {
		cl := c.allocate(tmpl["time-sliced-gpu"])
		if cl == nil {
			t.Fatalf("time-sliced claim %d not allocated", i)
		}
		r := cl.Status.Allocation.Devices.Results[0]
		if r.ShareID == nil {
			t.Errorf("time-sliced claim %d has no share ID", i)
		}
		ts = append(ts, r.Device)
	}
	if want := []string{"gpu-4", "gpu-4", "gpu-5", "gpu-5", "gpu-5"}; !slices.Equal(ts, want) {
		t.Errorf("time-sliced allocations %v, want %v", ts, want)
	}
	// Memory cannot be reserved on a time-sliced GPU: time-slicing does not partition it.
	mem := request("time-sliced.gpu.tessera.dev", 1)
	mem.Devices.Requests[0].Exactly.Capacity = &resourceapi.CapacityRequirements{Requests: map[resourceapi.QualifiedName]resource.Quantity{"memory": mustQ("10Gi")}}
	if cl := c.allocate(mem); cl != nil {
		t.Errorf("a memory reservation on a time-sliced GPU was allocated: %v", devicesOf(cl))
	}
}

// Taints keep a device from being allocated; without them it is allocatable again.
func TestTaintedDeviceNotAllocated(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, mixedProfile), Features{})
	taints := Taints{"gpu-0": {{Key: TaintKey, Value: "xid-79", Effect: resourceapi.DeviceTaintEffectNoSchedule}}}
	c := newCluster(t, toSlices(inv.DriverResources(taints, attrOptions{}), 1))
	cl := c.allocate(request("gpu.tessera.dev", 1))
	if cl == nil || devicesOf(cl)[0] != "gpu-1" {
		t.Fatalf("with gpu-0 tainted: %v, want gpu-1", cl)
	}
	if cl := c.allocate(request("gpu.tessera.dev", 1)); cl != nil {
		t.Fatalf("the tainted gpu-0 was allocated: %v", devicesOf(cl))
	}
	c = newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 2))
	if cl := c.allocate(request("gpu.tessera.dev", 2)); cl == nil {
		t.Fatal("after recovery both GPUs should be allocatable")
	}
}

func s3g(inv *Inventory, name string) string {
	d, ok := inv.Device(name)
	if !ok || d.MIG == nil {
		return ""
	}
	return d.MIG.Profile
}

func TestModesNotServedAreSkipped(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	res := resolve(t, lib, `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: dra, mode: whole}
  rules:
    - {name: dyn, selector: {indices: [0]}, owner: dra, mode: mig-dynamic}
    - {name: mps, selector: {indices: [1]}, owner: dra, mode: mps, mps: {replicas: 2}}
    - {name: static-off, selector: {indices: [2]}, owner: dra, mode: mig-static, mig: {layout: existing}}
    - {name: ts, selector: {indices: [3]}, owner: dra, mode: time-sliced}
`)
	inv := build(t, lib, res, Features{NoTimeSliced: true})
	var skipped []int
	for _, s := range inv.Skipped {
		skipped = append(skipped, s.GPU)
	}
	if !slices.Equal(skipped, []int{0, 1, 2, 3}) || len(inv.Devices) != 4 {
		t.Fatalf("skipped %v (%+v), devices %d", skipped, inv.Skipped, len(inv.Devices))
	}
	if inv.Skipped[3].Mode != api.ModeTimeSliced || !strings.Contains(inv.Skipped[3].Reason, "DRAConsumableCapacity") {
		t.Errorf("time-sliced skip reason: %+v", inv.Skipped[3])
	}
}

func TestSemverAndBusID(t *testing.T) {
	for in, want := range map[string]string{"570.133.20": "570.133.20", "9.0": "9.0.0", "12.8": "12.8.0", "535.104.05": "535.104.5", "8": "8.0.0"} {
		if got, ok := Semver(in); !ok || got != want {
			t.Errorf("Semver(%q) = %q %v, want %q", in, got, ok, want)
		}
	}
	for _, bad := range []string{"", "1.2.3.4", "abc", "1.x"} {
		if _, ok := Semver(bad); ok {
			t.Errorf("Semver(%q) accepted", bad)
		}
	}
	if b, ok := PCIBusID("00000000:2A:00.0"); !ok || b != "0000:2a:00.0" {
		t.Errorf("PCIBusID: %q %v", b, ok)
	}
	for _, bad := range []string{"", "10000000:18:00.0", "00000000:18:00", "garbage"} {
		if b, ok := PCIBusID(bad); ok {
			t.Errorf("PCIBusID(%q) = %q", bad, b)
		}
	}
}

// The PCIe root complex comes from sysfs (the simulator lays one out: one root complex per NUMA node).
func TestPCIeRootFromSysfs(t *testing.T) {
	e := mixedEnv(t)
	got := map[string]string{}
	for _, s := range e.pub.last().Pools[testNode].Slices {
		for _, d := range s.Devices {
			if a, ok := d.Attributes["resource.kubernetes.io/pcieRoot"]; ok {
				got[d.Name] = *a.StringValue
			}
		}
	}
	// dgx-h100: GPUs 0-3 on NUMA node 0, 4-7 on node 1.
	if got["gpu-0"] != "pci0000:10" || got["gpu-1"] != "pci0000:10" || got["gpu-4"] == "" || got["gpu-4"] == got["gpu-0"] {
		t.Errorf("pcieRoot: %v", got)
	}
}
