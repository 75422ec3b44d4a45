package dra

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Dynamic MIG (mode mig-dynamic): the GPU's MIG mode is on and it has no MIG devices but the ones
// Tessera creates at Prepare. Each GPU publishes one counter set (in a counters-only slice of the
// pool) holding one counter per memory slice, the compute slices and each engine kind; every
// placement of every allowed profile is a device that consumes the counters its GPU instance would
// take, and the whole-GPU device consumes all of them. The scheduler's allocator therefore never
// gives two claims overlapping placements, nor more compute slices or engines than the GPU has.

// Counter names of a mig-dynamic GPU's counter set (DNS labels, as the API wants them).
const (
	counterMemorySlice   = "memory-slice-" // + slice number
	counterComputeSlices = "compute-slices"
	counterCopyEngines   = "copy-engines"
	counterDecoders      = "decoders"
	counterEncoders      = "encoders"
	counterJPEGs         = "jpeg-engines"
	counterOFAs          = "ofa-engines"
)

// MaxCounterSetsPerSlice is the most counter sets a ResourceSlice holds (resource.k8s.io/v1).
const MaxCounterSetsPerSlice = resourceapi.ResourceSliceMaxCounterSets

// PartitionTypeAttribute is the attribute that names a partitionable device's partition type
// (its MIG profile), published as the slice's partitionTypeAttribute where the cluster keeps it.
const PartitionTypeAttribute = resourceapi.FullyQualifiedName(DriverName + "/profile")

// DynamicMIG is a MIG device a claim's Prepare creates: its GPU-instance profile and placement, and
// once created its GPU and compute instance.
type DynamicMIG struct {
	ProfileID int              `json:"profileID"`
	Profile   string           `json:"profile"`
	Placement nvmlib.Placement `json:"placement"`
	// GI and CI are the instances Prepare created; -1 before they exist.
	GI int `json:"gpuInstance"`
	CI int `json:"computeInstance"`
}

// dynamicShape is what the counters of one mig-dynamic GPU are made from: its profiles (with
// placements, as NVML reports them in MIG mode) and the totals of each counter.
type dynamicShape struct {
	profiles     []nvmlib.MigProfile
	full         nvmlib.MigProfile // the profile spanning the whole GPU (7g.*)
	memSlices    int
	totals       map[string]int64
	counterNames []string
}

func newDynamicShape(ps []nvmlib.MigProfile) (*dynamicShape, error) {
	s := &dynamicShape{totals: map[string]int64{}}
	for _, p := range ps {
		if len(p.Placements) == 0 {
			continue
		}
		s.profiles = append(s.profiles, p)
		for _, pl := range p.Placements {
			s.memSlices = max(s.memSlices, pl.End())
		}
		for name, n := range engineUse(p) {
			s.totals[name] = max(s.totals[name], n)
		}
		if p.ComputeSlices > s.full.ComputeSlices || (p.ComputeSlices == s.full.ComputeSlices && p.MemoryMiB > s.full.MemoryMiB) {
			s.full = p
		}
	}
	if len(s.profiles) == 0 {
		return nil, errors.New("NVML reports no MIG placements for the GPU")
	}
	if s.memSlices > resourceapi.ResourceSliceMaxCountersPerCounterSet-len(s.totals) {
		return nil, fmt.Errorf("the GPU has %d memory slices: more counters than a counter set holds", s.memSlices)
	}
	for k := range s.memSlices {
		s.counterNames = append(s.counterNames, counterMemorySlice+strconv.Itoa(k))
	}
	for _, name := range slices.Sorted(mapKeys(s.totals)) {
		if s.totals[name] > 0 {
			s.counterNames = append(s.counterNames, name)
		} else {
			delete(s.totals, name)
		}
	}
	return s, nil
}

func mapKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// engineUse is what a GPU instance of profile p takes of the non-memory counters.
func engineUse(p nvmlib.MigProfile) map[string]int64 {
	return map[string]int64{
		counterComputeSlices: int64(p.ComputeSlices),
		counterCopyEngines:   int64(p.CopyEngines),
		counterDecoders:      int64(p.Decoders),
		counterEncoders:      int64(p.Encoders),
		counterJPEGs:         int64(p.JPEGs),
		counterOFAs:          int64(p.OFAs),
	}
}

// counterSet is the GPU's counter set.
func (s *dynamicShape) counterSet(name string) resourceapi.CounterSet {
	cs := resourceapi.CounterSet{Name: name, Counters: map[string]resourceapi.Counter{}}
	for k := range s.memSlices {
		cs.Counters[counterMemorySlice+strconv.Itoa(k)] = resourceapi.Counter{Value: *resource.NewQuantity(1, resource.DecimalSI)}
	}
	for name, n := range s.totals {
		cs.Counters[name] = resourceapi.Counter{Value: *resource.NewQuantity(n, resource.DecimalSI)}
	}
	return cs
}

// consumption is what a GPU instance of profile p at placement pl takes; whole takes everything.
func (s *dynamicShape) consumption(set string, p nvmlib.MigProfile, pl nvmlib.Placement, whole bool) []resourceapi.DeviceCounterConsumption {
	c := map[string]resourceapi.Counter{}
	one := func(n int64) resourceapi.Counter {
		return resourceapi.Counter{Value: *resource.NewQuantity(n, resource.DecimalSI)}
	}
	if whole {
		for k := range s.memSlices {
			c[counterMemorySlice+strconv.Itoa(k)] = one(1)
		}
		for name, n := range s.totals {
			c[name] = one(n)
		}
	} else {
		for k := pl.Start; k < pl.End(); k++ {
			c[counterMemorySlice+strconv.Itoa(k)] = one(1)
		}
		for name, n := range engineUse(p) {
			if _, ok := s.totals[name]; ok && n > 0 {
				c[name] = one(n)
			}
		}
	}
	return []resourceapi.DeviceCounterConsumption{{CounterSet: set, Counters: c}}
}

// CounterSetName is the name of GPU index's counter set.
func CounterSetName(index int) string { return "gpu-" + strconv.Itoa(index) + "-counters" }

// DynamicName is the device name of a placement: gpu-<index>-mig-<profile>-<start>, the profile
// spelled as a DNS label (1g.10gb+me → 1g-10gb-me).
func DynamicName(index int, profile string, start int) string {
	p := strings.NewReplacer(".", "-", "+", "-").Replace(strings.ToLower(profile))
	return fmt.Sprintf("gpu-%d-mig-%s-%d", index, p, start)
}

// ownedInstance is a GPU instance a claim of ours holds (from its checkpoint), by GPU UUID.
type ownedInstance struct {
	ProfileID int
	Placement nvmlib.Placement
	// Held: the claim is unprepared but the instance could not be destroyed yet.
	Held bool
}

// buildDynamic adds the devices of one mig-dynamic GPU. Placements that overlap a GPU instance
// Tessera did not create are not published (nor is the whole-GPU device then), so nothing is offered
// that Prepare could not create.
func (inv *Inventory) buildDynamic(g nvmlib.GPU, allowed []string, ps []nvmlib.MigProfile, gis []nvmlib.GpuInstance, owned []ownedInstance) (hidden []string, err error) {
	shape, err := newDynamicShape(ps)
	if err != nil {
		return nil, err
	}
	var foreign []nvmlib.GpuInstance
	byID := map[int]nvmlib.MigProfile{}
	for _, p := range ps {
		byID[p.ID] = p
	}
	for _, gi := range gis {
		i := slices.IndexFunc(owned, func(o ownedInstance) bool { return o.ProfileID == gi.ProfileID && o.Placement == gi.Placement })
		if i < 0 {
			foreign = append(foreign, gi)
		}
		if i < 0 || owned[i].Held {
			// Not the scheduler's to account (foreign, or its claim is gone but the instance is not):
			// what it takes of compute slices and engines is not offered.
			for name, n := range engineUse(byID[gi.ProfileID]) {
				if _, ok := shape.totals[name]; ok {
					shape.totals[name] = max(0, shape.totals[name]-n)
				}
			}
		}
	}
	overlapsForeign := func(pl nvmlib.Placement) bool {
		return slices.ContainsFunc(foreign, func(gi nvmlib.GpuInstance) bool { return gi.Placement.Overlaps(pl) })
	}
	ok := func(name string) bool { return len(allowed) == 0 || slices.Contains(allowed, name) }
	set := CounterSetName(g.Index)
	inv.CounterSets = append(inv.CounterSets, shape.counterSet(set))
	wholePl := nvmlib.Placement{Start: 0, Size: shape.memSlices}
	if ok(shape.full.Name) {
		d := &Device{Name: GPUName(g.Index), GPU: g, Mode: api.ModeMIGDynamic, Dynamic: &DynamicPlacement{Profile: shape.full, Placement: fullPlacement(shape.full, wholePl), Whole: true}}
		d.consumes = shape.consumption(set, shape.full, wholePl, true)
		if len(foreign) > 0 {
			hidden = append(hidden, d.Name)
		} else {
			inv.add(d)
		}
	}
	// Profiles by size (smallest first), then ID; placements from the highest start down, so small
	// instances fill the GPU from its end and leave the low placements that large profiles need.
	profiles := slices.Clone(shape.profiles)
	slices.SortFunc(profiles, func(a, b nvmlib.MigProfile) int {
		return cmp.Or(cmp.Compare(a.Placements[0].Size, b.Placements[0].Size), cmp.Compare(a.ComputeSlices, b.ComputeSlices), cmp.Compare(a.ID, b.ID))
	})
	for _, p := range profiles {
		if !ok(p.Name) {
			continue
		}
		pls := slices.Clone(p.Placements)
		slices.SortFunc(pls, func(a, b nvmlib.Placement) int { return cmp.Compare(b.Start, a.Start) })
		for _, pl := range pls {
			d := &Device{Name: DynamicName(g.Index, p.Name, pl.Start), GPU: g, Mode: api.ModeMIGDynamic, Dynamic: &DynamicPlacement{Profile: p, Placement: pl}}
			d.consumes = shape.consumption(set, p, pl, false)
			if overlapsForeign(pl) {
				hidden = append(hidden, d.Name)
				continue
			}
			inv.add(d)
		}
	}
	return hidden, nil
}

// fullPlacement is the placement the full profile's instance takes (NVML's, else the whole GPU).
func fullPlacement(p nvmlib.MigProfile, whole nvmlib.Placement) nvmlib.Placement {
	if len(p.Placements) > 0 {
		return p.Placements[0]
	}
	return whole
}

// DynamicPlacement is a placement a mig-dynamic device stands for.
type DynamicPlacement struct {
	Profile   nvmlib.MigProfile
	Placement nvmlib.Placement
	// Whole marks the whole-GPU device: it takes every counter and is prepared as one instance of
	// the full profile.
	Whole bool
}

// createDynamic creates the GPU and compute instance of a mig-dynamic device and returns what the
// container gets. On failure nothing is left behind.
func createDynamic(lib nvmlib.Interface, gpu cdi.GPU, dm *DynamicMIG) (cdi.Device, error) {
	where := fmt.Sprintf("MIG %s at placement %s on GPU %d", dm.Profile, dm.Placement, gpu.Index)
	gi, err := lib.CreateGpuInstance(gpu.Index, dm.ProfileID, dm.Placement)
	if err != nil {
		return cdi.Device{}, fmt.Errorf("creating the GPU instance of %s: %w", where, err)
	}
	sizes, err := lib.ComputeInstanceSizes(gpu.Index, gi)
	if err == nil && len(sizes) == 0 {
		err = errors.New("the GPU instance offers no compute-instance size")
	}
	var ci int
	if err == nil {
		ci, err = lib.CreateComputeInstance(gpu.Index, gi, slices.Max(sizes))
	}
	if err != nil {
		if derr := destroyInstances(lib, gpu.Index, gi); derr != nil {
			err = errors.Join(err, fmt.Errorf("destroying the GPU instance again: %w", derr))
			dm.GI = gi // still there: the caller records it
		}
		return cdi.Device{}, fmt.Errorf("creating the compute instance of %s: %w", where, err)
	}
	migs, err := lib.MigDevices(gpu.Index)
	if err == nil {
		for _, m := range migs {
			if m.GI == gi && m.CI == ci {
				dm.GI, dm.CI = gi, ci
				return cdi.Device{GPU: gpu, MIG: &cdi.MIG{GI: gi, CI: ci, UUID: m.UUID}}, nil
			}
		}
		err = errors.New("NVML lists no MIG device for it")
	}
	derr := destroyInstances(lib, gpu.Index, gi)
	if derr != nil {
		dm.GI, dm.CI = gi, ci // still there: the caller records it
	}
	return cdi.Device{}, errors.Join(fmt.Errorf("reading the MIG device of %s: %w", where, err), derr)
}

// destroyDynamic destroys a mig-dynamic device's instances. Before they were recorded (a crash
// right after creating them) the GPU instance is found by its profile and placement. An instance
// that is gone already is not an error. nvmlib.ErrInUse means processes still run on it.
func destroyDynamic(lib nvmlib.Interface, gpu int, dm DynamicMIG) error {
	gis, err := lib.GpuInstances(gpu)
	if err != nil {
		return fmt.Errorf("listing the GPU instances of GPU %d: %w", gpu, err)
	}
	for _, gi := range gis {
		if (dm.GI >= 0 && gi.ID == dm.GI) || (dm.GI < 0 && gi.ProfileID == dm.ProfileID && gi.Placement == dm.Placement) {
			if gi.ProfileID != dm.ProfileID || gi.Placement != dm.Placement {
				return nil // the ID was reused by an instance that is not this one
			}
			return destroyInstances(lib, gpu, gi.ID)
		}
	}
	return nil
}

func destroyInstances(lib nvmlib.Interface, gpu, giID int) error {
	gis, err := lib.GpuInstances(gpu)
	if err != nil {
		return err
	}
	for _, gi := range gis {
		if gi.ID != giID {
			continue
		}
		for _, ci := range gi.ComputeInstances {
			if err := lib.DestroyComputeInstance(gpu, giID, ci.ID); err != nil && !errors.Is(err, nvmlib.ErrNotFound) {
				return fmt.Errorf("destroying compute instance %d of GPU instance %d on GPU %d: %w", ci.ID, giID, gpu, err)
			}
		}
		if err := lib.DestroyGpuInstance(gpu, giID); err != nil && !errors.Is(err, nvmlib.ErrNotFound) {
			return fmt.Errorf("destroying GPU instance %d on GPU %d: %w", giID, gpu, err)
		}
	}
	return nil
}
