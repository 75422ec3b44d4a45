package plugin

import (
	"context"
	"slices"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
)

// WithMIGGate makes the plugin follow the MIG manager: devices the manager holds are not advertised,
// GPUs it changed are read again, and the follower's acks say which held devices are still in use.
// The caller runs the follower (RunMIGGate).
func WithMIGGate(f *miggate.Follower) Option { return func(c *config) { c.gate = f } }

// RunMIGGate follows the MIG manager's plan until ctx ends (a no-op without WithMIGGate).
func (p *Plugin) RunMIGGate(ctx context.Context) {
	if p.cfg.gate == nil {
		return
	}
	p.cfg.gate.Run(ctx, p.gateChanged, p.gateReport)
}

// held reports whether the MIG manager holds a device.
func (p *Plugin) held(d *Device) bool {
	g := p.cfg.gate
	if g == nil {
		return false
	}
	if d.MIG != nil {
		return g.Held(d.GPU, true, d.MIG.Placement.Start)
	}
	return g.Held(d.GPU, false, 0)
}

// gateChanged re-plans the GPUs the manager changed and publishes without the held devices. It
// returns once the kubelet has the new device lists (ListAndWatch sends are queued by then).
func (p *Plugin) gateChanged(ctx context.Context, ch miggate.Change) {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	for _, i := range ch.Rescan {
		p.rescan[i] = true
	}
	if err := p.reconcileLocked(ctx); err != nil {
		klog.ErrorS(err, "Following the MIG manager's plan")
	}
}

// gateReport tells the MIG manager which GPUs the plugin serves and which held devices are in use.
func (p *Plugin) gateReport(holds map[int]miggate.Hold) (map[int]miggate.GPUOwnership, []miggate.Busy) {
	p.ctl.Lock()
	gpus := map[int]miggate.GPUOwnership{}
	var held []*Device
	for i, st := range p.gpus {
		a := st.assignment
		o := miggate.GPUOwnership{Mode: string(a.Mode)}
		if a.Mode == api.ModeMIGStatic && a.MIG != nil && !a.MIG.Existing {
			o.Layout = a.MIG.Layout
		}
		gpus[i] = o
		if h, ok := holds[i]; ok {
			for _, d := range st.devices {
				start := 0
				if d.MIG != nil {
					start = d.MIG.Placement.Start
				}
				if h.Covers(d.MIG != nil, start) {
					held = append(held, d)
				}
			}
		}
	}
	// GPUs the profile gives the plugin that it could not serve still belong to it.
	if p.res != nil {
		for _, a := range p.res.Owned(api.OwnerDevicePlugin) {
			if _, ok := gpus[a.GPU.Index]; !ok {
				gpus[a.GPU.Index] = miggate.GPUOwnership{Mode: string(a.Mode)}
			}
		}
	}
	p.ctl.Unlock()
	if len(held) == 0 || p.cfg.inUse == nil {
		return gpus, nil
	}
	var users map[string]map[string]string
	var err error
	if ul, ok := p.cfg.inUse.(userLister); ok {
		users, err = ul.Users(context.Background())
	} else {
		var inUse map[string]map[string]bool
		if inUse, err = p.cfg.inUse.InUse(context.Background()); err == nil {
			users = map[string]map[string]string{}
			for r, ids := range inUse {
				users[r] = map[string]string{}
				for id := range ids {
					users[r][id] = "a container"
				}
			}
		}
	}
	var busy []miggate.Busy
	if err != nil {
		// Unknown is not free: report every held device as possibly in use.
		klog.ErrorS(err, "Cannot tell the MIG manager which held devices are in use")
		for _, d := range held {
			busy = append(busy, miggate.Busy{GPU: d.GPU, Device: d.Resource + "=" + d.ID, User: "unknown: the kubelet's PodResources API cannot be read"})
		}
	} else {
		for _, d := range held {
			if u, ok := users[d.Resource][d.ID]; ok {
				busy = append(busy, miggate.Busy{GPU: d.GPU, Device: d.Resource + "=" + d.ID, User: u})
			}
		}
	}
	slices.SortFunc(busy, func(a, b miggate.Busy) int {
		if a.GPU != b.GPU {
			return a.GPU - b.GPU
		}
		if a.Device < b.Device {
			return -1
		}
		if a.Device > b.Device {
			return 1
		}
		return 0
	})
	return gpus, slices.Compact(busy)
}
