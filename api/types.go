// Package api holds Tessera's configuration types and everything needed to trust them: the
// SharingProfile (how each GPU of a node is shared, and by which front end), its conversion from
// NVIDIA's device-plugin config, Resolve (one owner and one mode per GPU), and the GPUConfig
// parameters that ResourceClaims pass to the DRA driver. It has no dependency on NVML, so the
// admission webhook and the CLI can use it anywhere.
//
// Every decoder here is strict (unknown fields, wrong types and duplicate keys are errors) and
// every error names the field path and the fix. Nothing here panics on any input.
package api

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Group and version of the SharingProfile.
const (
	Group              = "tessera.dev"
	Version            = "v1alpha1"
	APIVersion         = Group + "/" + Version
	KindSharingProfile = "SharingProfile"
)

// Labels that select a node's profile, and the label that marks a ConfigMap of profiles.
const (
	// NodeLabelProfile selects a named profile from the profile ConfigMap.
	NodeLabelProfile = "tessera.dev/sharing-profile"
	// NodeLabelNVIDIAConfig is NVIDIA's label for the same purpose, honoured when ours is absent.
	NodeLabelNVIDIAConfig = "nvidia.com/device-plugin.config"
	// ConfigMapLabel marks a ConfigMap whose keys are profiles; the webhook validates those.
	ConfigMapLabel = "tessera.dev/sharing-profiles"
)

// Owner is the front end that serves a GPU.
type Owner string

// Owners.
const (
	OwnerDevicePlugin Owner = "device-plugin"
	OwnerDRA          Owner = "dra"
	OwnerNone         Owner = "none"
)

// Mode is how a GPU is shared.
type Mode string

// Modes.
const (
	// ModeWhole hands out the GPU to one container at a time.
	ModeWhole Mode = "whole"
	// ModeMIGStatic partitions the GPU into a fixed MIG layout.
	ModeMIGStatic Mode = "mig-static"
	// ModeMIGDynamic lets the DRA driver create MIG devices as claims ask for them.
	ModeMIGDynamic Mode = "mig-dynamic"
	// ModeTimeSliced lets several containers share the GPU with CUDA time-slicing.
	ModeTimeSliced Mode = "time-sliced"
	// ModeMPS lets several containers share the GPU through an MPS control daemon, with limits.
	ModeMPS Mode = "mps"
	// ModeShared publishes the GPU to DRA as a device with consumable capacity (memory), taken by
	// many claims at once.
	ModeShared Mode = "shared"
)

// Modes lists every mode.
var Modes = []Mode{ModeWhole, ModeMIGStatic, ModeMIGDynamic, ModeTimeSliced, ModeMPS, ModeShared}

// TimeSliceInterval is the length of a time slice, as nvidia-smi's compute-policy names them.
type TimeSliceInterval string

// Intervals.
const (
	IntervalDefault TimeSliceInterval = "Default"
	IntervalShort   TimeSliceInterval = "Short"
	IntervalMedium  TimeSliceInterval = "Medium"
	IntervalLong    TimeSliceInterval = "Long"
)

// Intervals lists every interval.
var Intervals = []TimeSliceInterval{IntervalDefault, IntervalShort, IntervalMedium, IntervalLong}

// SharingProfile says, for every GPU of a node, which front end owns it and how it is shared.
type SharingProfile struct {
	metav1.TypeMeta `json:",inline"`
	Metadata        metav1.ObjectMeta  `json:"metadata,omitempty"`
	Spec            SharingProfileSpec `json:"spec"`
}

// SharingProfileSpec is the content of a profile.
type SharingProfileSpec struct {
	// DevicePlugin holds settings of the device plugin as a whole (NVIDIA's `flags`).
	DevicePlugin *DevicePluginSettings `json:"devicePlugin,omitempty"`
	// Health tunes which GPU events make a device unhealthy.
	Health *HealthSettings `json:"health,omitempty"`
	// MIGLayouts names MIG layouts that mig-static rules refer to: layout name → MIG profile → count.
	MIGLayouts map[string]MIGLayout `json:"migLayouts,omitempty"`
	// Defaults apply to every GPU no rule selects. Without defaults such a GPU is owned by the
	// device plugin and handed out whole.
	Defaults *Sharing `json:"defaults,omitempty"`
	// Rules map GPUs to an owner and a mode. A GPU selected by two rules is an error.
	Rules []Rule `json:"rules,omitempty"`
}

// MIGLayout is a count of MIG devices per MIG profile, e.g. {"3g.40gb": 2}.
type MIGLayout map[string]int

// Rule selects GPUs and says how they are shared.
type Rule struct {
	// Name appears in errors and in `tessera profile validate`; optional.
	Name string `json:"name,omitempty"`
	// Selector picks the GPUs. It must not be empty.
	Selector GPUSelector `json:"selector"`
	Sharing  `json:",inline"`
}

// GPUSelector picks GPUs. Each field that is set must match (AND); inside a list, any entry may
// match (OR).
type GPUSelector struct {
	// Indices are NVML GPU indices.
	Indices []int `json:"indices,omitempty"`
	// UUIDs are GPU UUIDs (GPU-…).
	UUIDs []string `json:"uuids,omitempty"`
	// ProductNames match NVML product names; `*` matches any run of characters (e.g. "*H100*").
	ProductNames []string `json:"productNames,omitempty"`
	// MigCapable matches GPUs that can (true) or cannot (false) run MIG.
	MigCapable *bool `json:"migCapable,omitempty"`
	// MigEnabled matches GPUs whose MIG mode is currently on (true) or off (false).
	MigEnabled *bool `json:"migEnabled,omitempty"`
}

// Sharing is one owner, one mode and the settings of that mode.
type Sharing struct {
	Owner Owner `json:"owner,omitempty"`
	Mode  Mode  `json:"mode,omitempty"`
	// Modes (DRA only, instead of Mode) offers the GPU in several modes at once — any of whole,
	// time-sliced and shared — as sibling devices that consume one counter, so the scheduler gives
	// the GPU one mode at a time: whichever the first claim on it asks for.
	Modes []Mode `json:"modes,omitempty"`
	// ResourceName overrides the device plugin's extended resource name for whole, time-sliced and
	// mps GPUs (NVIDIA's `rename`). Device plugin only.
	ResourceName string `json:"resourceName,omitempty"`

	TimeSlicing *TimeSlicingSettings `json:"timeSlicing,omitempty"`
	MPS         *MPSSettings         `json:"mps,omitempty"`
	MIG         *MIGSettings         `json:"mig,omitempty"`
	MIGDynamic  *MIGDynamicSettings  `json:"migDynamic,omitempty"`
	Shared      *SharedSettings      `json:"shared,omitempty"`
}

// TimeSlicingSettings configure mode time-sliced.
type TimeSlicingSettings struct {
	// Replicas is how many containers may share the GPU (device plugin: required, at least 2;
	// DRA: optional, 0 means no limit).
	Replicas int `json:"replicas,omitempty"`
	// Interval is the time-slice length; it applies to the whole GPU.
	Interval TimeSliceInterval `json:"interval,omitempty"`
	// FailRequestsGreaterThanOne refuses a container that asks for more than one replica.
	FailRequestsGreaterThanOne bool `json:"failRequestsGreaterThanOne,omitempty"`
}

// MPSSettings configure mode mps. Give either Replicas (equal clients) or Shares (unequal clients).
type MPSSettings struct {
	// Replicas is the number of equal MPS clients, 2 to MaxMPSClients.
	Replicas int `json:"replicas,omitempty"`
	// Shares are unequal clients, each with its own thread and memory limit.
	Shares []MPSShare `json:"shares,omitempty"`
	// ActiveThreadPercentage caps each client's SMs, 1–100. With Replicas it defaults to
	// 100/replicas.
	ActiveThreadPercentage *int `json:"activeThreadPercentage,omitempty"`
	// PinnedMemoryLimit caps each client's device memory. With Replicas it defaults to an equal
	// split of the GPU's memory.
	PinnedMemoryLimit *resource.Quantity `json:"pinnedMemoryLimit,omitempty"`
	// FailRequestsGreaterThanOne refuses a container that asks for more than one client. It
	// defaults to true, as in NVIDIA's plugin.
	FailRequestsGreaterThanOne *bool `json:"failRequestsGreaterThanOne,omitempty"`
}

// MPSShare is one MPS client slot of an unequal split.
type MPSShare struct {
	// Count is how many slots of this size; default 1.
	Count int `json:"count,omitempty"`
	// ActiveThreadPercentage caps the slot's SMs, 1–100.
	ActiveThreadPercentage int `json:"activeThreadPercentage"`
	// PinnedMemoryLimit caps the slot's device memory.
	PinnedMemoryLimit *resource.Quantity `json:"pinnedMemoryLimit,omitempty"`
}

// MaxMPSClients is the most MPS clients one GPU serves (Volta and later).
const MaxMPSClients = 48

// MaxReplicas bounds time-slicing replicas per GPU (device IDs are advertised one by one).
const MaxReplicas = 256

// MIGSettings configure mode mig-static.
type MIGSettings struct {
	// Layout names an entry of spec.migLayouts, or is "all-<profile>" (as many of one profile as fit),
	// or "existing" (keep the MIG devices the GPU has; Tessera does not repartition it).
	Layout string `json:"layout"`
	// TimeSlicing replicates MIG devices of a profile (device plugin only). A time-slice interval
	// does not apply: it has no effect on MIG devices.
	TimeSlicing []MIGReplicas `json:"timeSlicing,omitempty"`
}

// LayoutExisting keeps whatever MIG devices the GPU has.
const LayoutExisting = "existing"

// MIGReplicas replicates the MIG devices of one profile.
type MIGReplicas struct {
	Profile  string `json:"profile"`
	Replicas int    `json:"replicas"`
	// ResourceName overrides the resource name of the replicas.
	ResourceName               string `json:"resourceName,omitempty"`
	FailRequestsGreaterThanOne bool   `json:"failRequestsGreaterThanOne,omitempty"`
}

// MIGDynamicSettings configure mode mig-dynamic (DRA only).
type MIGDynamicSettings struct {
	// Profiles limits the MIG profiles claims may ask for; empty means every profile the GPU offers.
	Profiles []string `json:"profiles,omitempty"`
}

// SharedSettings configure mode shared (DRA only): the GPU is one device with consumable memory
// capacity that many claims take parts of.
type SharedSettings struct {
	// MaxClients bounds the claims sharing the GPU; 0 means no bound (MPS: at most MaxMPSClients).
	MaxClients int `json:"maxClients,omitempty"`
	// MemoryStep is the granularity of memory requests; default 1Gi.
	MemoryStep *resource.Quantity `json:"memoryStep,omitempty"`
	// MemoryReserve is kept back from claims: the device's memory capacity is what NVML reports
	// minus this (default 0).
	MemoryReserve *resource.Quantity `json:"memoryReserve,omitempty"`
	// DefaultMemory is what a claim that asks for no memory consumes; a multiple of MemoryStep, no
	// more than the usable memory (default: one MemoryStep).
	DefaultMemory *resource.Quantity `json:"defaultMemory,omitempty"`
	// DefaultComputePercent is the share of the GPU's compute a claim that asks for none consumes,
	// 1–100 (default 100/maxClients when maxClients is set, else 10).
	DefaultComputePercent int `json:"defaultComputePercent,omitempty"`
	// Isolation is how claims share compute: time-sliced (default) or mps (limits enforced).
	Isolation Mode `json:"isolation,omitempty"`
}

// DefaultSharedMemoryStep is the memory granularity of a shared GPU when the profile sets none.
const DefaultSharedMemoryStep = "1Gi"

// DefaultSharedComputePercent is the compute a claim on a shared GPU without maxClients consumes
// when it asks for none.
const DefaultSharedComputePercent = 10

// DevicePluginSettings are settings of the device plugin as a whole.
type DevicePluginSettings struct {
	// MIGStrategy is none, single or mixed (default mixed when any device-plugin GPU uses MIG,
	// else none).
	MIGStrategy string `json:"migStrategy,omitempty"`
	// DeviceIDStrategy is uuid (default) or index.
	DeviceIDStrategy string `json:"deviceIDStrategy,omitempty"`
	// DeviceListStrategy lists how devices reach containers: envvar, volume-mounts,
	// cdi-annotations, cdi-cri (default cdi-cri).
	DeviceListStrategy []string `json:"deviceListStrategy,omitempty"`
	// FailOnInitError stops the plugin when NVML cannot be loaded (default true).
	FailOnInitError *bool `json:"failOnInitError,omitempty"`
	// PassDeviceSpecs adds /dev/nvidia* device specs to Allocate responses.
	PassDeviceSpecs bool `json:"passDeviceSpecs,omitempty"`
	// CDIAnnotationPrefix is used with deviceListStrategy cdi-annotations.
	CDIAnnotationPrefix string `json:"cdiAnnotationPrefix,omitempty"`
	// MPSRoot is where MPS pipes and logs live on the host.
	MPSRoot string `json:"mpsRoot,omitempty"`
	// Resources rename whole GPUs and MIG devices by product-name pattern (NVIDIA's `resources`).
	Resources *ResourceNaming `json:"resources,omitempty"`
}

// ResourceNaming renames resources by pattern.
type ResourceNaming struct {
	GPUs []ResourcePattern `json:"gpus,omitempty"`
	MIG  []ResourcePattern `json:"mig,omitempty"`
}

// ResourcePattern maps GPUs (by product name) or MIG devices (by profile) matching Pattern (`*`
// wildcards) to a resource name.
type ResourcePattern struct {
	Pattern string `json:"pattern"`
	Name    string `json:"name"`
}

// HealthSettings tune health checking.
type HealthSettings struct {
	// Disabled turns health checks off.
	Disabled bool `json:"disabled,omitempty"`
	// IgnoredXIDs never make a device unhealthy (added to Tessera's built-in list of
	// application-caused XIDs).
	IgnoredXIDs []uint64 `json:"ignoredXIDs,omitempty"`
	// CriticalXIDs, when set, are the only XIDs that make a device unhealthy.
	CriticalXIDs []uint64 `json:"criticalXIDs,omitempty"`
	// NoExecute (DRA driver only) taints an unhealthy device NoExecute instead of NoSchedule, so
	// the cluster evicts the pods using it. Off by default: eviction is the admin's choice.
	NoExecute bool `json:"noExecute,omitempty"`
}

// Device-list and ID strategies.
var (
	MIGStrategies        = []string{"none", "single", "mixed"}
	DeviceIDStrategies   = []string{"uuid", "index"}
	DeviceListStrategies = []string{"envvar", "volume-mounts", "cdi-annotations", "cdi-cri"}
)
