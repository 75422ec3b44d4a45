// Package nvmlib is Tessera's one narrow interface over NVML. Every other package talks to GPUs
// through Interface; only this package and the simulator (partitioning/sim) import go-nvml.
//
// The same adapter code serves real hardware (libnvidia-ml loaded with dlopen by go-nvml) and
// simulated nodes (partitioning/sim, which implements go-nvml's nvml.Interface), so everything the
// simulator exercises is the code that runs on a GPU node.
package nvmlib

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Interface is the NVML surface Tessera uses. GPU indices are NVML indices. Implementations are safe
// for concurrent use; calls on different GPUs do not serialise on each other.
type Interface interface {
	// System returns driver-wide facts.
	System() (SystemInfo, error)
	// DeviceCount returns the number of GPUs NVML sees.
	DeviceCount() (int, error)
	// GPU returns one GPU's identity and mode facts.
	GPU(index int) (GPU, error)
	// NVLinkPeers returns the indices of GPUs reachable from index over NVLink, sorted.
	NVLinkPeers(index int) ([]int, error)

	// MigProfiles returns the GPU-instance profiles the GPU offers with their possible placements,
	// sorted by profile ID. A GPU without MIG support returns ErrNotSupported.
	MigProfiles(index int) ([]MigProfile, error)
	// GpuInstances returns the GPU's GPU instances with their compute instances, sorted by ID.
	GpuInstances(index int) ([]GpuInstance, error)
	// MigDevices returns the GPU's MIG devices (one per compute instance), sorted by GI then CI.
	MigDevices(index int) ([]MigDevice, error)
	// SetMigMode asks for MIG mode on or off. The result says whether it took effect or is pending.
	SetMigMode(index int, enabled bool) (MigModeChange, error)
	// CreateGpuInstance creates a GPU instance of the profile at the placement and returns its ID.
	CreateGpuInstance(index int, profileID int, placement Placement) (int, error)
	// ComputeInstanceSizes lists the compute-instance sizes (in compute slices) a GPU instance offers;
	// NVML tells this only for an existing GPU instance.
	ComputeInstanceSizes(index, giID int) ([]int, error)
	// DestroyGpuInstance destroys a GPU instance; it fails with ErrInUse while it has compute instances.
	DestroyGpuInstance(index, giID int) error
	// CreateComputeInstance creates a compute instance of the given size (in compute slices) inside
	// a GPU instance and returns its ID.
	CreateComputeInstance(index, giID, slices int) (int, error)
	// DestroyComputeInstance destroys a compute instance; ErrInUse while processes run on it.
	DestroyComputeInstance(index, giID, ciID int) error

	// SetComputeMode sets the GPU's compute mode.
	SetComputeMode(index int, mode ComputeMode) error
	// Telemetry samples the GPU's live readings.
	Telemetry(index int) (Telemetry, error)
	// ECCErrors returns the GPU's ECC error counters. Volatile counters restart at zero when the GPU
	// is reset, which is how a reset is observed; aggregate counters persist.
	ECCErrors(index int) (ECCCounts, error)
	// Processes lists the compute processes running on the GPU (on any of its MIG devices).
	Processes(index int) ([]Process, error)
	// ProcessUtilization returns each process's latest SM utilization sample (none, without an
	// error, when NVML has no sample; ErrNotSupported in MIG mode, where NVML gives none).
	ProcessUtilization(index int) ([]ProcessUtilization, error)

	// WatchEvents delivers XID, ECC and GPU-lost events of every GPU to handle until ctx ends.
	// It returns nil when ctx ends and an error if events cannot be watched at all.
	WatchEvents(ctx context.Context, handle func(Event)) error

	// Shutdown releases NVML. No call may follow.
	Shutdown() error
}

// SystemInfo holds driver-wide facts.
type SystemInfo struct {
	DriverVersion string `json:"driverVersion"`
	// CUDADriverVersion as "major.minor", e.g. "12.8".
	CUDADriverVersion string `json:"cudaDriverVersion"`
	NVMLVersion       string `json:"nvmlVersion"`
}

// GPU holds what NVML tells about a whole GPU.
type GPU struct {
	Index             int         `json:"index"`
	Minor             int         `json:"minor"`
	UUID              string      `json:"uuid"`
	ProductName       string      `json:"productName"`
	Brand             string      `json:"brand"`
	Architecture      string      `json:"architecture"`
	ComputeCapability string      `json:"computeCapability"`
	MemoryMiB         uint64      `json:"memoryMiB"`
	PCIBusID          string      `json:"pciBusID"`
	PCIDeviceID       uint32      `json:"pciDeviceID"`
	NUMANode          int         `json:"numaNode"`
	MigCapable        bool        `json:"migCapable"`
	MigEnabled        bool        `json:"migEnabled"`
	MigPending        bool        `json:"migPendingEnabled"`
	ComputeMode       ComputeMode `json:"computeMode"`
}

// MigModePendingChange reports whether the GPU waits for a reset to switch MIG mode.
func (g GPU) MigModePendingChange() bool { return g.MigCapable && g.MigEnabled != g.MigPending }

// Placement is a position on the GPU in memory slices.
type Placement struct {
	Start int `json:"start"`
	Size  int `json:"size"`
}

// End is the first slice after the placement.
func (p Placement) End() int { return p.Start + p.Size }

// Overlaps reports whether two placements share a slice.
func (p Placement) Overlaps(o Placement) bool { return p.Start < o.End() && o.Start < p.End() }

func (p Placement) String() string { return fmt.Sprintf("%d:%d", p.Start, p.Size) }

// MigProfile is a GPU-instance profile with its placements.
type MigProfile struct {
	ID            int    `json:"id"`
	Name          string `json:"name"`
	ComputeSlices int    `json:"computeSlices"`
	MemoryMiB     uint64 `json:"memoryMiB"`
	SMCount       int    `json:"smCount"`
	CopyEngines   int    `json:"copyEngines"`
	Decoders      int    `json:"decoders"`
	Encoders      int    `json:"encoders"`
	JPEGs         int    `json:"jpegs"`
	OFAs          int    `json:"ofas"`
	InstanceCount int    `json:"instanceCount"`
	// Placements in the order NVML lists them; NVML lists them only while MIG mode is on.
	Placements []Placement `json:"placements"`
}

// GpuInstance is a GPU instance and its compute instances.
type GpuInstance struct {
	ID               int               `json:"id"`
	ProfileID        int               `json:"profileID"`
	Placement        Placement         `json:"placement"`
	ComputeInstances []ComputeInstance `json:"computeInstances"`
}

// ComputeInstance is a compute instance inside a GPU instance.
type ComputeInstance struct {
	ID        int       `json:"id"`
	Slices    int       `json:"slices"`
	Placement Placement `json:"placement"`
}

// MigDevice is a MIG device as CUDA sees it: one compute instance of one GPU instance.
type MigDevice struct {
	ParentIndex int    `json:"parentIndex"`
	ParentUUID  string `json:"parentUUID"`
	UUID        string `json:"uuid"`
	GI          int    `json:"gpuInstance"`
	CI          int    `json:"computeInstance"`
	// Profile is the MIG device profile, e.g. "3g.40gb", or "1c.3g.40gb" for a compute instance
	// smaller than its GPU instance.
	Profile string `json:"profile"`
	// GIProfile is the GPU-instance profile, e.g. "3g.40gb".
	GIProfile   string    `json:"giProfile"`
	GIProfileID int       `json:"giProfileID"`
	Placement   Placement `json:"placement"`
	MemoryMiB   uint64    `json:"memoryMiB"`
	SMCount     int       `json:"smCount"`
}

// MigModeChange is the outcome of SetMigMode.
type MigModeChange struct {
	Enabled bool `json:"enabled"`
	// Pending is true when the new mode waits for a GPU reset (or the end of the processes using the GPU).
	Pending bool `json:"pending"`
	// Reason explains a pending change.
	Reason string `json:"reason,omitempty"`
}

// ComputeMode is NVML's compute mode.
type ComputeMode string

// Compute modes.
const (
	ComputeModeDefault          ComputeMode = "Default"
	ComputeModeExclusiveProcess ComputeMode = "ExclusiveProcess"
	ComputeModeProhibited       ComputeMode = "Prohibited"
)

// Telemetry is a sample of a GPU's live readings.
type Telemetry struct {
	UtilizationGPU    int    `json:"utilizationGPU"`
	UtilizationMemory int    `json:"utilizationMemory"`
	MemoryUsedMiB     uint64 `json:"memoryUsedMiB"`
	MemoryTotalMiB    uint64 `json:"memoryTotalMiB"`
	PowerMilliwatts   int    `json:"powerMilliwatts"`
	TemperatureC      int    `json:"temperatureC"`
	SMClockMHz        int    `json:"smClockMHz"`
	// NoUtilization: NVML gives no utilization for this GPU (it does not in MIG mode); the
	// utilization fields are zero and mean nothing.
	NoUtilization bool `json:"noUtilization,omitempty"`
}

// ECCCounts are a GPU's ECC error counters.
type ECCCounts struct {
	VolatileCorrected    uint64 `json:"volatileCorrected"`
	VolatileUncorrected  uint64 `json:"volatileUncorrected"`
	AggregateUncorrected uint64 `json:"aggregateUncorrected"`
}

// Process is a compute process on a GPU.
type Process struct {
	PID           int    `json:"pid"`
	UsedMemoryMiB uint64 `json:"usedMemoryMiB"`
	// GI and CI are set (≥0) for a process on a MIG device, -1 otherwise.
	GI int `json:"gpuInstance"`
	CI int `json:"computeInstance"`
}

// ProcessUtilization is one process's share of a GPU over NVML's last sample period.
type ProcessUtilization struct {
	PID        int `json:"pid"`
	SMPercent  int `json:"smPercent"`
	MemPercent int `json:"memPercent"`
}

// EventType classifies a GPU event.
type EventType string

// Event types.
const (
	EventXID     EventType = "xid"
	EventECCDBE  EventType = "ecc-double-bit"
	EventECCSBE  EventType = "ecc-single-bit"
	EventGPULost EventType = "gpu-lost"
)

// Event is a health event on a GPU.
type Event struct {
	Time     time.Time `json:"time"`
	GPUIndex int       `json:"gpuIndex"`
	GPUUUID  string    `json:"gpuUUID"`
	Type     EventType `json:"type"`
	// XID is the XID code for EventXID (and 79 for a GPU that fell off the bus).
	XID uint64 `json:"xid,omitempty"`
	// GI and CI name the MIG device the event concerns, or -1 when it concerns the whole GPU.
	GI int `json:"gpuInstance"`
	CI int `json:"computeInstance"`
}

// Sentinel errors callers test with errors.Is. An *Error matches the sentinel of its NVML code.
var (
	ErrNotSupported          = errors.New("not supported")
	ErrInvalidArgument       = errors.New("invalid argument")
	ErrNotFound              = errors.New("not found")
	ErrInUse                 = errors.New("in use")
	ErrInsufficientResources = errors.New("insufficient resources")
	ErrGPULost               = errors.New("GPU is lost")
	ErrResetRequired         = errors.New("reset required")
	ErrNoPermission          = errors.New("no permission")
)
