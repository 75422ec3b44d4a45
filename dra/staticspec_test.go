package dra

import (
	"encoding/json"
	"os"
	"slices"
	"strings"
	"testing"

	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/tessera-gpu/tessera/cdi"
)

func (e *env) staticNames(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(e.staticSpecPath())
	if err != nil {
		t.Fatal(err)
	}
	var s specs.Spec
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range s.Devices {
		out = append(out, d.Name)
	}
	return out
}

// The static spec holds the node's whole GPUs and existing MIG devices under names of their own,
// is written again only when they change, keeps a device a prepared claim holds even after the
// device leaves the inventory, and a device it lacks is answered with a claim spec instead.
func TestStaticSpec(t *testing.T) {
	e := mixedEnv(t)
	inv := e.d.Inventory()
	gpu0, _ := inv.Device("gpu-0")
	mig2, _ := inv.Device("gpu-2-mig-" + migOf(t, e, 2))
	names := e.staticNames(t)
	for _, d := range []*Device{gpu0, mig2} {
		if !slices.Contains(names, cdi.StaticDeviceName(d.CDI())) {
			t.Errorf("static spec %v lacks %s", names, cdi.StaticDeviceName(d.CDI()))
		}
	}
	for _, n := range names {
		if !strings.HasPrefix(n, "dra-") {
			t.Errorf("static spec device %q is not named dra-<UUID>", n)
		}
	}

	// Unchanged devices: not written again (every write makes the runtimes re-read their specs).
	st, _ := os.Stat(e.staticSpecPath())
	if err := e.d.rebuild(e.ctx); err != nil {
		t.Fatal(err)
	}
	if st2, _ := os.Stat(e.staticSpecPath()); !st2.ModTime().Equal(st.ModTime()) {
		t.Error("the static spec was written again with the same devices")
	}

	// A prepared claim keeps its device in the spec after the device leaves the inventory.
	c := e.claim("held", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(c)
	without := *inv
	without.Devices = slices.DeleteFunc(slices.Clone(inv.Devices), func(d *Device) bool { return d.Name == "gpu-0" })
	e.d.inv.Store(&without)
	if err := e.d.syncStaticSpec(); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(e.staticNames(t), cdi.StaticDeviceName(gpu0.CDI())) || !e.resolves(c.UID) {
		t.Fatal("the device of a prepared claim left the static spec")
	}
	if err := e.unprepare(c); err != nil {
		t.Fatal(err)
	}
	if err := e.d.syncStaticSpec(); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(e.staticNames(t), cdi.StaticDeviceName(gpu0.CDI())) {
		t.Error("a device neither published nor prepared is still in the static spec")
	}
	e.d.inv.Store(inv)

	// A device the static spec lacks is answered with a claim spec.
	e.d.static.mu.Lock()
	e.d.static.names = map[string]bool{}
	e.d.static.mu.Unlock()
	c1 := e.claim("fallback", []alloc{{"gpu", "gpu-1", false}})
	devs := e.mustPrepare(c1)
	if !e.hasSpec(c1.UID) || !e.resolves(c1.UID) || !strings.HasPrefix(devs[0].CDIDeviceIDs[0], "tessera.dev/gpu="+string(c1.UID)+"_") {
		t.Errorf("fallback: claim spec %v, resolves %v, IDs %v", e.hasSpec(c1.UID), e.resolves(c1.UID), devs[0].CDIDeviceIDs)
	}
}
