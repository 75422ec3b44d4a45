package api

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The DRA driver's name, and the group of the opaque parameters claims pass to it.
const (
	DriverName          = "gpu.tessera.dev"
	ConfigGroup         = "gpu.tessera.dev"
	ConfigVersion       = "v1alpha1"
	ConfigAPIVersion    = ConfigGroup + "/" + ConfigVersion
	KindGPUConfig       = "GPUConfig"
	MaxConfigParameters = 64 << 10
)

// SharingStrategy is how the containers of one claim (or the claims of a shared GPU) share it.
type SharingStrategy string

// Strategies.
const (
	StrategyTimeSlicing SharingStrategy = "TimeSlicing"
	StrategyMPS         SharingStrategy = "MPS"
)

// GPUConfig is the opaque configuration a ResourceClaim passes to driver gpu.tessera.dev, in
// spec.devices.config[].opaque.parameters:
//
//	apiVersion: gpu.tessera.dev/v1alpha1
//	kind: GPUConfig
//	sharing:
//	  strategy: MPS
//	  mps: {defaultActiveThreadPercentage: 50, defaultPinnedDeviceMemoryLimit: 10Gi}
//
// The admission webhook validates it when the claim (or template) is created, so a bad claim never
// reaches a node.
type GPUConfig struct {
	metav1.TypeMeta `json:",inline"`
	// Sharing says how the allocated GPUs are shared; nil leaves them as the profile set them.
	Sharing *GPUSharing `json:"sharing,omitempty"`
}

// GPUSharing is a claim's sharing strategy.
type GPUSharing struct {
	Strategy    SharingStrategy    `json:"strategy"`
	TimeSlicing *TimeSlicingConfig `json:"timeSlicing,omitempty"`
	MPS         *MPSConfig         `json:"mps,omitempty"`
}

// TimeSlicingConfig sets the time-slice interval of the claim's GPUs.
type TimeSlicingConfig struct {
	Interval TimeSliceInterval `json:"interval,omitempty"`
}

// MPSConfig sets the limits of the claim's MPS clients.
type MPSConfig struct {
	// DefaultActiveThreadPercentage caps each client's SMs, 1–100.
	DefaultActiveThreadPercentage *int `json:"defaultActiveThreadPercentage,omitempty"`
	// DefaultPinnedDeviceMemoryLimit caps each client's device memory on every GPU.
	DefaultPinnedDeviceMemoryLimit *resource.Quantity `json:"defaultPinnedDeviceMemoryLimit,omitempty"`
	// DefaultPerDevicePinnedMemoryLimit overrides the limit per GPU, keyed by the GPU's index
	// ("0") or UUID ("GPU-…").
	DefaultPerDevicePinnedMemoryLimit map[string]resource.Quantity `json:"defaultPerDevicePinnedMemoryLimit,omitempty"`
}

// ParseGPUConfig strictly decodes and validates a claim's opaque parameters (JSON or YAML).
func ParseGPUConfig(data []byte) (*GPUConfig, error) {
	if len(data) > MaxConfigParameters {
		return nil, ErrorList{{Message: fmt.Sprintf("parameters are %d bytes, more than %d", len(data), MaxConfigParameters)}}
	}
	cfg := &GPUConfig{}
	if errs := decodeStrict(data, cfg); errs != nil {
		return nil, errs
	}
	if errs := cfg.Validate(); errs != nil {
		return nil, errs
	}
	return cfg, nil
}

// Validate checks a GPUConfig.
func (g *GPUConfig) Validate() ErrorList {
	c := &collector{}
	if g.APIVersion != ConfigAPIVersion {
		c.errf("apiVersion", "set apiVersion: "+ConfigAPIVersion, "is %q, want %q", g.APIVersion, ConfigAPIVersion)
	}
	if g.Kind != KindGPUConfig {
		c.errf("kind", "set kind: "+KindGPUConfig, "is %q, want %q", g.Kind, KindGPUConfig)
	}
	s := g.Sharing
	if s == nil {
		return c.errs
	}
	switch s.Strategy {
	case StrategyTimeSlicing:
		if s.MPS != nil {
			c.errf("sharing.mps", "remove sharing.mps or set strategy: MPS", "strategy TimeSlicing does not use mps settings: MPS needs the GPU in EXCLUSIVE_PROCESS compute mode, time-slicing needs DEFAULT")
		}
		if t := s.TimeSlicing; t != nil && t.Interval != "" && !slices.Contains(Intervals, t.Interval) {
			c.errf("sharing.timeSlicing.interval", "use Default, Short, Medium or Long", "unknown interval %q", t.Interval)
		}
	case StrategyMPS:
		if s.TimeSlicing != nil {
			c.errf("sharing.timeSlicing", "remove sharing.timeSlicing or set strategy: TimeSlicing", "strategy MPS does not use timeSlicing settings: MPS needs the GPU in EXCLUSIVE_PROCESS compute mode, time-slicing needs DEFAULT")
		}
		if m := s.MPS; m != nil {
			if p := m.DefaultActiveThreadPercentage; p != nil && (*p < 1 || *p > 100) {
				c.errf("sharing.mps.defaultActiveThreadPercentage", "use 1 to 100", "is %d", *p)
			}
			positive(c, m.DefaultPinnedDeviceMemoryLimit, "sharing.mps.defaultPinnedDeviceMemoryLimit")
			for _, k := range sortedKeys(m.DefaultPerDevicePinnedMemoryLimit) {
				kp := key("sharing.mps.defaultPerDevicePinnedMemoryLimit", k)
				if _, err := strconv.ParseUint(k, 10, 16); err != nil && !(strings.HasPrefix(k, "GPU-") && len(k) > 8) {
					c.errf(kp, "key the limit by GPU index (\"0\") or GPU UUID (\"GPU-…\")", "%q is neither a GPU index nor a GPU UUID", truncate(k, 60))
				}
				q := m.DefaultPerDevicePinnedMemoryLimit[k]
				positive(c, &q, kp)
			}
		}
	case "":
		c.errf("sharing.strategy", "set strategy: TimeSlicing or MPS", "strategy is required")
	default:
		c.errf("sharing.strategy", "use TimeSlicing or MPS", "unknown strategy %q", s.Strategy)
	}
	return c.errs
}
