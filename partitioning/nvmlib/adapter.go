package nvmlib

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"k8s.io/klog/v2"
)

// adapter turns a go-nvml nvml.Interface (real library or simulator) into Interface.
type adapter struct {
	lib     nvml.Interface
	devices []*handle
}

// handle is one GPU's NVML handle. A GPU that is lost when Tessera starts has none yet; it is looked
// up again on use, so one bad GPU never stops the others from being served.
type handle struct {
	mu sync.Mutex
	d  nvml.Device
}

// Wrap initialises a go-nvml library and adapts it. go-nvml kills the process on any call after a
// failed Init, so nothing is called unless Init succeeded.
func Wrap(lib nvml.Interface) (Interface, error) {
	if ret := lib.Init(); ret != nvml.SUCCESS {
		return nil, newErr("Init", -1, ret)
	}
	a, err := newAdapter(lib)
	if err != nil {
		lib.Shutdown()
		return nil, err
	}
	return a, nil
}

func newAdapter(lib nvml.Interface) (*adapter, error) {
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, newErr("DeviceGetCount", -1, ret)
	}
	a := &adapter{lib: lib, devices: make([]*handle, n)}
	for i := range n {
		a.devices[i] = &handle{}
		if _, err := a.device(i); err != nil {
			klog.ErrorS(err, "GPU unavailable at start; it is served when it answers again", "gpu", i)
		}
	}
	return a, nil
}

func (a *adapter) device(index int) (nvml.Device, error) {
	if index < 0 || index >= len(a.devices) {
		return nil, fmt.Errorf("GPU index %d out of range (the node has %d GPUs): %w", index, len(a.devices), ErrInvalidArgument)
	}
	h := a.devices[index]
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.d == nil {
		d, ret := a.lib.DeviceGetHandleByIndex(index)
		if ret != nvml.SUCCESS {
			return nil, newErr("DeviceGetHandleByIndex", index, ret)
		}
		h.d = d
	}
	return h.d, nil
}

// indexOf finds the index of a device handle NVML returned (events carry handles).
func (a *adapter) indexOf(d nvml.Device) int {
	for i, h := range a.devices {
		h.mu.Lock()
		same := h.d != nil && h.d == d
		h.mu.Unlock()
		if same {
			return i
		}
	}
	return -1
}

func (a *adapter) Shutdown() error { return newErr("Shutdown", -1, a.lib.Shutdown()) }

func (a *adapter) DeviceCount() (int, error) { return len(a.devices), nil }

func (a *adapter) System() (SystemInfo, error) {
	drv, ret := a.lib.SystemGetDriverVersion()
	if ret != nvml.SUCCESS {
		return SystemInfo{}, newErr("SystemGetDriverVersion", -1, ret)
	}
	cuda, ret := a.lib.SystemGetCudaDriverVersion()
	if ret != nvml.SUCCESS {
		return SystemInfo{}, newErr("SystemGetCudaDriverVersion", -1, ret)
	}
	nv, ret := a.lib.SystemGetNVMLVersion()
	if ret != nvml.SUCCESS {
		return SystemInfo{}, newErr("SystemGetNVMLVersion", -1, ret)
	}
	return SystemInfo{
		DriverVersion:     drv,
		CUDADriverVersion: fmt.Sprintf("%d.%d", cuda/1000, (cuda%1000)/10),
		NVMLVersion:       nv,
	}, nil
}

func (a *adapter) GPU(index int) (GPU, error) {
	d, err := a.device(index)
	if err != nil {
		return GPU{}, err
	}
	g := GPU{Index: index, NUMANode: -1}
	var ret nvml.Return
	if g.Minor, ret = d.GetMinorNumber(); ret != nvml.SUCCESS {
		return GPU{}, newErr("GetMinorNumber", index, ret)
	}
	if g.UUID, ret = d.GetUUID(); ret != nvml.SUCCESS {
		return GPU{}, newErr("GetUUID", index, ret)
	}
	if g.ProductName, ret = d.GetName(); ret != nvml.SUCCESS {
		return GPU{}, newErr("GetName", index, ret)
	}
	brand, ret := d.GetBrand()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetBrand", index, ret)
	}
	g.Brand = BrandName(brand)
	arch, ret := d.GetArchitecture()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetArchitecture", index, ret)
	}
	g.Architecture = ArchitectureName(arch)
	major, minor, ret := d.GetCudaComputeCapability()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetCudaComputeCapability", index, ret)
	}
	g.ComputeCapability = fmt.Sprintf("%d.%d", major, minor)
	mem, ret := d.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetMemoryInfo", index, ret)
	}
	g.MemoryMiB = mem.Total / (1 << 20)
	pci, ret := d.GetPciInfo()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetPciInfo", index, ret)
	}
	g.PCIBusID = cString(pci.BusId[:])
	g.PCIDeviceID = pci.PciDeviceId
	if numa, ret := d.GetNumaNodeId(); ret == nvml.SUCCESS {
		g.NUMANode = numa
	} else if ret != nvml.ERROR_NOT_SUPPORTED && ret != nvml.ERROR_FUNCTION_NOT_FOUND {
		return GPU{}, newErr("GetNumaNodeId", index, ret)
	}
	cur, pending, ret := d.GetMigMode()
	switch ret {
	case nvml.SUCCESS:
		g.MigCapable = true
		g.MigEnabled = cur == nvml.DEVICE_MIG_ENABLE
		g.MigPending = pending == nvml.DEVICE_MIG_ENABLE
	case nvml.ERROR_NOT_SUPPORTED:
	default:
		return GPU{}, newErr("GetMigMode", index, ret)
	}
	cm, ret := d.GetComputeMode()
	if ret != nvml.SUCCESS {
		return GPU{}, newErr("GetComputeMode", index, ret)
	}
	g.ComputeMode = computeModeName(cm)
	return g, nil
}

func (a *adapter) NVLinkPeers(index int) ([]int, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	var peers []int
	for j := range a.devices {
		if j == index {
			continue
		}
		o, err := a.device(j)
		if err != nil {
			continue // a lost peer is no peer
		}
		st, ret := d.GetP2PStatus(o, nvml.P2P_CAPS_INDEX_NVLINK)
		switch ret {
		case nvml.SUCCESS:
			if st == nvml.P2P_STATUS_OK {
				peers = append(peers, j)
			}
		case nvml.ERROR_NOT_SUPPORTED:
			return nil, nil
		case nvml.ERROR_GPU_IS_LOST:
			if _, r := d.GetUUID(); r == nvml.ERROR_GPU_IS_LOST {
				return nil, newErr("GetP2PStatus", index, ret)
			}
			continue // the peer fell off the bus: a lost peer is no peer
		default:
			return nil, newErr("GetP2PStatus", index, ret)
		}
	}
	return peers, nil
}

func (a *adapter) MigProfiles(index int) ([]MigProfile, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	mem, ret := d.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return nil, newErr("GetMemoryInfo", index, ret)
	}
	var out []MigProfile
	for id := range nvml.GPU_INSTANCE_PROFILE_COUNT {
		info, ret := d.GetGpuInstanceProfileInfo(id)
		if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if ret != nvml.SUCCESS {
			return nil, newErr("GetGpuInstanceProfileInfo", index, ret)
		}
		places, ret := d.GetGpuInstancePossiblePlacements(&info)
		if ret == nvml.ERROR_NOT_SUPPORTED {
			places = nil // NVML lists placements only while MIG mode is on
		} else if ret != nvml.SUCCESS {
			return nil, newErr("GetGpuInstancePossiblePlacements", index, ret)
		}
		p := MigProfile{
			ID:            int(info.Id),
			Name:          GIProfileName(int(info.Id), int(info.SliceCount), info.MemorySizeMB, mem.Total),
			ComputeSlices: int(info.SliceCount),
			MemoryMiB:     info.MemorySizeMB,
			SMCount:       int(info.MultiprocessorCount),
			CopyEngines:   int(info.CopyEngineCount),
			Decoders:      int(info.DecoderCount),
			Encoders:      int(info.EncoderCount),
			JPEGs:         int(info.JpegCount),
			OFAs:          int(info.OfaCount),
			InstanceCount: int(info.InstanceCount),
		}
		for _, pl := range places {
			p.Placements = append(p.Placements, Placement{Start: int(pl.Start), Size: int(pl.Size)})
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, &Error{Op: "GetGpuInstanceProfileInfo", GPU: index, Ret: nvml.ERROR_NOT_SUPPORTED}
	}
	return out, nil
}

// ciProfileIDs maps compute-instance sizes to NVML COMPUTE_INSTANCE_PROFILE_* values and back.
var ciProfileIDs = map[int]int{
	1: nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE,
	2: nvml.COMPUTE_INSTANCE_PROFILE_2_SLICE,
	3: nvml.COMPUTE_INSTANCE_PROFILE_3_SLICE,
	4: nvml.COMPUTE_INSTANCE_PROFILE_4_SLICE,
	7: nvml.COMPUTE_INSTANCE_PROFILE_7_SLICE,
	8: nvml.COMPUTE_INSTANCE_PROFILE_8_SLICE,
	6: nvml.COMPUTE_INSTANCE_PROFILE_6_SLICE,
}

// CIProfileID returns NVML's compute-instance profile ID for a size in compute slices.
func CIProfileID(slices int) (int, bool) { id, ok := ciProfileIDs[slices]; return id, ok }

func (a *adapter) gpuInstances(index int, d nvml.Device) ([]GpuInstance, []nvml.GpuInstance, error) {
	var gis []GpuInstance
	var handles []nvml.GpuInstance
	for id := range nvml.GPU_INSTANCE_PROFILE_COUNT {
		info, ret := d.GetGpuInstanceProfileInfo(id)
		if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if ret != nvml.SUCCESS {
			return nil, nil, newErr("GetGpuInstanceProfileInfo", index, ret)
		}
		hs, ret := d.GetGpuInstances(&info)
		if ret != nvml.SUCCESS {
			return nil, nil, newErr("GetGpuInstances", index, ret)
		}
		for _, h := range hs {
			gi, err := describeGI(index, h)
			if err != nil {
				return nil, nil, err
			}
			gis = append(gis, gi)
			handles = append(handles, h)
		}
	}
	sort.Sort(byGI{gis, handles})
	return gis, handles, nil
}

type byGI struct {
	gis []GpuInstance
	hs  []nvml.GpuInstance
}

func (b byGI) Len() int           { return len(b.gis) }
func (b byGI) Less(i, j int) bool { return b.gis[i].ID < b.gis[j].ID }
func (b byGI) Swap(i, j int) {
	b.gis[i], b.gis[j] = b.gis[j], b.gis[i]
	b.hs[i], b.hs[j] = b.hs[j], b.hs[i]
}

func describeGI(index int, h nvml.GpuInstance) (GpuInstance, error) {
	info, ret := h.GetInfo()
	if ret != nvml.SUCCESS {
		return GpuInstance{}, newErr("GpuInstance.GetInfo", index, ret)
	}
	gi := GpuInstance{
		ID:        int(info.Id),
		ProfileID: int(info.ProfileId),
		Placement: Placement{Start: int(info.Placement.Start), Size: int(info.Placement.Size)},
	}
	for slices, ciID := range ciProfileIDs {
		pinfo, ret := h.GetComputeInstanceProfileInfo(ciID, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if ret != nvml.SUCCESS {
			return GpuInstance{}, newErr("GetComputeInstanceProfileInfo", index, ret)
		}
		cis, ret := h.GetComputeInstances(&pinfo)
		if ret != nvml.SUCCESS {
			return GpuInstance{}, newErr("GetComputeInstances", index, ret)
		}
		for _, c := range cis {
			cinfo, ret := c.GetInfo()
			if ret != nvml.SUCCESS {
				return GpuInstance{}, newErr("ComputeInstance.GetInfo", index, ret)
			}
			gi.ComputeInstances = append(gi.ComputeInstances, ComputeInstance{
				ID:        int(cinfo.Id),
				Slices:    slices,
				Placement: Placement{Start: int(cinfo.Placement.Start), Size: int(cinfo.Placement.Size)},
			})
		}
	}
	sort.Slice(gi.ComputeInstances, func(i, j int) bool { return gi.ComputeInstances[i].ID < gi.ComputeInstances[j].ID })
	return gi, nil
}

func (a *adapter) ComputeInstanceSizes(index, giID int) ([]int, error) {
	gi, err := a.gi(index, giID)
	if err != nil {
		return nil, err
	}
	var out []int
	for slices, id := range ciProfileIDs {
		_, ret := gi.GetComputeInstanceProfileInfo(id, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		switch ret {
		case nvml.SUCCESS:
			out = append(out, slices)
		case nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_INVALID_ARGUMENT:
		default:
			return nil, newErr("GetComputeInstanceProfileInfo", index, ret)
		}
	}
	sort.Ints(out)
	return out, nil
}

func (a *adapter) GpuInstances(index int) ([]GpuInstance, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	gis, _, err := a.gpuInstances(index, d)
	return gis, err
}

func (a *adapter) MigDevices(index int) ([]MigDevice, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	parentUUID, ret := d.GetUUID()
	if ret != nvml.SUCCESS {
		return nil, newErr("GetUUID", index, ret)
	}
	profiles, err := a.MigProfiles(index)
	if err != nil {
		return nil, err
	}
	byID := map[int]MigProfile{}
	for _, p := range profiles {
		byID[p.ID] = p
	}
	gis, _, err := a.gpuInstances(index, d)
	if err != nil {
		return nil, err
	}
	// UUIDs come from the MIG device handles, matched by (GI, CI).
	type key struct{ gi, ci int }
	uuids := map[key]string{}
	max, ret := d.GetMaxMigDeviceCount()
	if ret != nvml.SUCCESS {
		return nil, newErr("GetMaxMigDeviceCount", index, ret)
	}
	for i := range max {
		m, ret := d.GetMigDeviceHandleByIndex(i)
		if ret == nvml.ERROR_NOT_FOUND || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if ret != nvml.SUCCESS {
			return nil, newErr("GetMigDeviceHandleByIndex", index, ret)
		}
		giID, ret := m.GetGpuInstanceId()
		if ret != nvml.SUCCESS {
			return nil, newErr("MigDevice.GetGpuInstanceId", index, ret)
		}
		ciID, ret := m.GetComputeInstanceId()
		if ret != nvml.SUCCESS {
			return nil, newErr("MigDevice.GetComputeInstanceId", index, ret)
		}
		u, ret := m.GetUUID()
		if ret != nvml.SUCCESS {
			return nil, newErr("MigDevice.GetUUID", index, ret)
		}
		uuids[key{giID, ciID}] = u
	}
	var out []MigDevice
	for _, gi := range gis {
		p := byID[gi.ProfileID]
		for _, ci := range gi.ComputeInstances {
			name := p.Name
			if ci.Slices < p.ComputeSlices {
				name = fmt.Sprintf("%dc.%s", ci.Slices, p.Name)
			}
			sm := p.SMCount
			if p.ComputeSlices > 0 {
				sm = p.SMCount * ci.Slices / p.ComputeSlices
			}
			out = append(out, MigDevice{
				ParentIndex: index,
				ParentUUID:  parentUUID,
				UUID:        uuids[key{gi.ID, ci.ID}],
				GI:          gi.ID,
				CI:          ci.ID,
				Profile:     name,
				GIProfile:   p.Name,
				GIProfileID: gi.ProfileID,
				Placement:   gi.Placement,
				MemoryMiB:   p.MemoryMiB,
				SMCount:     sm,
			})
		}
	}
	return out, nil
}

func (a *adapter) SetMigMode(index int, enabled bool) (MigModeChange, error) {
	d, err := a.device(index)
	if err != nil {
		return MigModeChange{}, err
	}
	mode := nvml.DEVICE_MIG_DISABLE
	if enabled {
		mode = nvml.DEVICE_MIG_ENABLE
	}
	activation, ret := d.SetMigMode(mode)
	if ret != nvml.SUCCESS {
		return MigModeChange{}, newErr("SetMigMode", index, ret)
	}
	out := MigModeChange{Enabled: enabled}
	if activation != nvml.SUCCESS {
		out.Pending = true
		out.Reason = retName(activation)
		switch activation {
		case nvml.ERROR_IN_USE:
			out.Reason = "the GPU is in use by other processes; the change applies when they end and the GPU is reset"
		case nvml.ERROR_RESET_REQUIRED:
			out.Reason = "a GPU reset (or node reboot) is required to apply the change"
		}
	}
	return out, nil
}

func (a *adapter) profileInfo(index int, d nvml.Device, profileID int) (nvml.GpuInstanceProfileInfo, error) {
	info, ret := d.GetGpuInstanceProfileInfo(profileID)
	if ret != nvml.SUCCESS {
		return info, newErr(fmt.Sprintf("GetGpuInstanceProfileInfo(%d)", profileID), index, ret)
	}
	return info, nil
}

func (a *adapter) CreateGpuInstance(index int, profileID int, placement Placement) (int, error) {
	d, err := a.device(index)
	if err != nil {
		return 0, err
	}
	info, err := a.profileInfo(index, d, profileID)
	if err != nil {
		return 0, err
	}
	pl := nvml.GpuInstancePlacement{Start: uint32(placement.Start), Size: uint32(placement.Size)}
	gi, ret := d.CreateGpuInstanceWithPlacement(&info, &pl)
	if ret != nvml.SUCCESS {
		return 0, newErr(fmt.Sprintf("CreateGpuInstanceWithPlacement(profile %d at %s)", profileID, placement), index, ret)
	}
	gii, ret := gi.GetInfo()
	if ret != nvml.SUCCESS {
		return 0, newErr("GpuInstance.GetInfo", index, ret)
	}
	return int(gii.Id), nil
}

func (a *adapter) gi(index, giID int) (nvml.GpuInstance, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	gi, ret := d.GetGpuInstanceById(giID)
	if ret != nvml.SUCCESS {
		return nil, newErr(fmt.Sprintf("GetGpuInstanceById(%d)", giID), index, ret)
	}
	return gi, nil
}

func (a *adapter) DestroyGpuInstance(index, giID int) error {
	gi, err := a.gi(index, giID)
	if err != nil {
		return err
	}
	return newErr(fmt.Sprintf("GpuInstance(%d).Destroy", giID), index, gi.Destroy())
}

func (a *adapter) CreateComputeInstance(index, giID, slices int) (int, error) {
	gi, err := a.gi(index, giID)
	if err != nil {
		return 0, err
	}
	pid, ok := CIProfileID(slices)
	if !ok {
		return 0, fmt.Errorf("compute instance of %d slices: no such NVML profile: %w", slices, ErrInvalidArgument)
	}
	info, ret := gi.GetComputeInstanceProfileInfo(pid, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
	if ret != nvml.SUCCESS {
		return 0, newErr(fmt.Sprintf("GpuInstance(%d).GetComputeInstanceProfileInfo(%dc)", giID, slices), index, ret)
	}
	ci, ret := gi.CreateComputeInstance(&info)
	if ret != nvml.SUCCESS {
		return 0, newErr(fmt.Sprintf("GpuInstance(%d).CreateComputeInstance(%dc)", giID, slices), index, ret)
	}
	cii, ret := ci.GetInfo()
	if ret != nvml.SUCCESS {
		return 0, newErr("ComputeInstance.GetInfo", index, ret)
	}
	return int(cii.Id), nil
}

func (a *adapter) DestroyComputeInstance(index, giID, ciID int) error {
	gi, err := a.gi(index, giID)
	if err != nil {
		return err
	}
	ci, ret := gi.GetComputeInstanceById(ciID)
	if ret != nvml.SUCCESS {
		return newErr(fmt.Sprintf("GpuInstance(%d).GetComputeInstanceById(%d)", giID, ciID), index, ret)
	}
	return newErr(fmt.Sprintf("ComputeInstance(%d/%d).Destroy", giID, ciID), index, ci.Destroy())
}

func (a *adapter) SetComputeMode(index int, mode ComputeMode) error {
	d, err := a.device(index)
	if err != nil {
		return err
	}
	var m nvml.ComputeMode
	switch mode {
	case ComputeModeDefault:
		m = nvml.COMPUTEMODE_DEFAULT
	case ComputeModeExclusiveProcess:
		m = nvml.COMPUTEMODE_EXCLUSIVE_PROCESS
	case ComputeModeProhibited:
		m = nvml.COMPUTEMODE_PROHIBITED
	default:
		return fmt.Errorf("compute mode %q: use one of Default, ExclusiveProcess, Prohibited: %w", mode, ErrInvalidArgument)
	}
	return newErr("SetComputeMode", index, d.SetComputeMode(m))
}

func (a *adapter) Telemetry(index int) (Telemetry, error) {
	d, err := a.device(index)
	if err != nil {
		return Telemetry{}, err
	}
	var t Telemetry
	u, ret := d.GetUtilizationRates()
	switch ret {
	case nvml.SUCCESS:
		t.UtilizationGPU, t.UtilizationMemory = int(u.Gpu), int(u.Memory)
	case nvml.ERROR_NOT_SUPPORTED:
		// MIG mode: the other readings still exist.
		t.NoUtilization = true
	default:
		return t, newErr("GetUtilizationRates", index, ret)
	}
	mem, ret := d.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return t, newErr("GetMemoryInfo", index, ret)
	}
	t.MemoryUsedMiB, t.MemoryTotalMiB = mem.Used/(1<<20), mem.Total/(1<<20)
	p, ret := d.GetPowerUsage()
	if ret != nvml.SUCCESS {
		return t, newErr("GetPowerUsage", index, ret)
	}
	t.PowerMilliwatts = int(p)
	temp, ret := d.GetTemperature(nvml.TEMPERATURE_GPU)
	if ret != nvml.SUCCESS {
		return t, newErr("GetTemperature", index, ret)
	}
	t.TemperatureC = int(temp)
	clk, ret := d.GetClockInfo(nvml.CLOCK_SM)
	if ret != nvml.SUCCESS {
		return t, newErr("GetClockInfo", index, ret)
	}
	t.SMClockMHz = int(clk)
	return t, nil
}

func (a *adapter) ECCErrors(index int) (ECCCounts, error) {
	d, err := a.device(index)
	if err != nil {
		return ECCCounts{}, err
	}
	var c ECCCounts
	for _, q := range []struct {
		typ nvml.MemoryErrorType
		ctr nvml.EccCounterType
		dst *uint64
	}{
		{nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC, &c.VolatileCorrected},
		{nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC, &c.VolatileUncorrected},
		{nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.AGGREGATE_ECC, &c.AggregateUncorrected},
	} {
		v, ret := d.GetTotalEccErrors(q.typ, q.ctr)
		switch ret {
		case nvml.SUCCESS:
			*q.dst = v
		case nvml.ERROR_NOT_SUPPORTED: // ECC off or not offered: counters stay zero
		default:
			return ECCCounts{}, newErr("GetTotalEccErrors", index, ret)
		}
	}
	return c, nil
}

func (a *adapter) Processes(index int) ([]Process, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	ps, ret := d.GetComputeRunningProcesses()
	if ret != nvml.SUCCESS {
		return nil, newErr("GetComputeRunningProcesses", index, ret)
	}
	out := make([]Process, 0, len(ps))
	for _, p := range ps {
		pr := Process{PID: int(p.Pid), UsedMemoryMiB: p.UsedGpuMemory / (1 << 20), GI: -1, CI: -1}
		if p.GpuInstanceId != math.MaxUint32 {
			pr.GI, pr.CI = int(p.GpuInstanceId), int(p.ComputeInstanceId)
		}
		out = append(out, pr)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out, nil
}

func (a *adapter) ProcessUtilization(index int) ([]ProcessUtilization, error) {
	d, err := a.device(index)
	if err != nil {
		return nil, err
	}
	samples, ret := d.GetProcessUtilization(0)
	if ret == nvml.ERROR_NOT_FOUND {
		return nil, nil // no process, or no sample yet
	}
	if ret != nvml.SUCCESS {
		return nil, newErr("GetProcessUtilization", index, ret)
	}
	// NVML may return several samples of a process; the newest counts.
	latest := map[uint32]nvml.ProcessUtilizationSample{}
	for _, s := range samples {
		if cur, ok := latest[s.Pid]; !ok || s.TimeStamp >= cur.TimeStamp {
			latest[s.Pid] = s
		}
	}
	out := make([]ProcessUtilization, 0, len(latest))
	for _, s := range latest {
		out = append(out, ProcessUtilization{PID: int(s.Pid), SMPercent: int(s.SmUtil), MemPercent: int(s.MemUtil)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out, nil
}

const watchedEvents = nvml.EventTypeXidCriticalError | nvml.EventTypeDoubleBitEccError | nvml.EventTypeSingleBitEccError

// eventWait is how long one EventSet.Wait blocks, so a cancelled context is noticed promptly.
const eventWait = 500 * time.Millisecond

func (a *adapter) WatchEvents(ctx context.Context, handle func(Event)) error {
	set, ret := a.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		return newErr("EventSetCreate", -1, ret)
	}
	defer set.Free()
	uuids := make([]string, len(a.devices))
	for i := range a.devices {
		d, err := a.device(i)
		if err != nil {
			klog.ErrorS(err, "GPU unavailable; its events are not watched", "gpu", i)
			continue
		}
		if u, ret := d.GetUUID(); ret == nvml.SUCCESS {
			uuids[i] = u
		}
		supported, ret := d.GetSupportedEventTypes()
		if ret != nvml.SUCCESS {
			klog.InfoS("GPU does not report supported events; its health events are not watched", "gpu", i, "code", retName(ret))
			continue
		}
		if ret := d.RegisterEvents(supported&watchedEvents, set); ret != nvml.SUCCESS {
			return newErr("RegisterEvents", i, ret)
		}
	}
	for ctx.Err() == nil {
		e, ret := set.Wait(uint32(eventWait / time.Millisecond))
		if ret == nvml.ERROR_TIMEOUT {
			continue
		}
		if ret != nvml.SUCCESS && ret != nvml.ERROR_GPU_IS_LOST {
			klog.ErrorS(newErr("EventSet.Wait", -1, ret), "waiting for GPU events; retrying")
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		ev := Event{Time: time.Now(), GPUIndex: -1, GI: -1, CI: -1}
		if e.Device != nil {
			if ev.GPUIndex = a.indexOf(e.Device); ev.GPUIndex >= 0 {
				ev.GPUUUID = uuids[ev.GPUIndex]
			}
		}
		switch {
		case ret == nvml.ERROR_GPU_IS_LOST:
			ev.Type, ev.XID = EventGPULost, 79
		case e.EventType == nvml.EventTypeXidCriticalError:
			ev.Type, ev.XID = EventXID, e.EventData
			if ev.XID == 79 {
				ev.Type = EventGPULost
			}
		case e.EventType == nvml.EventTypeDoubleBitEccError:
			ev.Type = EventECCDBE
		case e.EventType == nvml.EventTypeSingleBitEccError:
			ev.Type = EventECCSBE
		default:
			continue
		}
		if e.GpuInstanceId != math.MaxUint32 && ret == nvml.SUCCESS {
			ev.GI, ev.CI = int(e.GpuInstanceId), int(e.ComputeInstanceId)
		}
		handle(ev)
	}
	return nil
}

// GIProfileName derives a GPU-instance profile's name from what NVML reports, the way nvidia-smi
// names it: "<compute slices>g.<memory in GB>gb" plus a suffix for the profile variant.
// The memory figure is the instance's fraction of the GPU, rounded up to eighths, times the GPU's
// memory in GB.
func GIProfileName(profileID, computeSlices int, memMiB, totalBytes uint64) string {
	const gib = 1 << 30
	frac := float64(memMiB) * (1 << 20) / float64(totalBytes)
	frac = math.Ceil(frac*8) / 8
	totalGB := float64((totalBytes + gib - 1) / gib)
	gb := uint64(math.Round(frac * totalGB))
	name := fmt.Sprintf("%dg.%dgb", computeSlices, gb)
	switch profileID {
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1, nvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1:
		name += "+me"
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_GFX, nvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX,
		nvml.GPU_INSTANCE_PROFILE_4_SLICE_GFX, nvml.GPU_INSTANCE_PROFILE_3_SLICE_GFX:
		name += "+gfx"
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, nvml.GPU_INSTANCE_PROFILE_2_SLICE_NO_ME:
		name += "-me"
	case nvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, nvml.GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME:
		name += "+me.all"
	}
	return name
}

// BrandName names an NVML brand in lower case ("nvidia", "tesla", …).
func BrandName(b nvml.BrandType) string {
	switch b {
	case nvml.BRAND_QUADRO:
		return "quadro"
	case nvml.BRAND_TESLA:
		return "tesla"
	case nvml.BRAND_NVS:
		return "nvs"
	case nvml.BRAND_GRID:
		return "grid"
	case nvml.BRAND_GEFORCE:
		return "geforce"
	case nvml.BRAND_TITAN:
		return "titan"
	case nvml.BRAND_NVIDIA:
		return "nvidia"
	case nvml.BRAND_NVIDIA_RTX:
		return "nvidia-rtx"
	}
	return "unknown"
}

// Brands lists the brand names BrandName produces, for parsing.
var brandValues = map[string]nvml.BrandType{
	"quadro": nvml.BRAND_QUADRO, "tesla": nvml.BRAND_TESLA, "nvs": nvml.BRAND_NVS, "grid": nvml.BRAND_GRID,
	"geforce": nvml.BRAND_GEFORCE, "titan": nvml.BRAND_TITAN, "nvidia": nvml.BRAND_NVIDIA, "nvidia-rtx": nvml.BRAND_NVIDIA_RTX,
}

// ParseBrand is BrandName's inverse.
func ParseBrand(s string) (nvml.BrandType, bool) {
	b, ok := brandValues[strings.ToLower(s)]
	return b, ok
}

var archNames = map[nvml.DeviceArchitecture]string{
	nvml.DEVICE_ARCH_KEPLER: "kepler", nvml.DEVICE_ARCH_MAXWELL: "maxwell", nvml.DEVICE_ARCH_PASCAL: "pascal",
	nvml.DEVICE_ARCH_VOLTA: "volta", nvml.DEVICE_ARCH_TURING: "turing", nvml.DEVICE_ARCH_AMPERE: "ampere",
	nvml.DEVICE_ARCH_ADA: "ada", nvml.DEVICE_ARCH_HOPPER: "hopper", nvml.DEVICE_ARCH_BLACKWELL: "blackwell",
}

// ArchitectureName names an NVML architecture in lower case.
func ArchitectureName(a nvml.DeviceArchitecture) string {
	if s, ok := archNames[a]; ok {
		return s
	}
	return "unknown"
}

// ParseArchitecture is ArchitectureName's inverse.
func ParseArchitecture(s string) (nvml.DeviceArchitecture, bool) {
	for k, v := range archNames {
		if v == strings.ToLower(s) {
			return k, true
		}
	}
	return 0, false
}

func computeModeName(m nvml.ComputeMode) ComputeMode {
	switch m {
	case nvml.COMPUTEMODE_EXCLUSIVE_PROCESS:
		return ComputeModeExclusiveProcess
	case nvml.COMPUTEMODE_PROHIBITED:
		return ComputeModeProhibited
	}
	return ComputeModeDefault
}

func cString(b []int8) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}
