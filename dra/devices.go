package dra

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// DriverName is the DRA driver's name; the driver-domain attributes and capacities are in it.
const DriverName = api.DriverName

// TaintKey is the key of the taint an unhealthy device gets in its slice.
const TaintKey = DriverName + "/unhealthy"

// Device kinds (attribute "type").
const (
	TypeGPU = "gpu"
	TypeMIG = "mig"
)

// Limits of a ResourceSlice (resource.k8s.io/v1): at most 128 devices, at most 64 when any device
// uses counters or taints. Every slice we publish may carry taints, so we keep to 64.
const (
	MaxDevicesPerSlice        = 128
	MaxDevicesPerTaintedSlice = 64
)

// Device is one device the driver publishes: a whole GPU (exclusive or time-sliced) or a MIG device.
type Device struct {
	// Name is the device's name in the pool: gpu-<index> or gpu-<index>-mig-<gi>-<ci>.
	Name string
	GPU  nvmlib.GPU
	// MIG is set for a MIG device; Profile holds NVML's figures for its GPU-instance profile.
	MIG     *nvmlib.MigDevice
	Profile *nvmlib.MigProfile
	// Mode is the GPU's mode from the sharing profile: whole, mig-static or time-sliced.
	Mode api.Mode
	// Replicas bounds the claims sharing a time-sliced GPU (0: no bound).
	Replicas int
	// Interval is a time-sliced GPU's time-slice interval.
	Interval api.TimeSliceInterval
	// Dynamic is set for a device of a mig-dynamic GPU: the placement Prepare creates an instance at.
	Dynamic *DynamicPlacement

	consumes []resourceapi.DeviceCounterConsumption
	sibling  bool
	// Capacity is set for a GPU in mode shared: what it publishes and claims consume. Replicas is
	// then the profile's maxClients.
	Capacity *SharedCapacity
}

// SharedCapacity is what a GPU in mode shared offers its claims.
type SharedCapacity struct {
	// Isolation is time-sliced (memory accounted by the scheduler only) or mps (enforced by an
	// MPS daemon).
	Isolation api.Mode
	// MemoryBytes is NVML's memory of the GPU minus the profile's memoryReserve.
	MemoryBytes int64
	// StepBytes is the granularity of memory requests (memoryStep).
	StepBytes int64
	// DefaultMemoryBytes and DefaultComputePercent are what a claim that asks for none consumes.
	DefaultMemoryBytes    int64
	DefaultComputePercent int
}

// Capacity names of a shared GPU.
const (
	CapacityMemory         resourceapi.QualifiedName = "memory"
	CapacityComputePercent resourceapi.QualifiedName = "computePercent"
	CapacityClients        resourceapi.QualifiedName = "clients"
)

// Shared reports whether many claims may be allocated the device at once.
func (d *Device) Shared() bool { return d.Mode == api.ModeTimeSliced || d.Mode == api.ModeShared }

// Sibling reports whether the device is one of several modes its GPU is offered in.
func (d *Device) Sibling() bool { return d.sibling }

// UUID is the UUID of what the container gets: the GPU's or the MIG device's.
func (d *Device) UUID() string {
	if d.MIG != nil {
		return d.MIG.UUID
	}
	return d.GPU.UUID
}

// CDI is the CDI device a container of a claim gets for this device (for a mig-dynamic device only
// its GPU: the MIG device is made at Prepare).
func (d *Device) CDI() cdi.Device {
	if d.MIG != nil {
		return cdi.MIGDevice(d.GPU, *d.MIG)
	}
	return cdi.WholeGPU(d.GPU)
}

// GPUName is the device name of a whole GPU.
func GPUName(index int) string { return "gpu-" + strconv.Itoa(index) }

// MIGName is the device name of a MIG device.
func MIGName(index, gi, ci int) string { return fmt.Sprintf("gpu-%d-mig-%d-%d", index, gi, ci) }

// Skipped is a GPU the profile gives to DRA that the driver does not publish, and why.
type Skipped struct {
	GPU    int
	Mode   api.Mode
	Reason string
}

// Inventory is what the driver publishes for its node at one moment.
type Inventory struct {
	// Pool is the node's pool (the node name).
	Pool   string
	System nvmlib.SystemInfo
	// Devices in publishing order: by GPU index, a GPU's MIG devices by placement, GI and CI.
	Devices []*Device
	// Skipped lists GPUs owned by DRA that are not published, with the reason.
	Skipped []Skipped
	// TimeSliced lists the time-sliced GPUs with their interval, by index.
	TimeSliced map[int]api.TimeSliceInterval
	// CounterSets are the counter sets of the mig-dynamic GPUs, by GPU index.
	CounterSets []resourceapi.CounterSet
	// Hidden lists placements of mig-dynamic GPUs not published because a MIG instance Tessera did
	// not create overlaps them.
	Hidden []string
	// WithheldDevices are the devices the MIG manager holds (see WithMIGGate): not published, not
	// prepared, until it releases them.
	WithheldDevices []*Device

	byName   map[string]*Device
	withheld map[string]*Device
}

// Device looks a device up by name.
func (inv *Inventory) Device(name string) (*Device, bool) {
	d, ok := inv.byName[name]
	return d, ok
}

// Features switch off what the cluster cannot store (see HandleError: a DroppedFieldsError).
type Features struct {
	// NoTimeSliced turns modes time-sliced and shared off: they need allowMultipleAllocations
	// (DRAConsumableCapacity).
	NoTimeSliced bool
	// NoTaints stops publishing health taints (DRADeviceTaints); health still reaches the kubelet.
	NoTaints bool
	// NoPartitionable turns mode mig-dynamic off: it needs shared counters (DRAPartitionableDevices).
	NoPartitionable bool
	// NoPartitionType stops naming the partition-type attribute (DRAPartitionableDevicesType, alpha).
	NoPartitionType bool
}

// BuildInput is what Build needs.
type BuildInput struct {
	Pool     string
	Snapshot *inventory.Snapshot
	// Resolution is the sharing profile resolved for the node; only GPUs owned by `dra` are used.
	Resolution *api.Resolution
	// Profiles returns a GPU's MIG profiles (NVML's figures for MIG devices).
	Profiles func(gpu int) ([]nvmlib.MigProfile, error)
	// Instances returns a GPU's GPU instances (for mig-dynamic GPUs).
	Instances func(gpu int) ([]nvmlib.GpuInstance, error)
	// Owned are the GPU instances claims of this driver hold, by GPU UUID (from the checkpoints).
	Owned    map[string][]ownedInstance
	Features Features
}

// Build turns the node's GPUs and the sharing profile into the devices to publish. It is a pure
// function of its input, so its output (and the slices made from it) are deterministic.
func Build(in BuildInput) *Inventory {
	inv := &Inventory{Pool: in.Pool, System: in.Snapshot.System, byName: map[string]*Device{}, TimeSliced: map[int]api.TimeSliceInterval{}}
	assign := map[int]api.Assignment{}
	for _, a := range in.Resolution.Assignments {
		assign[a.GPU.Index] = a
	}
	for _, g := range in.Snapshot.GPUs {
		a, ok := assign[g.Index]
		if !ok || a.Owner != api.OwnerDRA {
			continue
		}
		skip := func(format string, args ...any) {
			inv.Skipped = append(inv.Skipped, Skipped{GPU: g.Index, Mode: a.Mode, Reason: fmt.Sprintf(format, args...)})
		}
		if g.UUID == "" || g.Error != "" {
			skip("GPU cannot be read: %s", g.Error)
			continue
		}
		if len(a.Modes) > 0 && in.Features.NoPartitionable {
			// Without shared counters siblings would not exclude each other: offer the first mode only.
			a.Modes = nil
		}
		if len(a.Modes) > 0 {
			if g.MigEnabled {
				skip("MIG mode is on; modes %v need it off (turn it off with `tessera mig apply` while the GPU is idle)", a.Modes)
				continue
			}
			inv.buildSiblings(g.GPU, a, in.Features)
			continue
		}
		switch a.Mode {
		case api.ModeWhole, api.ModeTimeSliced:
			if g.MigEnabled {
				skip("MIG mode is on; mode %s needs it off (turn it off with `tessera mig apply` while the GPU is idle)", a.Mode)
				continue
			}
			if a.Mode == api.ModeTimeSliced && in.Features.NoTimeSliced {
				skip("the cluster dropped allowMultipleAllocations (feature DRAConsumableCapacity off), so time-sliced GPUs cannot be published")
				continue
			}
			d := &Device{Name: GPUName(g.Index), GPU: g.GPU, Mode: a.Mode}
			if a.Mode == api.ModeTimeSliced {
				d.Replicas, d.Interval = a.Replicas, a.Interval
				if d.Interval == "" {
					d.Interval = api.IntervalDefault
				}
				inv.TimeSliced[g.Index] = d.Interval
			}
			inv.add(d)
		case api.ModeMIGStatic:
			if !g.MigEnabled {
				skip("mode mig-static needs MIG mode on (`tessera mig apply`)")
				continue
			}
			if len(g.MigDevices) == 0 {
				skip("MIG mode is on but the GPU has no MIG devices (create them with `tessera mig apply`)")
				continue
			}
			var profiles map[int]nvmlib.MigProfile
			if in.Profiles != nil {
				if ps, err := in.Profiles(g.Index); err == nil {
					profiles = map[int]nvmlib.MigProfile{}
					for _, p := range ps {
						profiles[p.ID] = p
					}
				}
			}
			migs := slices.Clone(g.MigDevices)
			slices.SortFunc(migs, func(x, y nvmlib.MigDevice) int {
				return slices.Compare([]int{x.Placement.Start, x.GI, x.CI}, []int{y.Placement.Start, y.GI, y.CI})
			})
			for i := range migs {
				m := migs[i]
				d := &Device{Name: MIGName(g.Index, m.GI, m.CI), GPU: g.GPU, MIG: &m, Mode: a.Mode}
				if p, ok := profiles[m.GIProfileID]; ok {
					d.Profile = &p
				}
				inv.add(d)
			}
		case api.ModeMIGDynamic:
			if in.Features.NoPartitionable {
				skip("the cluster dropped shared counters from our ResourceSlices (feature DRAPartitionableDevices off), so mig-dynamic GPUs cannot be published")
				continue
			}
			if !g.MigEnabled {
				if g.MigPending {
					skip("MIG mode is pending and takes effect after a GPU reset (`tessera sim reset` on a simulated node, `nvidia-smi -r` on a real one)")
				} else {
					skip("mode mig-dynamic needs MIG mode on; the driver turns it on while the GPU is idle")
				}
				continue
			}
			if in.Profiles == nil || in.Instances == nil {
				skip("MIG profiles or instances cannot be read")
				continue
			}
			ps, err := in.Profiles(g.Index)
			if err != nil {
				skip("reading the MIG profiles: %v", err)
				continue
			}
			gis, err := in.Instances(g.Index)
			if err != nil {
				skip("reading the GPU instances: %v", err)
				continue
			}
			var allowed []string
			if a.MIGDynamic != nil {
				allowed = a.MIGDynamic.Profiles
			}
			hidden, err := inv.buildDynamic(g.GPU, allowed, ps, gis, in.Owned[g.UUID])
			if err != nil {
				skip("%v", err)
				continue
			}
			inv.Hidden = append(inv.Hidden, hidden...)
		case api.ModeShared:
			if g.MigEnabled {
				skip("MIG mode is on; mode shared needs it off (turn it off with `tessera mig apply` while the GPU is idle)")
				continue
			}
			if in.Features.NoTimeSliced {
				skip("the cluster dropped allowMultipleAllocations (feature DRAConsumableCapacity off), so shared GPUs cannot be published")
				continue
			}
			c, why := sharedCapacity(g.GPU, a.Shared)
			if why != "" {
				skip("%s", why)
				continue
			}
			d := &Device{Name: GPUName(g.Index), GPU: g.GPU, Mode: a.Mode, Capacity: c}
			if a.Shared != nil {
				d.Replicas = a.Shared.MaxClients
			}
			inv.add(d)
		default:
			skip("mode %s is not served by this driver version (whole, mig-static, mig-dynamic, time-sliced and shared are)", a.Mode)
		}
	}
	return inv
}

// sharedCapacity is what a shared GPU offers, from NVML's memory and the resolved settings; why
// says what is wrong when it cannot be published.
func sharedCapacity(g nvmlib.GPU, sh *api.SharedSettings) (*SharedCapacity, string) {
	if sh == nil {
		sh = &api.SharedSettings{}
	}
	q := func(p *resource.Quantity, def string) int64 {
		if p != nil {
			return p.Value()
		}
		v := resource.MustParse(def)
		return v.Value()
	}
	c := &SharedCapacity{
		Isolation:             sh.Isolation,
		StepBytes:             q(sh.MemoryStep, api.DefaultSharedMemoryStep),
		DefaultComputePercent: sh.DefaultComputePercent,
	}
	if c.Isolation == "" {
		c.Isolation = api.ModeTimeSliced
	}
	c.DefaultMemoryBytes = c.StepBytes
	if sh.DefaultMemory != nil {
		c.DefaultMemoryBytes = sh.DefaultMemory.Value()
	}
	if c.DefaultComputePercent <= 0 {
		c.DefaultComputePercent = api.DefaultSharedComputePercent
		if sh.MaxClients > 0 {
			c.DefaultComputePercent = max(1, 100/sh.MaxClients)
		}
	}
	c.MemoryBytes = int64(g.MemoryMiB)<<20 - q(sh.MemoryReserve, "0")
	switch {
	case g.MemoryMiB == 0:
		return nil, "NVML reports no memory for the GPU, so its memory cannot be shared out"
	case c.StepBytes <= 0:
		return nil, "shared.memoryStep is not positive"
	case c.MemoryBytes < c.StepBytes:
		return nil, fmt.Sprintf("after shared.memoryReserve the GPU's %d MiB leave less than one memoryStep", g.MemoryMiB)
	case c.DefaultMemoryBytes > c.MemoryBytes || c.DefaultMemoryBytes%c.StepBytes != 0:
		return nil, fmt.Sprintf("shared.defaultMemory (%d MiB) is not a multiple of memoryStep or more than the %d MiB left to claims", c.DefaultMemoryBytes>>20, c.MemoryBytes>>20)
	}
	return c, ""
}

func (inv *Inventory) add(d *Device) {
	inv.Devices = append(inv.Devices, d)
	inv.byName[d.Name] = d
}

// Taints gives the taints of devices by name (nil: none).
type Taints map[string][]resourceapi.DeviceTaint

// Attributes options.
type attrOptions struct {
	// pcieRoot resolves a PCI bus ID to its PCIe root complex ("" when unknown).
	pcieRoot func(busID string) string
	// noPartitionType leaves the slices' partitionTypeAttribute out.
	noPartitionType bool
}

// PublishOptions change what Slices publishes.
type PublishOptions struct {
	// NoPartitionType leaves the slices' partitionTypeAttribute out.
	NoPartitionType bool
}

// Slices is DriverResources without taints or PCIe roots, for tools that publish a node's slices
// themselves (scale runs).
func (inv *Inventory) Slices(o PublishOptions) resourceslice.DriverResources {
	return inv.DriverResources(nil, attrOptions{noPartitionType: o.NoPartitionType})
}

// DriverResources is the node's pool: one ResourceSlice per GPU with devices, in GPU order (slice
// order is allocation priority), a GPU's devices in Inventory order. A pool without devices is one
// empty slice, so the scheduler sees the driver is up.
func (inv *Inventory) DriverResources(taints Taints, o attrOptions) resourceslice.DriverResources {
	var slicesOut []resourceslice.Slice
	// Counter sets live in slices of their own (a slice holds devices or counters), 8 per slice.
	for cs := inv.CounterSets; len(cs) > 0; {
		n := min(len(cs), MaxCounterSetsPerSlice)
		slicesOut = append(slicesOut, resourceslice.Slice{SharedCounters: cs[:n:n]})
		cs = cs[n:]
	}
	var cur []resourceapi.Device
	curGPU := -1
	flush := func() {
		for len(cur) > 0 {
			n := min(len(cur), MaxDevicesPerTaintedSlice)
			sl := resourceslice.Slice{Devices: cur[:n:n]}
			if _, typed := cur[0].Attributes["profile"]; typed && len(cur[0].ConsumesCounters) > 0 && !o.noPartitionType {
				sl.PartitionTypeAttribute = ptr.To(PartitionTypeAttribute)
			}
			slicesOut = append(slicesOut, sl)
			cur = cur[n:]
		}
		cur = nil
	}
	for _, d := range inv.Devices {
		if d.GPU.Index != curGPU {
			flush()
			curGPU = d.GPU.Index
		}
		rd := d.resource(inv.System, o)
		if ts := taints[d.Name]; len(ts) > 0 {
			rd.Taints = slices.Clone(ts)
		}
		cur = append(cur, rd)
	}
	flush()
	if len(slicesOut) == 0 {
		slicesOut = []resourceslice.Slice{{}}
	}
	return resourceslice.DriverResources{Pools: map[string]resourceslice.Pool{inv.Pool: {Slices: slicesOut}}}
}

func str(s string) resourceapi.DeviceAttribute { return resourceapi.DeviceAttribute{StringValue: &s} }
func num(n int) resourceapi.DeviceAttribute {
	v := int64(n)
	return resourceapi.DeviceAttribute{IntValue: &v}
}

// resource is the device as published.
func (d *Device) resource(sys nvmlib.SystemInfo, o attrOptions) resourceapi.Device {
	g := d.GPU
	attrs := map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
		"type":         str(TypeGPU),
		"mode":         str(string(d.Mode)),
		"uuid":         str(d.UUID()),
		"productName":  str(g.ProductName),
		"brand":        str(g.Brand),
		"architecture": str(g.Architecture),
		"index":        num(g.Index),
		"minor":        num(g.Minor),
	}
	for name, v := range map[resourceapi.QualifiedName]string{
		"cudaComputeCapability": g.ComputeCapability,
		"driverVersion":         sys.DriverVersion,
		"cudaDriverVersion":     sys.CUDADriverVersion,
	} {
		if sv, ok := Semver(v); ok {
			attrs[name] = resourceapi.DeviceAttribute{VersionValue: &sv}
		}
	}
	if bus, ok := PCIBusID(g.PCIBusID); ok {
		attrs[deviceattribute.StandardDeviceAttributePCIBusID] = str(bus)
		if o.pcieRoot != nil {
			if root := o.pcieRoot(bus); root != "" {
				attrs[deviceattribute.StandardDeviceAttributePCIeRoot] = str(root)
			}
		}
	}
	if g.NUMANode >= 0 {
		attrs[deviceattribute.StandardDeviceAttributeNUMANode] = num(g.NUMANode)
	}
	capacity := map[resourceapi.QualifiedName]resourceapi.DeviceCapacity{}
	mib := func(n uint64) resourceapi.DeviceCapacity {
		return resourceapi.DeviceCapacity{Value: *resource.NewQuantity(int64(n)<<20, resource.BinarySI)}
	}
	count := func(n int) resourceapi.DeviceCapacity {
		return resourceapi.DeviceCapacity{Value: *resource.NewQuantity(int64(n), resource.DecimalSI)}
	}
	out := resourceapi.Device{Name: d.Name, Attributes: attrs, Capacity: capacity, ConsumesCounters: d.consumes}
	switch {
	case d.MIG != nil:
		m := d.MIG
		attrs["type"] = str(TypeMIG)
		attrs["parentUUID"] = str(g.UUID)
		attrs["profile"] = str(m.Profile)
		attrs["placementStart"] = num(m.Placement.Start)
		attrs["placementSize"] = num(m.Placement.Size)
		capacity["memory"] = mib(m.MemoryMiB)
		capacity["multiprocessors"] = count(m.SMCount)
		if p := d.Profile; p != nil {
			engineCapacities(capacity, *p, count)
		}
	case d.Dynamic != nil:
		p := d.Dynamic.Profile
		attrs["type"] = str(TypeMIG)
		if d.Dynamic.Whole {
			attrs["type"] = str(TypeGPU)
		}
		delete(attrs, "uuid") // made at Prepare
		attrs["parentUUID"] = str(g.UUID)
		attrs["profile"] = str(p.Name)
		attrs["placementStart"] = num(d.Dynamic.Placement.Start)
		attrs["placementSize"] = num(d.Dynamic.Placement.Size)
		capacity["memory"] = mib(p.MemoryMiB)
		capacity["multiprocessors"] = count(p.SMCount)
		engineCapacities(capacity, p, count)
	case d.Capacity != nil:
		// Mode shared: claims consume parts of the GPU's memory and compute. Memory is NVML's
		// figure minus the reserve, requested in steps; a claim that names no capacity consumes
		// the profile's defaults, never the whole GPU.
		c := d.Capacity
		attrs["isolation"] = str(string(c.Isolation))
		step := resource.NewQuantity(c.StepBytes, resource.BinarySI)
		defMem := resource.NewQuantity(c.DefaultMemoryBytes, resource.BinarySI)
		capacity[CapacityMemory] = resourceapi.DeviceCapacity{
			Value: *resource.NewQuantity(c.MemoryBytes, resource.BinarySI),
			RequestPolicy: &resourceapi.CapacityRequestPolicy{Default: defMem,
				ValidRange: &resourceapi.CapacityRequestPolicyRange{Min: step, Step: ptr.To(step.DeepCopy())}},
		}
		pct := func(n int) *resource.Quantity { return resource.NewQuantity(int64(n), resource.DecimalSI) }
		cp := count(100)
		cp.RequestPolicy = &resourceapi.CapacityRequestPolicy{Default: pct(c.DefaultComputePercent),
			ValidRange: &resourceapi.CapacityRequestPolicyRange{Min: pct(1), Max: pct(100), Step: pct(1)}}
		capacity[CapacityComputePercent] = cp
		if d.Replicas > 0 {
			one := resource.MustParse("1")
			cl := count(d.Replicas)
			cl.RequestPolicy = &resourceapi.CapacityRequestPolicy{Default: &one, ValidValues: []resource.Quantity{one}}
			capacity[CapacityClients] = cl
		}
		out.AllowMultipleAllocations = ptr.To(true)
	case d.Shared():
		// Many claims share the GPU. A claim that names no capacity would consume all of each
		// capacity, so memory is published with a request policy that consumes none of it (time
		// slicing reserves no memory; a claim can still select on it with CEL) and, when the profile
		// bounds the sharers, "clients" is consumed one per claim.
		attrs["timeSliceInterval"] = str(string(d.Interval))
		zero := resource.MustParse("0")
		c := mib(g.MemoryMiB)
		c.RequestPolicy = &resourceapi.CapacityRequestPolicy{Default: &zero, ValidValues: []resource.Quantity{zero}}
		capacity["memory"] = c
		if d.Replicas > 0 {
			one := resource.MustParse("1")
			cl := count(d.Replicas)
			cl.RequestPolicy = &resourceapi.CapacityRequestPolicy{Default: &one, ValidValues: []resource.Quantity{one}}
			capacity["clients"] = cl
		}
		out.AllowMultipleAllocations = ptr.To(true)
	default:
		capacity["memory"] = mib(g.MemoryMiB)
	}
	return out
}

// engineCapacities adds the engines of a MIG profile (NVML's GPU-instance profile figures).
func engineCapacities(c map[resourceapi.QualifiedName]resourceapi.DeviceCapacity, p nvmlib.MigProfile, count func(int) resourceapi.DeviceCapacity) {
	c["copyEngines"] = count(p.CopyEngines)
	c["decoders"] = count(p.Decoders)
	c["encoders"] = count(p.Encoders)
	c["jpegEngines"] = count(p.JPEGs)
	c["ofaEngines"] = count(p.OFAs)
}

// Semver turns an NVML version ("570.133.20", "9.0", "12.8", "535.104.05") into a semantic version
// the API server accepts: three numeric components without leading zeros.
func Semver(v string) (string, bool) {
	parts := strings.Split(strings.TrimSpace(v), ".")
	if len(parts) == 0 || len(parts) > 3 {
		return "", false
	}
	for len(parts) < 3 {
		parts = append(parts, "0")
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return "", false
		}
		parts[i] = strconv.FormatUint(n, 10)
	}
	return strings.Join(parts, "."), true
}

// PCIBusID turns NVML's bus ID ("00000000:18:00.0") into the standard attribute's extended BDF form
// ("0000:18:00.0").
func PCIBusID(nvml string) (string, bool) {
	s := strings.ToLower(strings.TrimSpace(nvml))
	dom, rest, ok := strings.Cut(s, ":")
	if !ok || len(dom) < 4 {
		return "", false
	}
	if strings.Trim(dom[:len(dom)-4], "0") != "" {
		return "", false
	}
	bus := dom[len(dom)-4:] + ":" + rest
	if _, err := deviceattribute.GetPCIBusIDAttribute(bus); err != nil {
		return "", false
	}
	return bus, true
}
