package dra

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/cdi"
)

// staticSpec is what the driver's static CDI spec holds (cdi.WriteStaticSpec): the devices whose
// edits are the same for every claim, so that Prepare answers with their names and writes no
// transient spec. It holds the node's published devices and every static device of a claim being
// prepared or prepared, so a device never leaves the spec while a claim holds it.
type staticSpec struct {
	mu    sync.Mutex
	names map[string]bool // by cdi.StaticDeviceName
}

// has reports whether the static spec written last holds d.
func (s *staticSpec) has(d cdi.Device) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.names[cdi.StaticDeviceName(d)]
}

// staticID is the qualified CDI name of d in the static spec.
func (d *Driver) staticID(c cdi.Device) string { return d.cdi.QualifiedName(cdi.StaticDeviceName(c)) }

// usesStatic reports whether a prepared device was answered from the static spec.
func (d *Driver) usesStatic(pd PreparedDevice) bool {
	return pd.Dynamic == nil && pd.CDI.IsStatic() && pd.CDIDeviceID == d.staticID(pd.CDI)
}

// syncStaticSpec writes the static spec for the devices of the current inventory and of the prepared
// claims, when that set changed. Callers serialise it (rebuildMu, or start-up before serving).
func (d *Driver) syncStaticSpec() error {
	// The set is read and written under the lock Prepare's check takes (has): a Prepare that found
	// its device in the spec entered the index before this set was read, so the device stays.
	d.static.mu.Lock()
	defer d.static.mu.Unlock()
	devs := map[string]cdi.Device{}
	if inv := d.inv.Load(); inv != nil {
		for _, dev := range inv.Devices {
			if c := dev.CDI(); dev.Dynamic == nil && c.IsStatic() {
				devs[cdi.StaticDeviceName(c)] = c
			}
		}
	}
	// Every static device of a claim in the index, in flight ones included (a Prepare enters the
	// index before it picks its CDI names), so no Prepare answers with a name a concurrent rebuild
	// takes out of the file.
	d.idxMu.Lock()
	for _, c := range d.index {
		for _, pd := range c.Devices {
			if pd.Dynamic == nil && pd.CDI.IsStatic() {
				devs[cdi.StaticDeviceName(pd.CDI)] = pd.CDI
			}
		}
	}
	d.idxMu.Unlock()
	list := make([]cdi.Device, 0, len(devs))
	names := make(map[string]bool, len(devs))
	for n, c := range devs {
		list = append(list, c)
		names[n] = true
	}
	cdi.SortDevices(list)
	// Names leave the in-memory set only after the file no longer has them, and join it only after
	// the file has them: Prepare never answers with a name the file lacks.
	changed, err := d.cdi.WriteStaticSpec(list)
	if err != nil {
		return fmt.Errorf("dra: %w", err)
	}
	if changed {
		klog.V(2).InfoS("CDI static spec written", "devices", len(list))
	}
	d.static.names = names
	return nil
}

// ensureStaticSpec writes the static spec again when it is missing (removed behind the driver's back).
func (d *Driver) ensureStaticSpec() error {
	if _, err := os.Stat(filepath.Join(d.cdi.SpecDir(), d.cdi.StaticSpecName())); err == nil {
		return nil
	}
	klog.InfoS("Writing the missing CDI static spec")
	return d.syncStaticSpec()
}

// splitStatic returns the prepared devices (by position) that need a claim spec; the others are
// answered from the static spec (their CDIDeviceID set).
func (d *Driver) splitStatic(c *Checkpoint) []int {
	var claimSpec []int
	for i := range c.Devices {
		pd := &c.Devices[i]
		if pd.Dynamic == nil && pd.CDI.IsStatic() && d.static.has(pd.CDI) {
			pd.CDIDeviceID = d.staticID(pd.CDI)
			continue
		}
		claimSpec = append(claimSpec, i)
	}
	return claimSpec
}

// claimSpecDevices is specDevices for the prepared devices that are not answered from the static spec.
func (d *Driver) claimSpecDevices(c *Checkpoint) (*Checkpoint, bool) {
	sub := *c
	sub.Devices = slices.DeleteFunc(slices.Clone(c.Devices), d.usesStatic)
	return &sub, len(sub.Devices) > 0
}
