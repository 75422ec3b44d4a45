package dra

import (
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Modes chosen by the scheduler: a GPU the profile offers in several modes (spec.rules[].modes) is
// published as one sibling device per mode, all consuming the one counter of the GPU's counter set.
// The allocator charges a device's counters when it is first allocated and, for a device many
// claims share (allowMultipleAllocations), not again while it stays in use — so a time-sliced or
// shared sibling takes many claims, while no claim gets a sibling of another mode until it is free.

// counterGPU is the one counter of a GPU offered in several modes.
const counterGPU = "gpu"

// SiblingName is the device name of GPU index offered in mode m beside others: the first mode keeps
// gpu-<index>, the others are gpu-<index>-<mode>.
func SiblingName(index int, m api.Mode, first bool) string {
	if first {
		return GPUName(index)
	}
	return GPUName(index) + "-" + string(m)
}

// buildSiblings adds one device per mode of the assignment. Modes the cluster cannot store
// (allowMultipleAllocations dropped) are left out.
func (inv *Inventory) buildSiblings(g nvmlib.GPU, a api.Assignment, f Features) {
	set := CounterSetName(g.Index)
	one := *resource.NewQuantity(1, resource.DecimalSI)
	inv.CounterSets = append(inv.CounterSets, resourceapi.CounterSet{Name: set, Counters: map[string]resourceapi.Counter{counterGPU: {Value: one}}})
	consumes := []resourceapi.DeviceCounterConsumption{{CounterSet: set, Counters: map[string]resourceapi.Counter{counterGPU: {Value: one}}}}
	for i, m := range a.Modes {
		d := &Device{Name: SiblingName(g.Index, m, i == 0), GPU: g, Mode: m, consumes: consumes, sibling: true}
		switch m {
		case api.ModeTimeSliced:
			if f.NoTimeSliced {
				continue
			}
			d.Replicas, d.Interval = a.Replicas, a.Interval
			if d.Interval == "" {
				d.Interval = api.IntervalDefault
			}
		case api.ModeShared:
			if f.NoTimeSliced {
				continue
			}
			c, why := sharedCapacity(g, a.Shared)
			if why != "" {
				continue
			}
			d.Capacity = c
			if a.Shared != nil {
				d.Replicas = a.Shared.MaxClients
			}
		case api.ModeWhole:
		default:
			continue // not served by this driver version
		}
		inv.add(d)
	}
}
