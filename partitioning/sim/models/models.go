// Package models holds the hardware facts of the GPU models a simulated node can have: identity, memory
// as NVML reports it, and each MIG-capable model's GPU-instance profiles and placements, transcribed from
// NVIDIA's published tables into data files (data/*.yaml). The data is kept apart from any code that
// plans MIG layouts so that tests of a planner are checked against the tables, not against themselves.
package models

// Model describes one GPU model as NVML reports it.
type Model struct {
	// ID is the short, stable name used in node files, e.g. "a100-sxm4-40gb".
	ID string `json:"id"`
	// Name is the product name nvmlDeviceGetName returns, e.g. "NVIDIA A100-SXM4-40GB".
	Name string `json:"name"`
	// Architecture: kepler, maxwell, pascal, volta, turing, ampere, ada, hopper, blackwell.
	Architecture string `json:"architecture"`
	// Brand as NVML names it: nvidia, tesla, quadro, geforce, …
	Brand string `json:"brand"`
	// ComputeCapability as "major.minor", e.g. "8.0".
	ComputeCapability string `json:"computeCapability"`
	// MemoryMiB is the total framebuffer NVML reports (an H100 80GB reports 81559, not 81920).
	MemoryMiB uint64 `json:"memoryMiB"`
	// PCIDeviceID is NVML's pciDeviceId: device ID in the high 16 bits, vendor 0x10DE in the low.
	PCIDeviceID uint32 `json:"pciDeviceID"`
	// SMCount is the number of streaming multiprocessors of the whole GPU.
	SMCount int `json:"smCount"`
	// MaxSMClockMHz is the maximum SM clock.
	MaxSMClockMHz int `json:"maxSMClockMHz"`
	// PowerLimitW is the default power limit; IdlePowerW what an idle GPU draws.
	PowerLimitW int `json:"powerLimitW"`
	IdlePowerW  int `json:"idlePowerW"`
	// NVLinks is the number of NVLink links (0 for none).
	NVLinks int `json:"nvlinks"`
	// MIG is nil for GPUs that are not MIG-capable.
	MIG *MIG `json:"mig,omitempty"`
	// Sources names the published documents the numbers were transcribed from.
	Sources []string `json:"sources"`
}

// MIG describes a MIG-capable model's partitioning.
type MIG struct {
	// MemorySlices is the number of memory slices (placement positions), 8 on A100/H100/H200/B200, 4 on A30.
	MemorySlices int `json:"memorySlices"`
	// ComputeSlices is the number of compute slices (GPCs usable by MIG), 7 on A100/H100, 4 on A30.
	ComputeSlices int `json:"computeSlices"`
	// Profiles lists every GPU-instance profile the model offers.
	Profiles []GIProfile `json:"profiles"`
}

// GIProfile is one GPU-instance profile with its possible placements.
type GIProfile struct {
	// Name as nvidia-smi prints it, e.g. "1g.5gb", "1g.5gb+me", "1g.10gb".
	Name string `json:"name"`
	// ProfileID is NVML's GPU_INSTANCE_PROFILE_* value (0=1_SLICE, 1=2_SLICE, 2=3_SLICE, 3=4_SLICE,
	// 4=7_SLICE, 5=8_SLICE, 6=6_SLICE, 7=1_SLICE_REV1 (+me), 8=2_SLICE_REV1, 9=1_SLICE_REV2, …).
	ProfileID int `json:"profileID"`
	// ComputeSlices is the profile's "g" count (NVML sliceCount).
	ComputeSlices int `json:"computeSlices"`
	// MemorySlices is the placement size in memory slices.
	MemorySlices int `json:"memorySlices"`
	// MemoryMiB is the instance's memory as NVML reports it (memorySizeMB).
	MemoryMiB uint64 `json:"memoryMiB"`
	// SMCount is the instance's multiprocessor count.
	SMCount int `json:"smCount"`
	// Engines.
	CopyEngines int `json:"copyEngines"`
	Decoders    int `json:"decoders"`
	Encoders    int `json:"encoders"`
	JPEGs       int `json:"jpegs"`
	OFAs        int `json:"ofas"`
	// InstanceCount is the maximum number of instances of this profile on one GPU.
	InstanceCount int `json:"instanceCount"`
	// Placements are the allowed start positions (in memory slices); each spans MemorySlices.
	Placements []int `json:"placements"`
	// ComputeInstanceSlices are the compute-instance sizes a GPU instance of this profile offers,
	// e.g. [1, 2, 3] for a 3g profile. The largest equals ComputeSlices.
	ComputeInstanceSlices []int `json:"computeInstanceSlices"`
}
