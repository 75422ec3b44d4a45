package models

import (
	"embed"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
	"sync"

	"sigs.k8s.io/yaml"
)

//go:embed data/*.yaml
var dataFS embed.FS

// nvidiaVendorID is the PCI vendor ID NVML reports in the low 16 bits of pciDeviceId.
const nvidiaVendorID = 0x10DE

var (
	loadOnce   sync.Once
	loadModels []Model
	loadByID   map[string]Model
	loadErr    error
)

func load() {
	entries, err := dataFS.ReadDir("data")
	if err != nil {
		loadErr = fmt.Errorf("models: reading embedded data: %w", err)
		return
	}
	byID := make(map[string]Model, len(entries))
	var models []Model
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".yaml") {
			continue
		}
		file := path.Join("data", e.Name())
		data, err := dataFS.ReadFile(file)
		if err != nil {
			loadErr = fmt.Errorf("models: %s: %w", file, err)
			return
		}
		m, err := Parse(data, file)
		if err != nil {
			loadErr = err
			return
		}
		if want := strings.TrimSuffix(e.Name(), ".yaml"); m.ID != want {
			loadErr = fmt.Errorf("models: %s: id %q does not match the file name (want %q)", file, m.ID, want)
			return
		}
		if _, dup := byID[m.ID]; dup {
			loadErr = fmt.Errorf("models: %s: duplicate model id %q", file, m.ID)
			return
		}
		byID[m.ID] = m
		models = append(models, m)
	}
	sort.Slice(models, func(i, j int) bool { return models[i].ID < models[j].ID })
	loadModels, loadByID = models, byID
}

// All returns every model in data/, sorted by ID. The slice is a copy; the models share their
// MIG tables with the cache and must not be modified.
func All() ([]Model, error) {
	loadOnce.Do(load)
	if loadErr != nil {
		return nil, loadErr
	}
	return append([]Model(nil), loadModels...), nil
}

// IDs returns the IDs of every model, sorted.
func IDs() ([]string, error) {
	all, err := All()
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(all))
	for i, m := range all {
		ids[i] = m.ID
	}
	return ids, nil
}

// Get returns the model with the given ID. The error for an unknown ID lists the known IDs.
func Get(id string) (Model, error) {
	loadOnce.Do(load)
	if loadErr != nil {
		return Model{}, loadErr
	}
	m, ok := loadByID[id]
	if !ok {
		ids := make([]string, len(loadModels))
		for i, m := range loadModels {
			ids[i] = m.ID
		}
		return Model{}, fmt.Errorf("models: unknown GPU model %q (known: %s)", id, strings.Join(ids, ", "))
	}
	return m, nil
}

// Parse decodes one model file strictly (unknown or duplicate fields are errors) and validates it.
// source names the file in errors.
func Parse(data []byte, source string) (Model, error) {
	var m Model
	if err := yaml.UnmarshalStrict(data, &m); err != nil {
		return Model{}, fmt.Errorf("models: %s: %w", source, err)
	}
	if err := m.Validate(); err != nil {
		return Model{}, fmt.Errorf("models: %s: %w", source, err)
	}
	return m, nil
}

// Validate checks a model's internal consistency. Every problem found is reported, each naming
// the field at fault.
func (m Model) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if m.ID == "" {
		bad("id: must not be empty")
	}
	if m.Name == "" {
		bad("name: must not be empty")
	}
	if m.MemoryMiB == 0 {
		bad("memoryMiB: must be positive")
	}
	if v := m.PCIDeviceID & 0xFFFF; v != nvidiaVendorID {
		bad("pciDeviceID: vendor (low 16 bits) is %#04x, want %#04x", v, nvidiaVendorID)
	}
	if m.SMCount < 0 || m.MaxSMClockMHz < 0 || m.PowerLimitW < 0 || m.IdlePowerW < 0 || m.NVLinks < 0 {
		bad("smCount, maxSMClockMHz, powerLimitW, idlePowerW, nvlinks: must not be negative")
	}
	if m.MIG != nil {
		errs = append(errs, m.MIG.validate(m.MemoryMiB)...)
	}
	return errors.Join(errs...)
}

func (g *MIG) validate(totalMiB uint64) []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if g.MemorySlices <= 0 {
		bad("mig.memorySlices: must be positive")
	}
	if g.ComputeSlices <= 0 {
		bad("mig.computeSlices: must be positive")
	}
	if len(g.Profiles) == 0 {
		bad("mig.profiles: must not be empty")
	}
	names := map[string]bool{}
	ids := map[int]string{}
	for i, p := range g.Profiles {
		f := fmt.Sprintf("mig.profiles[%d] (%s)", i, p.Name)
		if p.Name == "" {
			bad("mig.profiles[%d].name: must not be empty", i)
		} else if names[p.Name] {
			bad("%s.name: duplicate profile name %q", f, p.Name)
		}
		names[p.Name] = true
		if p.ProfileID < 0 {
			bad("%s.profileID: must not be negative", f)
		} else if other, dup := ids[p.ProfileID]; dup {
			bad("%s.profileID: duplicate profile ID %d (also %s)", f, p.ProfileID, other)
		} else {
			ids[p.ProfileID] = p.Name
		}
		if p.ComputeSlices <= 0 || p.ComputeSlices > g.ComputeSlices {
			bad("%s.computeSlices: %d not in 1..%d", f, p.ComputeSlices, g.ComputeSlices)
		}
		if p.MemorySlices <= 0 || p.MemorySlices > g.MemorySlices {
			bad("%s.memorySlices: %d not in 1..%d", f, p.MemorySlices, g.MemorySlices)
		}
		if p.MemoryMiB == 0 || p.MemoryMiB > totalMiB {
			bad("%s.memoryMiB: %d not in 1..%d (the model's memoryMiB)", f, p.MemoryMiB, totalMiB)
		}
		if p.InstanceCount <= 0 {
			bad("%s.instanceCount: must be positive", f)
		}
		if p.InstanceCount > len(p.Placements) {
			bad("%s.instanceCount: %d exceeds the %d placements", f, p.InstanceCount, len(p.Placements))
		}
		seen := map[int]bool{}
		for j, s := range p.Placements {
			pf := fmt.Sprintf("%s.placements[%d]", f, j)
			switch {
			case seen[s]:
				bad("%s: duplicate start %d", pf, s)
			case s < 0 || p.MemorySlices > 0 && s+p.MemorySlices > g.MemorySlices:
				bad("%s: start %d with size %d runs past the %d memory slices", pf, s, p.MemorySlices, g.MemorySlices)
			case p.MemorySlices > 1 && s%p.MemorySlices != 0:
				bad("%s: start %d not aligned to size %d", pf, s, p.MemorySlices)
			}
			seen[s] = true
		}
		cis := p.ComputeInstanceSlices
		if len(cis) == 0 {
			bad("%s.computeInstanceSlices: must not be empty", f)
		} else {
			for j := range cis {
				if cis[j] <= 0 || j > 0 && cis[j] <= cis[j-1] {
					bad("%s.computeInstanceSlices: must be positive and strictly increasing, got %v", f, cis)
					break
				}
			}
			if last := cis[len(cis)-1]; last != p.ComputeSlices {
				bad("%s.computeInstanceSlices: largest is %d, want computeSlices %d", f, last, p.ComputeSlices)
			}
		}
	}
	return errs
}

// Profile returns the MIG GPU-instance profile with the given nvidia-smi name, e.g. "3g.20gb".
func (m Model) Profile(name string) (GIProfile, bool) {
	if m.MIG == nil {
		return GIProfile{}, false
	}
	for _, p := range m.MIG.Profiles {
		if p.Name == name {
			return p, true
		}
	}
	return GIProfile{}, false
}

// ProfileByID returns the MIG GPU-instance profile with the given NVML GPU_INSTANCE_PROFILE_* ID.
func (m Model) ProfileByID(id int) (GIProfile, bool) {
	if m.MIG == nil {
		return GIProfile{}, false
	}
	for _, p := range m.MIG.Profiles {
		if p.ProfileID == id {
			return p, true
		}
	}
	return GIProfile{}, false
}
