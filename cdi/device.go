package cdi

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"tags.cncf.io/container-device-interface/pkg/parser"

	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// GPU identifies a whole GPU.
type GPU struct {
	// Index is the NVML index.
	Index int `json:"index"`
	// Minor is the device minor: the GPU's node is /dev/nvidia<Minor>.
	Minor int `json:"minor"`
	// UUID as NVML reports it (GPU-…).
	UUID string `json:"uuid"`
}

// MIG identifies a MIG device (one compute instance of one GPU instance) of a GPU.
type MIG struct {
	GI   int    `json:"gpuInstance"`
	CI   int    `json:"computeInstance"`
	UUID string `json:"uuid"`
}

// TimeSlice makes a device a time-sliced replica: the container gets the same GPU or MIG device as
// every other replica of it, and TESSERA_REPLICA names the replica.
type TimeSlice struct {
	Replica int `json:"replica"`
}

// MPS makes a device a fraction of a GPU or MIG device shared through an MPS control daemon.
type MPS struct {
	Replica int `json:"replica"`
	// PipeDir is the host directory holding the daemon's pipes (its CUDA_MPS_PIPE_DIRECTORY). It is
	// mounted read-only at MPSPipeDir in the container (partitioning/mps: Daemon.ClientMounts).
	PipeDir string `json:"pipeDir"`
	// ShmDir, if set, is the host directory (a tmpfs) the daemon uses as /dev/shm; it is mounted at
	// /dev/shm in the container, as MPS clients and server exchange memory through it.
	ShmDir string `json:"shmDir,omitempty"`
	// ActiveThreadPercentage, if above 0, sets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE.
	ActiveThreadPercentage int `json:"activeThreadPercentage,omitempty"`
	// PinnedMemoryLimitMiB, if above 0, sets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for the container's
	// (only) CUDA device: "0=<N>M".
	PinnedMemoryLimitMiB uint64 `json:"pinnedMemoryLimitMiB,omitempty"`
}

var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// MPSPipeDir is where MPS fractions see the daemon's pipe directory (CUDA's default one, so that
// clients that ignore CUDA_MPS_PIPE_DIRECTORY find it too).
const MPSPipeDir = "/tmp/nvidia-mps"

// ReplicaEnv names, in a container that got a time-sliced replica or an MPS fraction, the replica
// (its CDI device name, e.g. GPU-…::2). A container given several replicas sees the last one.
const ReplicaEnv = "TESSERA_REPLICA"

// Device is what a container can be given: a whole GPU or a MIG device, either as it is or as one
// time-sliced replica or MPS fraction of it.
type Device struct {
	GPU GPU `json:"gpu"`
	// MIG is nil for the whole GPU.
	MIG *MIG `json:"mig,omitempty"`
	// At most one of TimeSlice and MPS is set.
	TimeSlice *TimeSlice `json:"timeSlice,omitempty"`
	MPS       *MPS       `json:"mps,omitempty"`
	// Env is extra environment (NAME=value) the container gets with this device, after the
	// device's own; for information (a DRA claim's share of a GPU), not part of the device's name.
	Env []string `json:"env,omitempty"`
}

// WithEnv returns d with extra environment variables (NAME=value) for its container.
func (d Device) WithEnv(env ...string) Device {
	d.Env = append(slices.Clone(d.Env), env...)
	return d
}

// WholeGPU is the device for a whole GPU.
func WholeGPU(g nvmlib.GPU) Device {
	return Device{GPU: GPU{Index: g.Index, Minor: g.Minor, UUID: g.UUID}}
}

// MIGDevice is the device for a MIG device of GPU g.
func MIGDevice(g nvmlib.GPU, m nvmlib.MigDevice) Device {
	return Device{
		GPU: GPU{Index: g.Index, Minor: g.Minor, UUID: g.UUID},
		MIG: &MIG{GI: m.GI, CI: m.CI, UUID: m.UUID},
	}
}

// Replica returns time-sliced replica i of d (d itself must not be shared).
func (d Device) Replica(i int) Device {
	d.TimeSlice, d.MPS = &TimeSlice{Replica: i}, nil
	return d
}

// MPSFraction returns MPS fraction m.Replica of d (d itself must not be shared).
func (d Device) MPSFraction(m MPS) Device {
	d.MPS, d.TimeSlice = &m, nil
	return d
}

// FromSnapshot lists the devices a node spec defines for a snapshot: every GPU as a whole, and every
// MIG device of GPUs in MIG mode, ordered by GPU index, then GPU and compute instance. A GPU whose
// UUID is not known (it could not be read even once) is left out.
func FromSnapshot(s *inventory.Snapshot) []Device {
	var out []Device
	for _, g := range s.GPUs {
		if g.UUID == "" {
			continue
		}
		out = append(out, WholeGPU(g.GPU))
		for _, m := range g.MigDevices {
			out = append(out, MIGDevice(g.GPU, m))
		}
	}
	SortDevices(out)
	return out
}

// SortDevices orders devices by GPU index, whole GPU before its MIG devices, MIG devices by GPU then
// compute instance, unshared before time-sliced before MPS, replicas by number.
func SortDevices(ds []Device) {
	slices.SortStableFunc(ds, func(a, b Device) int {
		return slices.Compare(a.sortKey(), b.sortKey())
	})
}

func (d Device) sortKey() []int {
	gi, ci := -1, -1
	if d.MIG != nil {
		gi, ci = d.MIG.GI, d.MIG.CI
	}
	share, rep := 0, 0
	switch {
	case d.TimeSlice != nil:
		share, rep = 1, d.TimeSlice.Replica
	case d.MPS != nil:
		share, rep = 2, d.MPS.Replica
	}
	return []int{d.GPU.Index, gi, ci, share, rep}
}

// UUID is the UUID of the GPU or MIG device the container gets.
func (d Device) UUID() string {
	if d.MIG != nil {
		return d.MIG.UUID
	}
	return d.GPU.UUID
}

// Name is the device's canonical CDI device name (unqualified): the UUID for whole GPUs and MIG
// devices, <uuid>::<replica> for time-sliced replicas and <uuid>::mps-<replica> for MPS fractions.
func (d Device) Name() string { return d.Names()[0] }

// Names are every CDI device name (unqualified) a node spec defines for the device, canonical first:
//
//	whole GPU              GPU-<uuid>, <index>
//	MIG device             MIG-<uuid>, <index>:<gi>:<ci>
//	time-sliced replica    <uuid>::<replica>
//	MPS fraction           <uuid>::mps-<replica>
func (d Device) Names() []string {
	switch {
	case d.TimeSlice != nil:
		return []string{d.UUID() + "::" + strconv.Itoa(d.TimeSlice.Replica)}
	case d.MPS != nil:
		return []string{d.UUID() + "::mps-" + strconv.Itoa(d.MPS.Replica)}
	case d.MIG != nil:
		return []string{d.MIG.UUID, fmt.Sprintf("%d:%d:%d", d.GPU.Index, d.MIG.GI, d.MIG.CI)}
	default:
		return []string{d.GPU.UUID, strconv.Itoa(d.GPU.Index)}
	}
}

// String describes the device for messages: "GPU 0", "MIG device 0:1:0", "replica 2 of GPU 0", ….
func (d Device) String() string {
	base := fmt.Sprintf("GPU %d", d.GPU.Index)
	if d.MIG != nil {
		base = fmt.Sprintf("MIG device %d:%d:%d", d.GPU.Index, d.MIG.GI, d.MIG.CI)
	}
	switch {
	case d.TimeSlice != nil:
		return fmt.Sprintf("time-sliced replica %d of %s", d.TimeSlice.Replica, base)
	case d.MPS != nil:
		return fmt.Sprintf("MPS fraction %d of %s", d.MPS.Replica, base)
	}
	return base
}

// Validate checks that the device is fully described and that its names are valid CDI device names.
func (d Device) Validate() error {
	var errs []error
	if d.GPU.Index < 0 || d.GPU.Minor < 0 {
		errs = append(errs, fmt.Errorf("negative index %d or minor %d", d.GPU.Index, d.GPU.Minor))
	}
	if d.GPU.UUID == "" {
		errs = append(errs, errors.New("no GPU UUID"))
	}
	if d.MIG != nil && (d.MIG.UUID == "" || d.MIG.GI < 0 || d.MIG.CI < 0) {
		errs = append(errs, fmt.Errorf("MIG device needs a UUID and non-negative instance IDs (gi %d, ci %d)", d.MIG.GI, d.MIG.CI))
	}
	if d.TimeSlice != nil && d.MPS != nil {
		errs = append(errs, errors.New("both time-sliced and MPS"))
	}
	if d.TimeSlice != nil && d.TimeSlice.Replica < 0 {
		errs = append(errs, fmt.Errorf("negative replica %d", d.TimeSlice.Replica))
	}
	if m := d.MPS; m != nil {
		if m.Replica < 0 {
			errs = append(errs, fmt.Errorf("negative replica %d", m.Replica))
		}
		if !filepath.IsAbs(m.PipeDir) {
			errs = append(errs, fmt.Errorf("MPS pipe directory %q is not an absolute path", m.PipeDir))
		}
		if m.ShmDir != "" && !filepath.IsAbs(m.ShmDir) {
			errs = append(errs, fmt.Errorf("MPS shm directory %q is not an absolute path", m.ShmDir))
		}
		if m.ActiveThreadPercentage < 0 || m.ActiveThreadPercentage > 100 {
			errs = append(errs, fmt.Errorf("MPS active thread percentage %d is outside 0..100", m.ActiveThreadPercentage))
		}
	}
	for _, kv := range d.Env {
		if name, _, ok := strings.Cut(kv, "="); !ok || !envNameRE.MatchString(name) {
			errs = append(errs, fmt.Errorf("environment entry %q is not NAME=value with a valid variable name", kv))
		}
	}
	if len(errs) == 0 {
		for _, n := range d.Names() {
			if err := parser.ValidateDeviceName(n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s: %w", d, errors.Join(errs...))
	}
	return nil
}

// ClaimDeviceName is the CDI device name (unqualified) a claim spec gives a device: the claim UID,
// an underscore, and the device's canonical name. Node-spec names never contain an underscore, so
// claim devices never collide with node-spec devices (the CDI cache would drop both).
func ClaimDeviceName(claimUID string, d Device) string {
	return claimUID + "_" + d.Name()
}

// validClaimUID reports whether uid can be part of file and device names: a Kubernetes UID is
// lower-case hex and dashes; we accept letters, digits and dashes, starting and ending alphanumeric.
func validClaimUID(uid string) error {
	if uid == "" {
		return errors.New("empty claim UID")
	}
	if len(uid) > 128 {
		return fmt.Errorf("claim UID %q is longer than 128 characters", uid)
	}
	for i, r := range uid {
		alnum := (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9')
		if !alnum && (r != '-' || i == 0 || i == len(uid)-1) {
			return fmt.Errorf("claim UID %q: only letters, digits and inner dashes are allowed", uid)
		}
	}
	return nil
}
