package dra

import (
	"context"
	"fmt"
	"strings"
	"testing"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/profile"
)

const testNode = "node-a"

func mustQ(s string) resource.Quantity { return resource.MustParse(s) }

func openSim(t testing.TB, node string) (nvmlib.Interface, *sim.Node) {
	t.Helper()
	lib, n, err := backend.Options{NVML: "sim:" + node, SimStateDir: t.TempDir()}.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	return lib, n
}

// applyMIG cuts GPU gpu into the MIG devices of layout (profile → count).
func applyMIG(t testing.TB, lib nvmlib.Interface, gpu int, layout map[string]int) {
	t.Helper()
	var devs []string
	for p, n := range layout {
		devs = append(devs, fmt.Sprintf("%q: %d", p, n))
	}
	doc := fmt.Sprintf("version: v1\nmig-configs:\n  c:\n    - devices: [%d]\n      mig-enabled: true\n      mig-devices: {%s}\n", gpu, strings.Join(devs, ", "))
	cfg, err := mig.ParseConfig([]byte(doc), "test")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := mig.Apply(context.Background(), lib, cfg, "c", mig.Options{})
	if err != nil || !rep.OK() {
		t.Fatalf("mig apply on GPU %d: %v %+v", gpu, err, rep)
	}
}

func resolve(t testing.TB, lib nvmlib.Interface, doc string) *api.Resolution {
	t.Helper()
	p, err := api.ParseProfile([]byte(doc))
	if err != nil {
		t.Fatalf("profile: %v", err)
	}
	gpus, err := profile.GPUsFromNVML(context.Background(), lib)
	if err != nil {
		t.Fatal(err)
	}
	res, err := api.Resolve(p.Profile, gpus)
	if err != nil {
		t.Fatalf("resolve: %v", err)
	}
	return res
}

func build(t testing.TB, lib nvmlib.Interface, res *api.Resolution, f Features) *Inventory {
	t.Helper()
	snap, err := inventory.New(lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return Build(BuildInput{Pool: testNode, Snapshot: snap, Resolution: res, Profiles: lib.MigProfiles, Instances: lib.GpuInstances, Features: f})
}

// toSlices turns the pool into ResourceSlice objects as the ResourceSlice controller names them.
func toSlices(dr resourceslice.DriverResources, gen int64) []*resourceapi.ResourceSlice {
	var out []*resourceapi.ResourceSlice
	for pool, p := range dr.Pools {
		for i, s := range p.Slices {
			out = append(out, &resourceapi.ResourceSlice{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%d-%s-%s", i, DriverName, pool)},
				Spec: resourceapi.ResourceSliceSpec{
					Driver:                 DriverName,
					NodeName:               ptr.To(testNode),
					Pool:                   resourceapi.ResourcePool{Name: pool, Generation: gen, ResourceSliceCount: int64(len(p.Slices))},
					Devices:                s.Devices,
					SharedCounters:         s.SharedCounters,
					PartitionTypeAttribute: s.PartitionTypeAttribute,
				},
			})
		}
	}
	return out
}

// The mixed profile most tests use on a dgx-h100: GPUs 0-1 whole, 2-3 MIG (created by the test),
// 4 time-sliced for at most two claims, 5 time-sliced without a bound, 6-7 to the device plugin.
const mixedProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - name: whole
      selector: {indices: [0, 1]}
      owner: dra
      mode: whole
    - name: mig
      selector: {indices: [2, 3]}
      owner: dra
      mode: mig-static
      mig: {layout: existing}
    - name: ts-bounded
      selector: {indices: [4]}
      owner: dra
      mode: time-sliced
      timeSlicing: {replicas: 2, interval: Medium}
    - name: ts-free
      selector: {indices: [5]}
      owner: dra
      mode: time-sliced
`
