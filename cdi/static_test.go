package cdi_test

import (
	"os"
	"path/filepath"
	"testing"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/tessera-gpu/tessera/cdi"
)

// The static spec: whole GPUs and MIG devices under dra-<UUID>, resolvable by a runtime beside the
// node spec; refused for devices with per-claim edits; removed when empty; not rewritten unchanged.
func TestStaticSpec(t *testing.T) {
	e := newEnv(t, "gpu1-all-1g")
	g := e.generator(t)
	snap := e.snapshot(t)
	whole := cdi.WholeGPU(snap.GPUs[0].GPU)
	mig := cdi.MIGDevice(snap.GPUs[1].GPU, snap.GPUs[1].MigDevices[0])
	if _, err := g.WriteNodeSpec([]cdi.Device{whole, mig}); err != nil { // the device plugin's, beside it
		t.Fatal(err)
	}
	changed, err := g.WriteStaticSpec([]cdi.Device{mig, whole})
	if err != nil || !changed {
		t.Fatalf("first write: changed %v, %v", changed, err)
	}
	path := filepath.Join(e.specDir, g.StaticSpecName())
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(e.specDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []cdi.Device{whole, mig} {
		if cache.GetDevice(g.QualifiedName(cdi.StaticDeviceName(d))) == nil {
			t.Errorf("%s does not resolve: %v", cdi.StaticDeviceName(d), cache.GetErrors())
		}
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Errorf("the static spec conflicts with the node spec: %v", errs)
	}
	if changed, err := g.WriteStaticSpec([]cdi.Device{whole, mig}); err != nil || changed {
		t.Errorf("same devices: changed %v, %v", changed, err)
	}
	if st2, _ := os.Stat(path); !st2.ModTime().Equal(st.ModTime()) {
		t.Error("the unchanged static spec was written again")
	}
	if _, err := g.WriteStaticSpec([]cdi.Device{whole.Replica(1)}); err == nil {
		t.Error("a time-sliced replica (per-claim edits) was put in the static spec")
	}
	if _, err := g.WriteStaticSpec([]cdi.Device{whole.WithEnv("TESSERA_MEMORY_LIMIT_MIB=1024")}); err == nil {
		t.Error("a device with per-claim environment was put in the static spec")
	}
	if changed, err := g.WriteStaticSpec(nil); err != nil || !changed {
		t.Errorf("no devices: changed %v, %v", changed, err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("the static spec is left without devices: %v", err)
	}
	// CleanupStale of claim specs leaves the static spec alone.
	if _, err := g.WriteStaticSpec([]cdi.Device{whole}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.CleanupStale(cdi.Stale{Claims: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("CleanupStale removed the static spec: %v", err)
	}
}
