package dra

import (
	"context"
	"maps"
	"slices"
	"strings"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/telemetry"
)

// TelemetrySource is the driver's view for telemetry: the GPUs it publishes devices of, every
// published device, and each prepared claim's devices (from the checkpoint index, no API call; the
// sampler finds the claim's pod).
func (d *Driver) TelemetrySource() telemetry.Source { return draTelemetry{d} }

type draTelemetry struct{ d *Driver }

func (s draTelemetry) Owned() []int {
	inv := s.d.inv.Load()
	if inv == nil {
		return nil
	}
	gpus := map[int]bool{}
	for _, dev := range inv.Devices {
		gpus[dev.GPU.Index] = true
	}
	return slices.Sorted(maps.Keys(gpus))
}

func kindOf(dev *Device) string {
	switch {
	case dev.MIG != nil || dev.Dynamic != nil:
		return telemetry.KindMIG
	case dev.Capacity != nil:
		return telemetry.KindShare
	case dev.Mode == api.ModeTimeSliced:
		return telemetry.KindReplica
	}
	return telemetry.KindGPU
}

func (s draTelemetry) Holdings(context.Context) ([]telemetry.Holding, error) {
	d := s.d
	inv := d.inv.Load()
	if inv == nil {
		return nil, nil
	}
	var bad []health.Status
	if !d.healthDisabled() {
		bad = d.monitor.Unhealthy()
	}
	base := map[string]telemetry.Holding{}
	for _, dev := range inv.Devices {
		h := telemetry.Holding{GPU: dev.GPU.Index, Device: dev.Name, Resource: DriverName, Kind: kindOf(dev), GI: -1, Healthy: true}
		if _, sick := d.unhealthy(dev, bad); sick {
			h.Healthy = false
		}
		if dev.MIG != nil {
			h.GI = dev.MIG.GI
			h.MemoryLimitBytes = int64(dev.MIG.MemoryMiB) << 20
		}
		h.Exclusive = h.Kind == telemetry.KindGPU
		base[dev.Name] = h
	}
	claimed := map[string]bool{}
	var out []telemetry.Holding
	d.idxMu.Lock()
	for _, c := range d.index {
		if c.Phase != PhaseCompleted {
			continue
		}
		for _, pd := range c.Devices {
			if pd.AdminAccess {
				continue
			}
			h, ok := base[pd.Device]
			if !ok {
				continue
			}
			h.Claim = c.Claim.Namespace + "/" + c.Claim.Name
			h.Namespace = c.Claim.Namespace
			if pd.Dynamic != nil && pd.CDI.MIG != nil {
				h.GI = pd.CDI.MIG.GI
			}
			if pd.MemoryMiB > 0 {
				h.MemoryLimitBytes = int64(pd.MemoryMiB) << 20
			}
			if h.Kind != telemetry.KindGPU {
				h.Exclusive = false
			}
			claimed[pd.Device] = true
			out = append(out, h)
		}
	}
	d.idxMu.Unlock()
	for _, name := range slices.Sorted(maps.Keys(base)) {
		if !claimed[name] {
			out = append(out, base[name])
		}
	}
	slices.SortFunc(out, func(a, b telemetry.Holding) int {
		if a.Device != b.Device {
			if a.Device < b.Device {
				return -1
			}
			return 1
		}
		if a.Claim < b.Claim {
			return -1
		}
		if a.Claim > b.Claim {
			return 1
		}
		return 0
	})
	return out, nil
}

// IdleChanged writes the telemetry's idle finding into the claim's device status: condition Idle
// True with the finding while the holder stays idle, False once it is busy again.
func (d *Driver) IdleChanged(h telemetry.Holding, idle bool, message string) {
	if h.Claim == "" || d.status == nil {
		return
	}
	ns, name, _ := strings.Cut(h.Claim, "/")
	// idxMu is held while the mark is queued: Unprepare takes the claim out of the index before it
	// queues the removal of the claim's status, so a late mark can never bring that status back.
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	var c *Checkpoint
	for _, x := range d.index {
		if x.Claim.Namespace == ns && x.Claim.Name == name && x.Phase == PhaseCompleted {
			c = x
		}
	}
	if c == nil {
		return // unprepared meanwhile
	}
	d.status.setIdle(c, h.Device, idle, message)
}
