package sim

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

// Lib is a simulated node's NVML: it implements go-nvml's nvml.Interface over the node's state
// directory, so Tessera's NVML adapter runs unchanged on it.
//
// go-nvml's stock mock server (pkg/nvml/mock/server) is where this started, but its moq-generated
// handles record every call (memory that grows for as long as a daemon runs) and panic on calls they
// do not mock, and its MIG model is not faithful (see the package tests). Lib therefore implements the
// calls Tessera makes on its own handle types; a call Tessera does not make falls through to the
// embedded nil interface and panics, exactly as the stock mock would.
type Lib struct {
	nvml.Interface
	node    *Node
	devices []*device
	mu      sync.Mutex
	inits   int

	// Call counts and injected faults of the MIG-changing calls, for tests.
	callMu sync.Mutex
	calls  map[string]int
	faults map[string]fault
}

type fault struct {
	after int
	ret   nvml.Return
}

// Operations counted by Calls and failed by InjectFault.
const (
	OpSetMigMode             = "SetMigMode"
	OpCreateGpuInstance      = "CreateGpuInstance"
	OpDestroyGpuInstance     = "DestroyGpuInstance"
	OpCreateComputeInstance  = "CreateComputeInstance"
	OpDestroyComputeInstance = "DestroyComputeInstance"
)

// Calls returns how many times this Lib was asked to perform op.
func (l *Lib) Calls(op string) int {
	l.callMu.Lock()
	defer l.callMu.Unlock()
	return l.calls[op]
}

// InjectFault makes the call of op that comes after `after` more calls fail with err's NVML code
// (err is an nvmlib sentinel such as nvmlib.ErrInsufficientResources; anything else is ERROR_UNKNOWN).
// The fault fires once.
func (l *Lib) InjectFault(op string, after int, err error) {
	l.callMu.Lock()
	defer l.callMu.Unlock()
	if l.faults == nil {
		l.faults = map[string]fault{}
	}
	l.faults[op] = fault{after: l.calls[op] + after, ret: returnOf(err)}
}

// count records a call of op and returns the injected fault's code if it fires now.
func (l *Lib) count(op string) nvml.Return {
	l.callMu.Lock()
	defer l.callMu.Unlock()
	if l.calls == nil {
		l.calls = map[string]int{}
	}
	n := l.calls[op]
	l.calls[op] = n + 1
	if f, ok := l.faults[op]; ok && f.after == n {
		delete(l.faults, op)
		return f.ret
	}
	return nvml.SUCCESS
}

func returnOf(err error) nvml.Return {
	for sentinel, ret := range map[error]nvml.Return{
		nvmlib.ErrInUse: nvml.ERROR_IN_USE, nvmlib.ErrInsufficientResources: nvml.ERROR_INSUFFICIENT_RESOURCES,
		nvmlib.ErrNotSupported: nvml.ERROR_NOT_SUPPORTED, nvmlib.ErrGPULost: nvml.ERROR_GPU_IS_LOST,
		nvmlib.ErrInvalidArgument: nvml.ERROR_INVALID_ARGUMENT, nvmlib.ErrNotFound: nvml.ERROR_NOT_FOUND,
		nvmlib.ErrResetRequired: nvml.ERROR_RESET_REQUIRED, nvmlib.ErrNoPermission: nvml.ERROR_NO_PERMISSION,
	} {
		if err == sentinel {
			return ret
		}
	}
	return nvml.ERROR_UNKNOWN
}

var _ nvml.Interface = (*Lib)(nil)

// NVML returns the node's go-nvml implementation.
func (n *Node) NVML() *Lib {
	l := &Lib{node: n}
	for i := range n.store.node.GPUs {
		l.devices = append(l.devices, &device{lib: l, index: i})
	}
	return l
}

func (l *Lib) Init() nvml.Return {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inits++
	return nvml.SUCCESS
}

func (l *Lib) Shutdown() nvml.Return {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inits == 0 {
		return nvml.ERROR_UNINITIALIZED
	}
	l.inits--
	return nvml.SUCCESS
}

func (l *Lib) ErrorString(r nvml.Return) string { return r.Error() }

func (l *Lib) SystemGetDriverVersion() (string, nvml.Return) {
	return l.node.store.node.Spec.DriverVersion, nvml.SUCCESS
}

func (l *Lib) SystemGetNVMLVersion() (string, nvml.Return) {
	major := strings.Split(l.node.store.node.Spec.CUDAVersion, ".")[0]
	return major + "." + l.node.store.node.Spec.DriverVersion, nvml.SUCCESS
}

func (l *Lib) SystemGetCudaDriverVersion() (int, nvml.Return) {
	parts := strings.SplitN(l.node.store.node.Spec.CUDAVersion, ".", 2)
	major, _ := strconv.Atoi(parts[0])
	minor := 0
	if len(parts) == 2 {
		minor, _ = strconv.Atoi(parts[1])
	}
	return major*1000 + minor*10, nvml.SUCCESS
}

func (l *Lib) SystemGetCudaDriverVersion_v2() (int, nvml.Return) {
	return l.SystemGetCudaDriverVersion()
}

func (l *Lib) DeviceGetCount() (int, nvml.Return) { return len(l.devices), nvml.SUCCESS }

func (l *Lib) DeviceGetHandleByIndex(i int) (nvml.Device, nvml.Return) {
	if i < 0 || i >= len(l.devices) {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	d := l.devices[i]
	if st, ret := d.state(); ret != nvml.SUCCESS {
		return nil, ret
	} else if st.Lost {
		return nil, nvml.ERROR_GPU_IS_LOST
	}
	return d, nvml.SUCCESS
}

func (l *Lib) DeviceGetHandleByUUID(u string) (nvml.Device, nvml.Return) {
	for i, g := range l.node.store.node.GPUs {
		if g.UUID == u {
			return l.DeviceGetHandleByIndex(i)
		}
	}
	for _, d := range l.devices {
		st, ret := d.state()
		if ret != nvml.SUCCESS {
			continue
		}
		for _, gi := range st.GIs {
			for _, ci := range gi.CIs {
				if ci.UUID == u {
					return &migDevice{parent: d, gi: gi.ID, ci: ci.ID}, nvml.SUCCESS
				}
			}
		}
	}
	return nil, nvml.ERROR_NOT_FOUND
}

func (l *Lib) DeviceGetHandleByPciBusId(bus string) (nvml.Device, nvml.Return) {
	for i, g := range l.node.store.node.GPUs {
		if strings.EqualFold(g.PCIBusID, bus) {
			return l.DeviceGetHandleByIndex(i)
		}
	}
	return nil, nvml.ERROR_NOT_FOUND
}

func (l *Lib) EventSetCreate() (nvml.EventSet, nvml.Return) {
	es, err := l.node.newEventSet()
	if err != nil {
		klog.ErrorS(err, "simulated NVML: creating event set")
		return nil, nvml.ERROR_UNKNOWN
	}
	return es, nvml.SUCCESS
}

// device is a whole simulated GPU's handle.
type device struct {
	nvml.Device
	lib   *Lib
	index int
}

func (d *device) spec() GPUSpec       { return d.lib.node.store.node.GPUs[d.index] }
func (d *device) model() models.Model { return d.lib.node.store.node.Model(d.index) }

func (d *device) state() (*gpuState, nvml.Return) {
	st, err := d.lib.node.store.readGPU(d.index)
	if err != nil {
		klog.ErrorS(err, "simulated NVML: reading GPU state", "gpu", d.index)
		return nil, nvml.ERROR_UNKNOWN
	}
	return st, nvml.SUCCESS
}

// live returns the state of a GPU that is not lost.
func (d *device) live() (*gpuState, nvml.Return) {
	st, ret := d.state()
	if ret == nvml.SUCCESS && st.Lost {
		return nil, nvml.ERROR_GPU_IS_LOST
	}
	return st, ret
}

// update changes the GPU's state; fn returns the NVML code, and nothing is saved unless it is SUCCESS.
func (d *device) update(fn func(*gpuState) nvml.Return) nvml.Return {
	var out nvml.Return
	err := d.lib.node.store.updateGPU(d.index, func(st *gpuState) error {
		if st.Lost {
			out = nvml.ERROR_GPU_IS_LOST
			return errAbort
		}
		out = fn(st)
		if out != nvml.SUCCESS {
			return errAbort
		}
		return nil
	})
	if err != nil && err != errAbort {
		klog.ErrorS(err, "simulated NVML: updating GPU state", "gpu", d.index)
		return nvml.ERROR_UNKNOWN
	}
	if out == nvml.SUCCESS {
		d.lib.node.syncHost(d.index)
	}
	return out
}

func static[T any](d *device, v T) (T, nvml.Return) {
	if _, ret := d.live(); ret != nvml.SUCCESS {
		var zero T
		return zero, ret
	}
	return v, nvml.SUCCESS
}

func (d *device) GetIndex() (int, nvml.Return)           { return static(d, d.index) }
func (d *device) GetMinorNumber() (int, nvml.Return)     { return static(d, d.spec().Minor) }
func (d *device) GetUUID() (string, nvml.Return)         { return static(d, d.spec().UUID) }
func (d *device) GetName() (string, nvml.Return)         { return static(d, d.model().Name) }
func (d *device) GetNumaNodeId() (int, nvml.Return)      { return static(d, d.spec().NUMANode) }
func (d *device) IsMigDeviceHandle() (bool, nvml.Return) { return false, nvml.SUCCESS }

func (d *device) GetSerial() (string, nvml.Return) {
	return static(d, fmt.Sprintf("16542230%05d", d.index+1))
}

func (d *device) GetBrand() (nvml.BrandType, nvml.Return) {
	b, ok := nvmlib.ParseBrand(d.model().Brand)
	if !ok {
		b = nvml.BRAND_UNKNOWN
	}
	return static(d, b)
}

func (d *device) GetArchitecture() (nvml.DeviceArchitecture, nvml.Return) {
	a, ok := nvmlib.ParseArchitecture(d.model().Architecture)
	if !ok {
		a = nvml.DEVICE_ARCH_UNKNOWN
	}
	return static(d, a)
}

func (d *device) GetCudaComputeCapability() (int, int, nvml.Return) {
	var major, minor int
	fmt.Sscanf(d.model().ComputeCapability, "%d.%d", &major, &minor)
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return 0, 0, ret
	}
	return major, minor, nvml.SUCCESS
}

func (d *device) GetPciInfo() (nvml.PciInfo, nvml.Return) {
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return nvml.PciInfo{}, ret
	}
	bus := d.spec().PCIBusID
	var p nvml.PciInfo
	copyCString(p.BusId[:], bus)
	copyCString(p.BusIdLegacy[:], bus[4:])
	var dom, b, dev, fn uint32
	fmt.Sscanf(bus, "%08X:%02X:%02X.%d", &dom, &b, &dev, &fn)
	p.Domain, p.Bus, p.Device = dom, b, dev
	p.PciDeviceId = d.model().PCIDeviceID
	p.PciSubSystemId = d.model().PCIDeviceID&0xffff0000 | 0x10de
	return p, nvml.SUCCESS
}

func copyCString(dst []int8, s string) {
	for i := 0; i < len(s) && i < len(dst)-1; i++ {
		dst[i] = int8(s[i])
	}
}

func (d *device) GetMemoryInfo() (nvml.Memory, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nvml.Memory{}, ret
	}
	total := d.model().MemoryMiB << 20
	used := st.Readings.MemUsedMiB << 20
	for _, p := range st.Processes {
		used += p.MemMiB << 20
	}
	used = min(used, total)
	return nvml.Memory{Total: total, Used: used, Free: total - used}, nvml.SUCCESS
}

func (d *device) GetMemoryInfo_v2() (nvml.Memory_v2, nvml.Return) {
	m, ret := d.GetMemoryInfo()
	return nvml.Memory_v2{Version: nvml.STRUCT_VERSION(nvml.Memory_v2{}, 2), Total: m.Total, Used: m.Used, Free: m.Free}, ret
}

func (d *device) GetMigMode() (int, int, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, 0, ret
	}
	if d.model().MIG == nil {
		return 0, 0, nvml.ERROR_NOT_SUPPORTED
	}
	return boolMode(st.MigEnabled), boolMode(st.MigPending), nvml.SUCCESS
}

func boolMode(b bool) int {
	if b {
		return nvml.DEVICE_MIG_ENABLE
	}
	return nvml.DEVICE_MIG_DISABLE
}

func (d *device) SetMigMode(mode int) (nvml.Return, nvml.Return) {
	if mode != nvml.DEVICE_MIG_ENABLE && mode != nvml.DEVICE_MIG_DISABLE {
		return nvml.ERROR_INVALID_ARGUMENT, nvml.ERROR_INVALID_ARGUMENT
	}
	if r := d.lib.count(OpSetMigMode); r != nvml.SUCCESS {
		return r, r
	}
	var activation nvml.Return
	ret := d.update(func(st *gpuState) nvml.Return {
		var r nvml.Return
		activation, r = setMigMode(st, d.model(), mode == nvml.DEVICE_MIG_ENABLE)
		return r
	})
	if ret != nvml.SUCCESS {
		return ret, ret
	}
	return activation, nvml.SUCCESS
}

func (d *device) GetComputeMode() (nvml.ComputeMode, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	return nvml.ComputeMode(st.ComputeMode), nvml.SUCCESS
}

func (d *device) SetComputeMode(m nvml.ComputeMode) nvml.Return {
	switch m {
	case nvml.COMPUTEMODE_DEFAULT, nvml.COMPUTEMODE_EXCLUSIVE_PROCESS, nvml.COMPUTEMODE_PROHIBITED:
	case nvml.COMPUTEMODE_EXCLUSIVE_THREAD:
		return nvml.ERROR_NOT_SUPPORTED // deprecated and refused by current drivers
	default:
		return nvml.ERROR_INVALID_ARGUMENT
	}
	return d.update(func(st *gpuState) nvml.Return {
		st.ComputeMode = int(m)
		return nvml.SUCCESS
	})
}

func (d *device) GetPersistenceMode() (nvml.EnableState, nvml.Return) {
	return static(d, nvml.FEATURE_ENABLED)
}

func (d *device) other(o nvml.Device) (*device, bool) {
	od, ok := o.(*device)
	return od, ok && od.lib == d.lib
}

func (d *device) GetP2PStatus(o nvml.Device, idx nvml.GpuP2PCapsIndex) (nvml.GpuP2PStatus, nvml.Return) {
	od, ok := d.other(o)
	if !ok {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return 0, ret
	}
	if _, ret := od.live(); ret != nvml.SUCCESS {
		return 0, ret
	}
	linked := containsInt(d.lib.node.store.node.Links[d.index], od.index)
	switch idx {
	case nvml.P2P_CAPS_INDEX_NVLINK:
		if linked {
			return nvml.P2P_STATUS_OK, nvml.SUCCESS
		}
		return nvml.P2P_STATUS_NOT_SUPPORTED, nvml.SUCCESS
	case nvml.P2P_CAPS_INDEX_READ, nvml.P2P_CAPS_INDEX_WRITE, nvml.P2P_CAPS_INDEX_ATOMICS:
		if linked || d.spec().NUMANode == od.spec().NUMANode {
			return nvml.P2P_STATUS_OK, nvml.SUCCESS
		}
		return nvml.P2P_STATUS_CHIPSET_NOT_SUPPORED, nvml.SUCCESS
	}
	return nvml.P2P_STATUS_NOT_SUPPORTED, nvml.SUCCESS
}

func (d *device) GetTopologyCommonAncestor(o nvml.Device) (nvml.GpuTopologyLevel, nvml.Return) {
	od, ok := d.other(o)
	if !ok {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return 0, ret
	}
	switch {
	case od.index == d.index:
		return nvml.TOPOLOGY_INTERNAL, nvml.SUCCESS
	case d.spec().NUMANode == od.spec().NUMANode:
		return nvml.TOPOLOGY_HOSTBRIDGE, nvml.SUCCESS
	}
	return nvml.TOPOLOGY_SYSTEM, nvml.SUCCESS
}

func (d *device) GetNvLinkState(link int) (nvml.EnableState, nvml.Return) {
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return 0, ret
	}
	if link < 0 || link >= d.model().NVLinks {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	if len(d.lib.node.store.node.Links[d.index]) == 0 {
		return nvml.FEATURE_DISABLED, nvml.SUCCESS
	}
	return nvml.FEATURE_ENABLED, nvml.SUCCESS
}

func (d *device) GetUtilizationRates() (nvml.Utilization, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nvml.Utilization{}, ret
	}
	if st.MigEnabled {
		// As on hardware: NVML gives no utilization for a GPU in MIG mode.
		return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED
	}
	return nvml.Utilization{Gpu: uint32(st.Readings.UtilGPU), Memory: uint32(st.Readings.UtilMemory)}, nvml.SUCCESS
}

func (d *device) GetPowerUsage() (uint32, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	return uint32(st.Readings.PowerMW), nvml.SUCCESS
}

func (d *device) GetTemperature(s nvml.TemperatureSensors) (uint32, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	if s != nvml.TEMPERATURE_GPU {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	return uint32(st.Readings.TempC), nvml.SUCCESS
}

func (d *device) GetClockInfo(t nvml.ClockType) (uint32, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	switch t {
	case nvml.CLOCK_SM, nvml.CLOCK_GRAPHICS:
		return uint32(st.Readings.SMClockMHz), nvml.SUCCESS
	case nvml.CLOCK_MEM:
		return 2619, nvml.SUCCESS
	}
	return 0, nvml.ERROR_INVALID_ARGUMENT
}

func (d *device) GetComputeRunningProcesses() ([]nvml.ProcessInfo, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	out := make([]nvml.ProcessInfo, 0, len(st.Processes))
	for _, p := range st.Processes {
		pi := nvml.ProcessInfo{Pid: uint32(p.PID), UsedGpuMemory: p.MemMiB << 20, GpuInstanceId: 0xFFFFFFFF, ComputeInstanceId: 0xFFFFFFFF}
		if p.GI >= 0 {
			pi.GpuInstanceId, pi.ComputeInstanceId = uint32(p.GI), uint32(p.CI)
		}
		out = append(out, pi)
	}
	return out, nvml.SUCCESS
}

// GetProcessUtilization returns one sample per process, stamped now. As on hardware, a GPU in MIG
// mode gives none (ERROR_NOT_SUPPORTED), and no process means ERROR_NOT_FOUND.
func (d *device) GetProcessUtilization(lastSeen uint64) ([]nvml.ProcessUtilizationSample, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if st.MigEnabled {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	now := uint64(time.Now().UnixMicro())
	if len(st.Processes) == 0 || now <= lastSeen {
		return nil, nvml.ERROR_NOT_FOUND
	}
	out := make([]nvml.ProcessUtilizationSample, 0, len(st.Processes))
	for _, p := range st.Processes {
		out = append(out, nvml.ProcessUtilizationSample{Pid: uint32(p.PID), TimeStamp: now, SmUtil: uint32(p.SMPercent)})
	}
	return out, nvml.SUCCESS
}

func (d *device) GetTotalEccErrors(t nvml.MemoryErrorType, c nvml.EccCounterType) (uint64, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	e := st.ECC
	switch {
	case t == nvml.MEMORY_ERROR_TYPE_CORRECTED && c == nvml.VOLATILE_ECC:
		return e.SingleBit, nvml.SUCCESS
	case t == nvml.MEMORY_ERROR_TYPE_UNCORRECTED && c == nvml.VOLATILE_ECC:
		return e.DoubleBit, nvml.SUCCESS
	case t == nvml.MEMORY_ERROR_TYPE_CORRECTED && c == nvml.AGGREGATE_ECC:
		return e.AggregateSingleBit, nvml.SUCCESS
	case t == nvml.MEMORY_ERROR_TYPE_UNCORRECTED && c == nvml.AGGREGATE_ECC:
		return e.AggregateDoubleBit, nvml.SUCCESS
	}
	return 0, nvml.ERROR_INVALID_ARGUMENT
}

func (d *device) GetSupportedEventTypes() (uint64, nvml.Return) {
	return static(d, uint64(nvml.EventTypeXidCriticalError|nvml.EventTypeDoubleBitEccError|nvml.EventTypeSingleBitEccError))
}

func (d *device) RegisterEvents(types uint64, set nvml.EventSet) nvml.Return {
	es, ok := set.(*eventSet)
	if !ok || es.node != d.lib.node {
		return nvml.ERROR_INVALID_ARGUMENT
	}
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return ret
	}
	supported, _ := d.GetSupportedEventTypes()
	if types&^supported != 0 {
		return nvml.ERROR_NOT_SUPPORTED
	}
	es.register(d, types)
	return nvml.SUCCESS
}

// MIG.

func (d *device) migProfile(id int) (models.GIProfile, nvml.Return) {
	m := d.model()
	if m.MIG == nil {
		return models.GIProfile{}, nvml.ERROR_NOT_SUPPORTED
	}
	if id < 0 || id >= nvml.GPU_INSTANCE_PROFILE_COUNT {
		return models.GIProfile{}, nvml.ERROR_INVALID_ARGUMENT
	}
	p, ok := m.ProfileByID(id)
	if !ok {
		return models.GIProfile{}, nvml.ERROR_NOT_SUPPORTED
	}
	return p, nvml.SUCCESS
}

func giProfileInfo(p models.GIProfile) nvml.GpuInstanceProfileInfo {
	return nvml.GpuInstanceProfileInfo{
		Id:                  uint32(p.ProfileID),
		IsP2pSupported:      1,
		SliceCount:          uint32(p.ComputeSlices),
		InstanceCount:       uint32(p.InstanceCount),
		MultiprocessorCount: uint32(p.SMCount),
		CopyEngineCount:     uint32(p.CopyEngines),
		DecoderCount:        uint32(p.Decoders),
		EncoderCount:        uint32(p.Encoders),
		JpegCount:           uint32(p.JPEGs),
		OfaCount:            uint32(p.OFAs),
		MemorySizeMB:        p.MemoryMiB,
	}
}

// GetGpuInstanceProfileInfo answers for any MIG-capable GPU, in MIG mode or not, as the driver does.
func (d *device) GetGpuInstanceProfileInfo(id int) (nvml.GpuInstanceProfileInfo, nvml.Return) {
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return nvml.GpuInstanceProfileInfo{}, ret
	}
	p, ret := d.migProfile(id)
	if ret != nvml.SUCCESS {
		return nvml.GpuInstanceProfileInfo{}, ret
	}
	return giProfileInfo(p), nvml.SUCCESS
}

// GetGpuInstancePossiblePlacements needs MIG mode on (NVML_ERROR_NOT_SUPPORTED otherwise).
func (d *device) GetGpuInstancePossiblePlacements(info *nvml.GpuInstanceProfileInfo) ([]nvml.GpuInstancePlacement, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	p, ret := d.migProfile(int(info.Id))
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if !st.MigEnabled {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	out := make([]nvml.GpuInstancePlacement, 0, len(p.Placements))
	for _, s := range p.Placements {
		out = append(out, nvml.GpuInstancePlacement{Start: uint32(s), Size: uint32(p.MemorySlices)})
	}
	return out, nvml.SUCCESS
}

func (d *device) GetGpuInstanceRemainingCapacity(info *nvml.GpuInstanceProfileInfo) (int, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	if info == nil {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	p, ret := d.migProfile(int(info.Id))
	if ret != nvml.SUCCESS {
		return 0, ret
	}
	if !st.MigEnabled {
		return 0, nvml.ERROR_NOT_SUPPORTED
	}
	// Count how many more instances fit, greedily, on a scratch copy of the state.
	scratch := *st
	scratch.GIs = append([]giState(nil), st.GIs...)
	n := 0
	for {
		if _, r := createGI(&scratch, d.model(), p, nil); r != nvml.SUCCESS {
			return n, nvml.SUCCESS
		}
		n++
	}
}

func (d *device) createGI(info *nvml.GpuInstanceProfileInfo, placement *nvml.GpuInstancePlacement) (nvml.GpuInstance, nvml.Return) {
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	if r := d.lib.count(OpCreateGpuInstance); r != nvml.SUCCESS {
		return nil, r
	}
	p, ret := d.migProfile(int(info.Id))
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	var gi giState
	ret = d.update(func(st *gpuState) nvml.Return {
		var r nvml.Return
		gi, r = createGI(st, d.model(), p, placement)
		return r
	})
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	return &gpuInstance{dev: d, id: gi.ID}, nvml.SUCCESS
}

func (d *device) CreateGpuInstance(info *nvml.GpuInstanceProfileInfo) (nvml.GpuInstance, nvml.Return) {
	return d.createGI(info, nil)
}

func (d *device) CreateGpuInstanceWithPlacement(info *nvml.GpuInstanceProfileInfo, pl *nvml.GpuInstancePlacement) (nvml.GpuInstance, nvml.Return) {
	if pl == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	return d.createGI(info, pl)
}

func (d *device) GetGpuInstances(info *nvml.GpuInstanceProfileInfo) ([]nvml.GpuInstance, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	if _, ret := d.migProfile(int(info.Id)); ret != nvml.SUCCESS {
		return nil, ret
	}
	if !st.MigEnabled {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	var out []nvml.GpuInstance
	for _, gi := range st.GIs {
		if gi.ProfileID == int(info.Id) {
			out = append(out, &gpuInstance{dev: d, id: gi.ID})
		}
	}
	return out, nvml.SUCCESS
}

func (d *device) GetGpuInstanceById(id int) (nvml.GpuInstance, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if d.model().MIG == nil || !st.MigEnabled {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	if _, ok := findGI(st, id); !ok {
		return nil, nvml.ERROR_NOT_FOUND
	}
	return &gpuInstance{dev: d, id: id}, nvml.SUCCESS
}

// GetMaxMigDeviceCount is the most MIG devices the GPU can hold: one per compute slice.
func (d *device) GetMaxMigDeviceCount() (int, nvml.Return) {
	if _, ret := d.live(); ret != nvml.SUCCESS {
		return 0, ret
	}
	if d.model().MIG == nil {
		return 0, nvml.SUCCESS
	}
	return d.model().MIG.ComputeSlices, nvml.SUCCESS
}

// migDevices lists the GPU's MIG devices in NVML's order (by GI ID, then CI ID).
func migDevices(st *gpuState) [][2]int {
	var out [][2]int
	for _, gi := range st.GIs {
		for _, ci := range gi.CIs {
			out = append(out, [2]int{gi.ID, ci.ID})
		}
	}
	return out
}

func (d *device) GetMigDeviceHandleByIndex(i int) (nvml.Device, nvml.Return) {
	st, ret := d.live()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if d.model().MIG == nil || !st.MigEnabled {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	if i < 0 || i >= d.model().MIG.ComputeSlices {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	devs := migDevices(st)
	if i >= len(devs) {
		return nil, nvml.ERROR_NOT_FOUND
	}
	return &migDevice{parent: d, gi: devs[i][0], ci: devs[i][1]}, nvml.SUCCESS
}

// gpuInstance is a GPU instance handle; it reads the GPU's state at each call.
type gpuInstance struct {
	nvml.GpuInstance
	dev *device
	id  int
}

func (g *gpuInstance) find() (*gpuState, giState, nvml.Return) {
	st, ret := g.dev.live()
	if ret != nvml.SUCCESS {
		return nil, giState{}, ret
	}
	i, ok := findGI(st, g.id)
	if !ok {
		return nil, giState{}, nvml.ERROR_INVALID_ARGUMENT
	}
	return st, st.GIs[i], nvml.SUCCESS
}

func (g *gpuInstance) GetInfo() (nvml.GpuInstanceInfo, nvml.Return) {
	_, gi, ret := g.find()
	if ret != nvml.SUCCESS {
		return nvml.GpuInstanceInfo{}, ret
	}
	return nvml.GpuInstanceInfo{
		Device:    g.dev,
		Id:        uint32(gi.ID),
		ProfileId: uint32(gi.ProfileID),
		Placement: nvml.GpuInstancePlacement{Start: uint32(gi.Start), Size: uint32(gi.Size)},
	}, nvml.SUCCESS
}

func (g *gpuInstance) profile(gi giState) models.GIProfile {
	p, _ := g.dev.model().ProfileByID(gi.ProfileID)
	return p
}

var ciSlicesByProfile = map[int]int{
	nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE: 1, nvml.COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
	nvml.COMPUTE_INSTANCE_PROFILE_3_SLICE: 3, nvml.COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
	nvml.COMPUTE_INSTANCE_PROFILE_7_SLICE: 7, nvml.COMPUTE_INSTANCE_PROFILE_8_SLICE: 8,
	nvml.COMPUTE_INSTANCE_PROFILE_6_SLICE: 6,
}

func (g *gpuInstance) GetComputeInstanceProfileInfo(profile, engine int) (nvml.ComputeInstanceProfileInfo, nvml.Return) {
	_, gi, ret := g.find()
	if ret != nvml.SUCCESS {
		return nvml.ComputeInstanceProfileInfo{}, ret
	}
	if profile < 0 || profile >= nvml.COMPUTE_INSTANCE_PROFILE_COUNT || engine != nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED {
		return nvml.ComputeInstanceProfileInfo{}, nvml.ERROR_INVALID_ARGUMENT
	}
	slices, ok := ciSlicesByProfile[profile]
	p := g.profile(gi)
	if !ok || !containsInt(p.ComputeInstanceSlices, slices) {
		return nvml.ComputeInstanceProfileInfo{}, nvml.ERROR_NOT_SUPPORTED
	}
	return nvml.ComputeInstanceProfileInfo{
		Id:                    uint32(profile),
		SliceCount:            uint32(slices),
		InstanceCount:         uint32(len(ciPlacements(p.ComputeSlices, slices))),
		MultiprocessorCount:   uint32(p.SMCount * slices / p.ComputeSlices),
		SharedCopyEngineCount: uint32(p.CopyEngines),
		SharedDecoderCount:    uint32(p.Decoders),
		SharedEncoderCount:    uint32(p.Encoders),
		SharedJpegCount:       uint32(p.JPEGs),
		SharedOfaCount:        uint32(p.OFAs),
	}, nvml.SUCCESS
}

func (g *gpuInstance) GetComputeInstancePossiblePlacements(info *nvml.ComputeInstanceProfileInfo) ([]nvml.ComputeInstancePlacement, nvml.Return) {
	_, gi, ret := g.find()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	p := g.profile(gi)
	slices := int(info.SliceCount)
	if !containsInt(p.ComputeInstanceSlices, slices) {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	var out []nvml.ComputeInstancePlacement
	for _, s := range ciPlacements(p.ComputeSlices, slices) {
		out = append(out, nvml.ComputeInstancePlacement{Start: uint32(s), Size: uint32(slices)})
	}
	return out, nvml.SUCCESS
}

func (g *gpuInstance) createCI(info *nvml.ComputeInstanceProfileInfo, start int) (nvml.ComputeInstance, nvml.Return) {
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	if r := g.dev.lib.count(OpCreateComputeInstance); r != nvml.SUCCESS {
		return nil, r
	}
	var ci ciState
	ret := g.dev.update(func(st *gpuState) nvml.Return {
		i, ok := findGI(st, g.id)
		if !ok {
			return nvml.ERROR_INVALID_ARGUMENT
		}
		var r nvml.Return
		ci, r = createCI(st, g.dev.spec().UUID, g.profile(st.GIs[i]), i, int(info.SliceCount), start)
		return r
	})
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	return &computeInstance{gi: g, id: ci.ID}, nvml.SUCCESS
}

func (g *gpuInstance) CreateComputeInstance(info *nvml.ComputeInstanceProfileInfo) (nvml.ComputeInstance, nvml.Return) {
	return g.createCI(info, -1)
}

func (g *gpuInstance) CreateComputeInstanceWithPlacement(info *nvml.ComputeInstanceProfileInfo, pl *nvml.ComputeInstancePlacement) (nvml.ComputeInstance, nvml.Return) {
	if pl == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	return g.createCI(info, int(pl.Start))
}

func (g *gpuInstance) GetComputeInstances(info *nvml.ComputeInstanceProfileInfo) ([]nvml.ComputeInstance, nvml.Return) {
	_, gi, ret := g.find()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	if info == nil {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	var out []nvml.ComputeInstance
	for _, ci := range gi.CIs {
		if ci.Slices == int(info.SliceCount) {
			out = append(out, &computeInstance{gi: g, id: ci.ID})
		}
	}
	return out, nvml.SUCCESS
}

func (g *gpuInstance) GetComputeInstanceById(id int) (nvml.ComputeInstance, nvml.Return) {
	_, gi, ret := g.find()
	if ret != nvml.SUCCESS {
		return nil, ret
	}
	for _, ci := range gi.CIs {
		if ci.ID == id {
			return &computeInstance{gi: g, id: id}, nvml.SUCCESS
		}
	}
	return nil, nvml.ERROR_NOT_FOUND
}

func (g *gpuInstance) Destroy() nvml.Return {
	if r := g.dev.lib.count(OpDestroyGpuInstance); r != nvml.SUCCESS {
		return r
	}
	return g.dev.update(func(st *gpuState) nvml.Return { return destroyGI(st, g.id) })
}

// computeInstance is a compute instance handle.
type computeInstance struct {
	nvml.ComputeInstance
	gi *gpuInstance
	id int
}

func (c *computeInstance) GetInfo() (nvml.ComputeInstanceInfo, nvml.Return) {
	_, gi, ret := c.gi.find()
	if ret != nvml.SUCCESS {
		return nvml.ComputeInstanceInfo{}, ret
	}
	for _, ci := range gi.CIs {
		if ci.ID == c.id {
			pid := 0
			for id, s := range ciSlicesByProfile {
				if s == ci.Slices {
					pid = id
				}
			}
			return nvml.ComputeInstanceInfo{
				Device:      c.gi.dev,
				GpuInstance: c.gi,
				Id:          uint32(ci.ID),
				ProfileId:   uint32(pid),
				Placement:   nvml.ComputeInstancePlacement{Start: uint32(ci.Start), Size: uint32(ci.Slices)},
			}, nvml.SUCCESS
		}
	}
	return nvml.ComputeInstanceInfo{}, nvml.ERROR_INVALID_ARGUMENT
}

func (c *computeInstance) Destroy() nvml.Return {
	if r := c.gi.dev.lib.count(OpDestroyComputeInstance); r != nvml.SUCCESS {
		return r
	}
	return c.gi.dev.update(func(st *gpuState) nvml.Return {
		i, ok := findGI(st, c.gi.id)
		if !ok {
			return nvml.ERROR_INVALID_ARGUMENT
		}
		return destroyCI(st, i, c.id)
	})
}

// migDevice is a MIG device handle (one compute instance), synthesized as the driver does.
type migDevice struct {
	nvml.Device
	parent *device
	gi, ci int
}

func (m *migDevice) find() (giState, ciState, nvml.Return) {
	st, ret := m.parent.live()
	if ret != nvml.SUCCESS {
		return giState{}, ciState{}, ret
	}
	i, ok := findGI(st, m.gi)
	if !ok {
		return giState{}, ciState{}, nvml.ERROR_INVALID_ARGUMENT
	}
	for _, ci := range st.GIs[i].CIs {
		if ci.ID == m.ci {
			return st.GIs[i], ci, nvml.SUCCESS
		}
	}
	return giState{}, ciState{}, nvml.ERROR_INVALID_ARGUMENT
}

func (m *migDevice) IsMigDeviceHandle() (bool, nvml.Return) { return true, nvml.SUCCESS }

func (m *migDevice) GetDeviceHandleFromMigDeviceHandle() (nvml.Device, nvml.Return) {
	return m.parent, nvml.SUCCESS
}

func (m *migDevice) GetGpuInstanceId() (int, nvml.Return) {
	_, _, ret := m.find()
	return m.gi, ret
}

func (m *migDevice) GetComputeInstanceId() (int, nvml.Return) {
	_, _, ret := m.find()
	return m.ci, ret
}

func (m *migDevice) GetUUID() (string, nvml.Return) {
	_, ci, ret := m.find()
	return ci.UUID, ret
}

func (m *migDevice) GetName() (string, nvml.Return) {
	gi, ci, ret := m.find()
	if ret != nvml.SUCCESS {
		return "", ret
	}
	p, _ := m.parent.model().ProfileByID(gi.ProfileID)
	name := p.Name
	if ci.Slices < p.ComputeSlices {
		name = fmt.Sprintf("%dc.%s", ci.Slices, p.Name)
	}
	return m.parent.model().Name + " MIG " + name, nvml.SUCCESS
}

func (m *migDevice) GetMemoryInfo() (nvml.Memory, nvml.Return) {
	gi, _, ret := m.find()
	if ret != nvml.SUCCESS {
		return nvml.Memory{}, ret
	}
	p, _ := m.parent.model().ProfileByID(gi.ProfileID)
	st, _ := m.parent.live()
	var used uint64
	for _, pr := range st.Processes {
		if pr.GI == m.gi {
			used += pr.MemMiB << 20
		}
	}
	total := p.MemoryMiB << 20
	used = min(used, total)
	return nvml.Memory{Total: total, Used: used, Free: total - used}, nvml.SUCCESS
}

func (m *migDevice) GetAttributes() (nvml.DeviceAttributes, nvml.Return) {
	gi, ci, ret := m.find()
	if ret != nvml.SUCCESS {
		return nvml.DeviceAttributes{}, ret
	}
	p, _ := m.parent.model().ProfileByID(gi.ProfileID)
	return nvml.DeviceAttributes{
		MultiprocessorCount:       uint32(p.SMCount * ci.Slices / p.ComputeSlices),
		SharedCopyEngineCount:     uint32(p.CopyEngines),
		SharedDecoderCount:        uint32(p.Decoders),
		SharedEncoderCount:        uint32(p.Encoders),
		SharedJpegCount:           uint32(p.JPEGs),
		SharedOfaCount:            uint32(p.OFAs),
		GpuInstanceSliceCount:     uint32(p.ComputeSlices),
		ComputeInstanceSliceCount: uint32(ci.Slices),
		MemorySizeMB:              p.MemoryMiB,
	}, nvml.SUCCESS
}
