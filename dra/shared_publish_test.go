package dra

import (
	"slices"
	"strings"
	"testing"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tessera-gpu/tessera/api"
)

// GPU 0 shared (time-sliced isolation) with 1Gi kept back, GPU 1 shared through MPS for at most
// three claims; the others are not DRA's.
const sharedProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: none}
  rules:
    - name: shared-ts
      selector: {indices: [0]}
      owner: dra
      mode: shared
      shared: {memoryReserve: 1Gi}
    - name: shared-mps
      selector: {indices: [1]}
      owner: dra
      mode: shared
      shared: {isolation: mps, maxClients: 3, defaultMemory: 4Gi}
`

func withCapacity(spec resourceapi.ResourceClaimSpec, kv ...string) resourceapi.ResourceClaimSpec {
	req := map[resourceapi.QualifiedName]resource.Quantity{}
	for i := 0; i < len(kv); i += 2 {
		req[resourceapi.QualifiedName(kv[i])] = resource.MustParse(kv[i+1])
	}
	spec.Devices.Requests[0].Exactly.Capacity = &resourceapi.CapacityRequirements{Requests: req}
	return spec
}

func consumed(t *testing.T, cl *resourceapi.ResourceClaim) map[string]string {
	t.Helper()
	out := map[string]string{}
	for k, v := range cl.Status.Allocation.Devices.Results[0].ConsumedCapacity {
		out[string(k)] = v.String()
	}
	return out
}

// A shared GPU is one multi-allocatable device whose capacities follow NVML's memory and the
// profile, with request policies the API server accepts.
func TestSharedDevicePublished(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, sharedProfile), Features{})
	if len(inv.Devices) != 2 || len(inv.Skipped) != 0 {
		t.Fatalf("devices %d, skipped %+v", len(inv.Devices), inv.Skipped)
	}
	dr := inv.DriverResources(nil, attrOptions{})
	byName := map[string]resourceapi.Device{}
	for _, s := range dr.Pools[testNode].Slices {
		for _, d := range s.Devices {
			byName[d.Name] = d
		}
	}
	for name, w := range map[string]struct {
		iso     string
		mem     int64
		defMem  string
		defPct  int64
		clients int64
	}{
		"gpu-0": {"time-sliced", (81559 - 1024) << 20, "1Gi", 10, 0},
		"gpu-1": {"mps", 81559 << 20, "4Gi", 33, 3},
	} {
		d := byName[name]
		if d.AllowMultipleAllocations == nil || !*d.AllowMultipleAllocations {
			t.Errorf("%s is not multi-allocatable", name)
		}
		for k, v := range map[resourceapi.QualifiedName]string{"type": "gpu", "mode": "shared", "isolation": w.iso} {
			if a, ok := d.Attributes[k]; !ok || a.StringValue == nil || *a.StringValue != v {
				t.Errorf("%s attribute %s = %+v, want %s", name, k, a, v)
			}
		}
		mem := d.Capacity["memory"]
		if mem.Value.Value() != w.mem {
			t.Errorf("%s memory %d, want %d (NVML's figure minus the reserve)", name, mem.Value.Value(), w.mem)
		}
		if p := mem.RequestPolicy; p == nil || p.Default.String() != w.defMem || p.ValidRange == nil || p.ValidRange.Min.String() != "1Gi" || p.ValidRange.Step.String() != "1Gi" || p.ValidRange.Max != nil {
			t.Errorf("%s memory policy %+v", name, p)
		}
		cp := d.Capacity["computePercent"]
		if cp.Value.Value() != 100 || cp.RequestPolicy.Default.Value() != w.defPct || cp.RequestPolicy.ValidRange.Max.Value() != 100 || cp.RequestPolicy.ValidRange.Min.Value() != 1 {
			t.Errorf("%s computePercent %+v", name, cp)
		}
		cl, ok := d.Capacity["clients"]
		if ok != (w.clients > 0) || ok && cl.Value.Value() != w.clients {
			t.Errorf("%s clients %+v (present %v), want %d", name, cl, ok, w.clients)
		}
		// The API's rules for a CapacityRequestPolicy with a ValidRange.
		for cname, c := range d.Capacity {
			p := c.RequestPolicy
			if p == nil || p.ValidRange == nil {
				continue
			}
			r := p.ValidRange
			capv, def, minv := c.Value.Value(), p.Default.Value(), r.Min.Value()
			switch {
			case minv < 0 || minv > capv:
				t.Errorf("%s %s: min %d outside 0..%d", name, cname, minv, capv)
			case def < minv || r.Max != nil && def > r.Max.Value():
				t.Errorf("%s %s: default %d outside the range", name, cname, def)
			case r.Max != nil && r.Max.Value() > capv:
				t.Errorf("%s %s: max above the capacity", name, cname)
			case r.Step != nil && (def%r.Step.Value() != 0 || minv+r.Step.Value() > capv || r.Max != nil && r.Max.Value()%r.Step.Value() != 0):
				t.Errorf("%s %s: step %d does not fit default %d / max / capacity %d", name, cname, r.Step.Value(), def, capv)
			}
		}
	}
}

// The scheduler's allocator, on a dgx-h100 whose GPU 0 is shared: memory runs out at NVML's
// figure minus the reserve (not at a rounded 80 GiB), defaults and steps are what the slice says,
// and maxClients bounds the claims.
func TestSharedAllocatesWithSchedulerAllocator(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, sharedProfile), Features{})
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	onTS := `device.attributes["gpu.tessera.dev"].isolation == "time-sliced"`
	onMPS := `device.attributes["gpu.tessera.dev"].isolation == "mps"`

	// 80535 MiB usable on GPU 0: seven 10 GiB claims (71680 MiB) fit; an eighth does not, though it
	// would within a rounded "80 GiB" (81920 MiB = 8 × 10 GiB).
	for i := range 7 {
		cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onTS), "memory", "10Gi"))
		if cl == nil || devicesOf(cl)[0] != "gpu-0" {
			t.Fatalf("10Gi claim %d: %v", i, cl)
		}
		r := cl.Status.Allocation.Devices.Results[0]
		if r.ShareID == nil {
			t.Fatalf("10Gi claim %d has no share ID", i)
		}
		if got := consumed(t, cl); got["memory"] != "10Gi" || got["computePercent"] != "10" {
			t.Errorf("10Gi claim %d consumed %v", i, got)
		}
	}
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onTS), "memory", "10Gi")); cl != nil {
		t.Fatalf("an eighth 10Gi claim fit on GPU 0: %v", consumed(t, cl))
	}
	// 8855 MiB are left: 9Gi does not fit (it would without the 1Gi reserve), 8Gi does, then no step.
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onTS), "memory", "9Gi")); cl != nil {
		t.Fatalf("9Gi fit into the reserve: %v", consumed(t, cl))
	}
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onTS), "memory", "8Gi")); cl == nil {
		t.Fatal("the last 8Gi of GPU 0 were not allocated")
	}
	if cl := c.allocate(request("shared.gpu.tessera.dev", 1, onTS)); cl != nil {
		t.Fatalf("a default (1Gi) claim fit into 663 MiB: %v", consumed(t, cl))
	}

	// GPU 1 (mps, maxClients 3, defaultMemory 4Gi): a claim that asks for nothing consumes exactly
	// the defaults; 1.5Gi is rounded up to 2Gi; the fourth claim is refused by clients.
	cl := c.allocate(request("shared.gpu.tessera.dev", 1, onMPS))
	if cl == nil {
		t.Fatal("a default claim on GPU 1 was not allocated")
	}
	if got, want := consumed(t, cl), map[string]string{"memory": "4Gi", "computePercent": "33", "clients": "1"}; !mapsEqual(got, want) {
		t.Errorf("default claim consumed %v, want %v", got, want)
	}
	cl = c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onMPS), "memory", "1536Mi", "computePercent", "5"))
	if cl == nil {
		t.Fatal("a 1.5Gi claim on GPU 1 was not allocated")
	}
	if got := consumed(t, cl); got["memory"] != "2Gi" || got["computePercent"] != "5" {
		t.Errorf("1.5Gi claim consumed %v, want memory 2Gi (rounded up by the step)", got)
	}
	if cl := c.allocate(request("shared.gpu.tessera.dev", 1, onMPS)); cl == nil {
		t.Fatal("the third claim on GPU 1 was not allocated")
	}
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1, onMPS), "memory", "1Gi")); cl != nil {
		t.Fatalf("a fourth claim on a GPU with maxClients 3: %v", consumed(t, cl))
	}
	// More than 100 % of compute is not given out.
	if cl := c.allocate(withCapacity(request("shared.gpu.tessera.dev", 1), "computePercent", "101")); cl != nil {
		t.Fatalf("computePercent 101 allocated: %v", consumed(t, cl))
	}
}

// The shipped class and template give a claim 10Gi and 20 % of a shared GPU.
func TestSharedShippedTemplate(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, sharedProfile), Features{})
	c := newCluster(t, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
	tmpl, ok := shippedTemplates(t)["shared-gpu-10gi"]
	if !ok {
		t.Fatal("claims.yaml has no shared-gpu-10gi")
	}
	var devs []string
	for i := range 6 {
		cl := c.allocate(tmpl)
		if cl == nil {
			devs = append(devs, "-")
			continue
		}
		devs = append(devs, devicesOf(cl)[0])
		if got := consumed(t, cl); got["memory"] != "10Gi" || got["computePercent"] != "20" {
			t.Errorf("claim %d consumed %v", i, got)
		}
	}
	// 20 % each: five claims on GPU 0 use its compute, the sixth goes to GPU 1.
	if want := []string{"gpu-0", "gpu-0", "gpu-0", "gpu-0", "gpu-0", "gpu-1"}; !slices.Equal(devs, want) {
		t.Errorf("allocations %v, want %v", devs, want)
	}
	// Whole and time-sliced classes do not take shared GPUs.
	for _, class := range []string{"gpu.tessera.dev", "time-sliced.gpu.tessera.dev"} {
		if cl := c.allocate(request(class, 1)); cl != nil {
			t.Errorf("class %s got %v", class, devicesOf(cl))
		}
	}
}

// A cluster that drops allowMultipleAllocations gets no shared GPUs either.
func TestSharedOffWithoutConsumableCapacity(t *testing.T) {
	lib, _ := openSim(t, "dgx-h100")
	inv := build(t, lib, resolve(t, lib, sharedProfile), Features{NoTimeSliced: true})
	if len(inv.Devices) != 0 || len(inv.Skipped) != 2 {
		t.Fatalf("devices %d, skipped %+v", len(inv.Devices), inv.Skipped)
	}
	for _, s := range inv.Skipped {
		if s.Mode != api.ModeShared || !strings.Contains(s.Reason, "DRAConsumableCapacity") {
			t.Errorf("skip %+v", s)
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
