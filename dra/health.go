package dra

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/health"
)

// HealthPolicy is the published XID table (the device plugin's) with the profile's changes:
// spec.health.ignoredXIDs and criticalXIDs.
func HealthPolicy(h api.HealthSettings) (health.Policy, error) {
	p, err := health.DefaultPolicy().WithIgnored(h.IgnoredXIDs...)
	if err != nil {
		return p, err
	}
	return p.WithCritical(h.CriticalXIDs...), nil
}

// unhealthy returns the health status of a device that is unhealthy (the GPU's own, or the MIG
// device's), and false when it is healthy.
func (d *Driver) unhealthy(dev *Device, bad []health.Status) (health.Status, bool) {
	for _, s := range bad {
		if s.GPU != dev.GPU.Index {
			continue
		}
		if s.GI < 0 || (dev.MIG != nil && s.GI == dev.MIG.GI && s.CI == dev.MIG.CI) {
			return s, true
		}
		if dev.Dynamic != nil {
			// A placement of a mig-dynamic GPU: faulty while the instance a claim made there is.
			if gi, ci, ok := d.dynamicInstance(dev); ok && s.GI == gi && s.CI == ci {
				return s, true
			}
		}
	}
	return health.Status{}, false
}

// healthDisabled reports whether the profile turned health checks off.
func (d *Driver) healthDisabled() bool {
	res := d.res.Load()
	return d.monitor == nil || (res != nil && res.Health.Disabled)
}

// taints are the health taints of the devices: NoSchedule (or NoExecute where the profile opts in)
// while a device is unhealthy, none once it recovers.
func (d *Driver) taints(inv *Inventory) Taints {
	if d.features.NoTaints {
		return nil
	}
	out := d.inUseTaints(inv)
	if d.healthDisabled() {
		return out
	}
	bad := d.monitor.Unhealthy()
	if len(bad) == 0 {
		return out
	}
	effect := resourceapi.DeviceTaintEffectNoSchedule
	if d.noExecute.Load() {
		effect = resourceapi.DeviceTaintEffectNoExecute
	}
	if out == nil {
		out = Taints{}
	}
	for _, dev := range inv.Devices {
		if s, ok := d.unhealthy(dev, bad); ok {
			out[dev.Name] = append(out[dev.Name], resourceapi.DeviceTaint{Key: TaintKey, Value: taintValue(s.Reason), Effect: effect})
		}
	}
	return out
}

// taintValue turns a health reason ("XID 79 (until-reset)") into a label value ("xid-79-until-reset").
func taintValue(reason string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(reason) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
			dash = false
		} else if !dash && b.Len() > 0 {
			b.WriteByte('-')
			dash = true
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 63 {
		s = strings.Trim(s[:63], "-")
	}
	return s
}

// watchTaints republishes the slices whenever a device's health changes.
func (d *Driver) watchTaints(ctx context.Context) {
	ch, cancel := d.monitor.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
			// Coalesce a burst of changes into one publish.
		drain:
			for {
				select {
				case <-ch:
				default:
					break drain
				}
			}
			d.republish(ctx)
		}
	}
}

// healthReport is the health of every device published or withheld by the MIG manager.
func (d *Driver) healthReport() kubeletplugin.DeviceHealthReport {
	inv := d.inv.Load()
	var rep kubeletplugin.DeviceHealthReport
	if inv == nil {
		return rep
	}
	now := time.Now()
	disabled := d.healthDisabled()
	var bad []health.Status
	if !disabled {
		bad = d.monitor.Unhealthy()
	}
	// Devices the MIG manager withholds may still be in use: their health keeps being reported.
	for _, dev := range slices.Concat(inv.Devices, inv.WithheldDevices) {
		h := kubeletplugin.DeviceHealth{PoolName: inv.Pool, DeviceName: dev.Name, Health: kubeletplugin.HealthStatusHealthy,
			LastUpdated: now, HealthCheckTimeout: 3 * d.healthResend}
		switch s, ok := d.unhealthy(dev, bad); {
		case disabled:
			h.Health, h.Message = kubeletplugin.HealthStatusUnknown, "health checks are disabled by the sharing profile"
		case ok:
			h.Health, h.Message = kubeletplugin.HealthStatusUnhealthy, fmt.Sprintf("%s since %s", s.Reason, s.Since.UTC().Format(time.RFC3339))
		}
		rep.Devices = append(rep.Devices, h)
	}
	return rep
}

// WatchHealthStatus implements kubeletplugin.DRAPlugin (KEP-4680): a report of every device at
// once, again on every health change, and at least every healthResend so the kubelet never lets it
// go stale.
func (d *Driver) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	if d.monitor == nil {
		return kubeletplugin.ErrHealthNotSupported
	}
	ch, cancel := d.monitor.Subscribe()
	defer cancel()
	t := time.NewTicker(d.healthResend)
	defer t.Stop()
	send := func() bool {
		select {
		case <-ctx.Done():
			return false
		case reports <- d.healthReport():
			return true
		}
	}
	if !send() {
		return nil
	}
	klog.FromContext(ctx).V(2).Info("Streaming device health to the kubelet")
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		case <-t.C:
		}
		if !send() {
			return nil
		}
	}
}
