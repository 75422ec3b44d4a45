package dra

import (
	"fmt"
	"strings"

	resourceapi "k8s.io/api/resource/v1"

	"github.com/tessera-gpu/tessera/api"
)

// configFor returns the GPUConfig that applies to an allocation result: the last opaque parameters
// for our driver whose requests include the result's request (a config naming "req" applies to its
// subrequests "req/sub" too), class configs before claim configs as the allocation lists them. Nil
// when none applies. Parameters are parsed and validated again here, whatever the webhook did.
func configFor(alloc *resourceapi.AllocationResult, request string) (*api.GPUConfig, error) {
	var chosen *resourceapi.DeviceAllocationConfiguration
	// The API lists class configs first; keep that precedence even if a list comes mixed.
	for _, src := range []resourceapi.AllocationConfigSource{resourceapi.AllocationConfigSourceClass, resourceapi.AllocationConfigSourceClaim} {
		for i := range alloc.Devices.Config {
			c := &alloc.Devices.Config[i]
			if c.Source != src || c.Opaque == nil || c.Opaque.Driver != DriverName || !appliesTo(c.Requests, request) {
				continue
			}
			chosen = c
		}
	}
	if chosen == nil {
		return nil, nil
	}
	if len(chosen.Opaque.Parameters.Raw) == 0 {
		return nil, fmt.Errorf("opaque parameters for %s (from the %s) are empty", DriverName, strings.ToLower(string(chosen.Source)))
	}
	cfg, err := api.ParseGPUConfig(chosen.Opaque.Parameters.Raw)
	if err != nil {
		return nil, fmt.Errorf("opaque parameters for %s (from the %s): %w", DriverName, strings.ToLower(string(chosen.Source)), err)
	}
	return cfg, nil
}

func appliesTo(requests []string, request string) bool {
	if len(requests) == 0 {
		return true
	}
	base, _, _ := strings.Cut(request, "/")
	for _, r := range requests {
		if r == request || r == base {
			return true
		}
	}
	return false
}

// checkConfig checks that a claim's parameters only refine what the device's mode allows and
// returns the time-slice interval to set on the GPU ("" for none).
func checkConfig(cfg *api.GPUConfig, d *Device) (api.TimeSliceInterval, error) {
	if cfg == nil || cfg.Sharing == nil {
		return "", nil
	}
	s := cfg.Sharing
	if c := d.Capacity; c != nil {
		// A shared GPU: its isolation is the profile's; a claim may only lower its MPS limits
		// (sharedLimits), never set an interval.
		switch {
		case s.Strategy == api.StrategyMPS && c.Isolation != api.ModeMPS:
			return "", fmt.Errorf("device %s is shared with isolation %s by the sharing profile: sharing strategy MPS does not apply to it; remove sharing or use strategy TimeSlicing without settings", d.Name, c.Isolation)
		case s.Strategy == api.StrategyTimeSlicing && c.Isolation == api.ModeMPS:
			return "", fmt.Errorf("device %s is shared through MPS by the sharing profile: sharing strategy TimeSlicing does not apply to it; remove sharing or use strategy MPS", d.Name)
		case s.TimeSlicing != nil && s.TimeSlicing.Interval != "":
			return "", fmt.Errorf("device %s is a shared GPU, used by other claims: a claim cannot set its time-slice interval; remove sharing.timeSlicing.interval", d.Name)
		case s.Strategy == api.StrategyMPS, s.Strategy == api.StrategyTimeSlicing:
			return "", nil
		}
	}
	switch s.Strategy {
	case api.StrategyMPS:
		return "", fmt.Errorf("device %s: sharing strategy MPS is not served by this driver version; use a GPU the sharing profile gives mode mps to the device plugin, or strategy TimeSlicing", d.Name)
	case api.StrategyTimeSlicing:
	default:
		return "", fmt.Errorf("device %s: unknown sharing strategy %q", d.Name, s.Strategy)
	}
	var interval api.TimeSliceInterval
	if s.TimeSlicing != nil {
		interval = s.TimeSlicing.Interval
	}
	switch {
	case interval == "":
		return "", nil
	case d.MIG != nil || d.Dynamic != nil:
		return "", fmt.Errorf("device %s is a MIG device: a time-slice interval does not apply to MIG devices; remove sharing.timeSlicing.interval", d.Name)
	case d.Shared():
		if interval != d.Interval {
			return "", fmt.Errorf("device %s is time-sliced with interval %s by the sharing profile and shared with other claims; a claim cannot change it to %s (remove sharing.timeSlicing.interval or ask for %s)", d.Name, d.Interval, interval, d.Interval)
		}
		return "", nil
	default:
		// A whole GPU belongs to this claim alone: its interval is the claim's to choose.
		return interval, nil
	}
}
