package plugin

import (
	"context"
	"maps"
	"slices"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/telemetry"
)

// TelemetrySource is the plugin's view for telemetry: the GPUs it serves devices of, and every
// served device with the pod holding it (from the kubelet's PodResources API). It reads the device
// tables without a lock and never calls NVML.
func (p *Plugin) TelemetrySource() telemetry.Source { return telemetrySource{p} }

type telemetrySource struct{ p *Plugin }

func (s telemetrySource) Owned() []int {
	gpus := map[int]bool{}
	for _, srv := range *s.p.live.Load() {
		for _, d := range srv.table.Load().devices {
			gpus[d.GPU] = true
		}
	}
	return slices.Sorted(maps.Keys(gpus))
}

func (s telemetrySource) Holdings(ctx context.Context) ([]telemetry.Holding, error) {
	var users map[string]map[string]string
	var err error
	if ul, ok := s.p.cfg.inUse.(userLister); ok {
		users, err = ul.Users(ctx)
	}
	var out []telemetry.Holding
	for _, srv := range *s.p.live.Load() {
		for _, d := range srv.table.Load().devices {
			h := telemetry.Holding{GPU: d.GPU, Device: d.ID, Resource: d.Resource, Kind: telemetry.KindGPU, GI: -1, Healthy: d.Healthy()}
			switch {
			case d.Shared() && d.Mode == api.ModeMPS:
				h.Kind = telemetry.KindMPS
			case d.Shared():
				h.Kind = telemetry.KindReplica
			case d.MIG != nil:
				h.Kind = telemetry.KindMIG
			default:
				h.Exclusive = true
			}
			if d.MIG != nil {
				h.GI = d.MIG.GI
				h.MemoryLimitBytes = int64(d.MIG.MemoryMiB) << 20
			}
			if d.MPS != nil && d.MPS.PinnedMemoryMiB > 0 {
				h.MemoryLimitBytes = int64(d.MPS.PinnedMemoryMiB) << 20
			}
			if u := users[d.Resource][d.ID]; u != "" {
				h.Namespace, h.Pod = splitPod(u)
			}
			out = append(out, h)
		}
	}
	return out, err
}

// splitPod reads "pod <namespace>/<name>" (PodResources.Users).
func splitPod(u string) (string, string) {
	const prefix = "pod "
	if len(u) > len(prefix) && u[:len(prefix)] == prefix {
		u = u[len(prefix):]
	}
	for i := 0; i < len(u); i++ {
		if u[i] == '/' {
			return u[:i], u[i+1:]
		}
	}
	return "", u
}
