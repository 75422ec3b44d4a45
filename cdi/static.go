package cdi

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

// The DRA driver's static spec holds the devices whose edits are the same for every claim — whole
// GPUs and existing MIG devices — under names of their own (StaticDeviceName), so that a claim given
// one needs no transient spec. Container runtimes re-read every spec in their spec directories on
// each spec written or removed (the CDI library's auto-refresh): a transient spec per claim cost
// containerd about as much CPU per claim as the whole driver. Devices with per-claim edits (a share's
// limits, an MPS fraction, a MIG device made at Prepare) keep their transient claim spec.

// StaticSpecName is the file name of the DRA driver's static spec: <vendor>-<class>-dra.json. It is
// neither the node spec's name nor a claim spec's (<vendor>-<class>_<uid>.json), so CleanupStale
// leaves it alone.
func (g *Generator) StaticSpecName() string {
	return cdiapi.GenerateSpecName(g.vendor, g.class) + "-dra" + specExt
}

// StaticDeviceName names a device in the static spec: dra-<UUID of the GPU or MIG device>, apart
// from the device plugin's node spec names.
func StaticDeviceName(d Device) string { return "dra-" + d.UUID() }

// IsStatic reports whether d's edits are the same for every claim: a whole GPU or a MIG device,
// without replica, MPS fraction or per-claim environment.
func (d Device) IsStatic() bool { return d.TimeSlice == nil && d.MPS == nil && len(d.Env) == 0 }

// StaticSpec builds the static spec of devices (every one IsStatic), sorted, with the common edits.
func (g *Generator) StaticSpec(devices []Device) (*specs.Spec, error) {
	ds := slices.Clone(devices)
	SortDevices(ds)
	spec := &specs.Spec{Kind: g.cfg.vendorClass, ContainerEdits: cloneEdits(g.common)}
	seen := map[string]bool{}
	for _, d := range ds {
		if !d.IsStatic() {
			return nil, fmt.Errorf("%s has per-claim edits: it belongs in a claim spec", d)
		}
		n := StaticDeviceName(d)
		if seen[n] {
			continue
		}
		seen[n] = true
		edits, err := g.DeviceEdits(d)
		if err != nil {
			return nil, err
		}
		spec.Devices = append(spec.Devices, specs.Device{Name: n, ContainerEdits: edits})
	}
	if err := g.finish(spec); err != nil {
		return nil, err
	}
	return spec, nil
}

// WriteStaticSpec writes the static spec of devices, or removes it when there are none, and reports
// whether the file changed: the same content is not written again, since every write makes the
// container runtimes re-read their spec directories.
func (g *Generator) WriteStaticSpec(devices []Device) (bool, error) {
	path := filepath.Join(g.cfg.specDir, g.StaticSpecName())
	if len(devices) == 0 {
		err := os.Remove(path)
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("cdi: static spec: %w", err)
		}
		return true, nil
	}
	spec, err := g.StaticSpec(devices)
	if err != nil {
		return false, fmt.Errorf("cdi: static spec: %w", err)
	}
	data, err := encode(spec)
	if err != nil {
		return false, fmt.Errorf("cdi: static spec: %w", err)
	}
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if _, err := g.writeData(data, g.StaticSpecName(), false); err != nil {
		return false, fmt.Errorf("cdi: static spec: %w", err)
	}
	return true, nil
}
