package dra

import (
	"context"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/structured"
)

// BenchmarkAllocatorOneNode is the scheduler's per-node work for one pod's claim (its DRA Filter
// runs the structured allocator on each candidate node's slices), for each of our slice models on a
// dgx-h100, with half the node already allocated.
func BenchmarkAllocatorOneNode(b *testing.B) {
	for _, m := range []struct{ name, profile, class, cel string }{
		{"whole", "defaults: {owner: dra, mode: whole}", "gpu.tessera.dev", ""},
		{"dynamic-mig", "defaults: {owner: dra, mode: mig-dynamic}", "mig.tessera.dev", profileIs("1g.10gb")},
		{"dynamic-mig-3-profiles", "defaults: {owner: dra, mode: mig-dynamic, migDynamic: {profiles: [1g.10gb, 3g.40gb, 7g.80gb]}}", "mig.tessera.dev", profileIs("1g.10gb")},
		{"shared", "defaults: {owner: dra, mode: shared}", "shared.gpu.tessera.dev", ""},
	} {
		b.Run(m.name, func(b *testing.B) {
			lib, _ := openSim(b, "dgx-h100")
			if strings.Contains(m.profile, "mig-dynamic") {
				for i := range 8 {
					if _, err := lib.SetMigMode(i, true); err != nil {
						b.Fatal(err)
					}
				}
			}
			inv := build(b, lib, resolve(b, lib, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  "+m.profile+"\n"), Features{})
			c := newCluster(b, toSlices(inv.DriverResources(nil, attrOptions{}), 1))
			var spec resourceapi.ResourceClaimSpec
			if m.cel != "" {
				spec = request(m.class, 1, m.cel)
			} else {
				spec = request(m.class, 1)
			}
			if m.name == "shared" {
				spec = withCapacity(spec, "memory", "10Gi")
			}
			for range 4 { // the node half full
				if c.allocate(spec) == nil {
					b.Fatal("setup allocation failed")
				}
			}
			claim := &resourceapi.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "bench", UID: "bench-uid"}, Spec: spec}
			node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode, Labels: map[string]string{"kubernetes.io/hostname": testNode}}}
			cache := cel.NewCache(10, cel.Features{})
			ctx := context.Background()
			b.ResetTimer()
			for range b.N {
				a, err := structured.NewAllocator(ctx, allocFeatures, c.state, c.classes, c.slices, cache)
				if err != nil {
					b.Fatal(err)
				}
				res, err := a.Allocate(ctx, node, []*resourceapi.ResourceClaim{claim})
				if err != nil || len(res) == 0 {
					b.Fatalf("allocate: %v %v", res, err)
				}
			}
			b.ReportMetric(float64(len(inv.Devices)), "devices")
		})
	}
}
