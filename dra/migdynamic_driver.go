package dra

import (
	"context"
	"fmt"
	"slices"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Reasons and the taint of mig-dynamic GPUs.
const (
	ReasonMIGModeOn     = "DRAMIGModeEnabled"
	ReasonMIGModeFailed = "DRAMIGModeFailed"
	ReasonHidden        = "DRAMIGPlacementsHidden"
	ReasonDestroyInUse  = "DRAMIGInstanceInUse"
	// InUseTaintKey taints the placements a MIG instance that could not be destroyed overlaps.
	InUseTaintKey = DriverName + "/mig-instance-in-use"
)

func (d *Driver) attrOptions() attrOptions {
	return attrOptions{pcieRoot: d.pcieRoot, noPartitionType: d.features.NoPartitionType}
}

// ensureMIGMode turns MIG mode on for the mig-dynamic GPUs of the resolution that have it off,
// under each GPU's lock. A change that needs a GPU reset stays pending (the GPU is then not
// published, with the reason). It reports whether any GPU changed.
func (d *Driver) ensureMIGMode(ctx context.Context, snap *inventory.Snapshot, res *api.Resolution) bool {
	want := map[int]bool{}
	for _, a := range res.Assignments {
		if a.Owner == api.OwnerDRA && a.Mode == api.ModeMIGDynamic {
			want[a.GPU.Index] = true
		}
	}
	busy := map[string]bool{}
	d.idxMu.Lock()
	for _, c := range d.index {
		for _, pd := range c.Devices {
			busy[pd.CDI.GPU.UUID] = true
		}
	}
	d.idxMu.Unlock()
	changed := false
	for _, g := range snap.GPUs {
		if !want[g.Index] || !g.MigCapable || g.MigEnabled || g.MigPending || g.UUID == "" || g.Error != "" {
			continue
		}
		if busy[g.UUID] {
			klog.FromContext(ctx).Info("MIG mode not turned on: a claim prepared in another mode still holds the GPU", "gpu", g.Index)
			continue
		}
		unlock, err := d.locks.Lock(ctx, []string{g.UUID})
		if err != nil {
			klog.FromContext(ctx).Error(err, "MIG mode not turned on", "gpu", g.Index)
			continue
		}
		ch, err := d.lib.SetMigMode(g.Index, true)
		unlock()
		if err != nil {
			klog.FromContext(ctx).Error(err, "MIG mode not turned on", "gpu", g.Index)
			d.event("Warning", ReasonMIGModeFailed, fmt.Sprintf("GPU %d (mode mig-dynamic): turning MIG mode on failed: %v", g.Index, err))
			continue
		}
		changed = true
		msg := fmt.Sprintf("GPU %d (mode mig-dynamic): MIG mode turned on", g.Index)
		if ch.Pending {
			msg = fmt.Sprintf("GPU %d (mode mig-dynamic): MIG mode turned on, pending a GPU reset (%s)", g.Index, ch.Reason)
		}
		klog.FromContext(ctx).Info("MIG mode turned on for a mig-dynamic GPU", "gpu", g.Index, "pending", ch.Pending, "reason", ch.Reason)
		d.event("Normal", ReasonMIGModeOn, msg)
	}
	return changed
}

// ownedInstances lists the MIG instances the driver's claims hold or are making, by GPU UUID.
func (d *Driver) ownedInstances() map[string][]ownedInstance {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	out := map[string][]ownedInstance{}
	for _, c := range d.index {
		for _, pd := range c.Devices {
			if pd.Dynamic != nil {
				u := pd.CDI.GPU.UUID
				out[u] = append(out[u], ownedInstance{ProfileID: pd.Dynamic.ProfileID, Placement: pd.Dynamic.Placement, Held: c.Phase == PhaseDestroyPending})
			}
		}
	}
	return out
}

// reportHidden logs (and posts an Event for) placements newly hidden by foreign MIG instances.
func (d *Driver) reportHidden(inv *Inventory) {
	if slices.Equal(d.hidden, inv.Hidden) {
		return
	}
	if len(inv.Hidden) > 0 {
		klog.InfoS("MIG placements not published: a MIG instance Tessera did not create overlaps them", "devices", inv.Hidden)
		d.event("Warning", ReasonHidden, fmt.Sprintf("%d placements of mig-dynamic GPUs are not published because MIG instances Tessera did not create overlap them (remove those instances to offer them): %v", len(inv.Hidden), inv.Hidden))
	}
	d.hidden = slices.Clone(inv.Hidden)
}

// destroyPending records that a claim is unprepared but its MIG instance could not be destroyed:
// the checkpoint stays (phase UnprepareDestroyPending) so the instance stays Tessera's, the
// placements it overlaps are tainted, and retryPending destroys it later. The caller holds the
// GPUs' locks.
func (d *Driver) destroyPending(c *Checkpoint) error {
	p := *c
	p.Phase = PhaseDestroyPending
	if err := d.ckpt.write(&p); err != nil {
		return err
	}
	d.idxMu.Lock()
	d.index[c.Claim.UID] = &p
	d.idxMu.Unlock()
	klog.InfoS("MIG instance still in use; its placements are tainted until it can be destroyed", "claim", c.Claim.String())
	d.event("Warning", ReasonDestroyInUse, fmt.Sprintf("claim %s is unprepared, but its MIG instance still has processes (NVML ERROR_IN_USE): the placements it overlaps are tainted %s until it can be destroyed", c.Claim, InUseTaintKey))
	return nil
}

// retryPending tries again to destroy MIG instances of unprepared claims that were in use.
func (d *Driver) retryPending(ctx context.Context) {
	d.idxMu.Lock()
	var pending []*Checkpoint
	for _, c := range d.index {
		if c.Phase == PhaseDestroyPending {
			pending = append(pending, c)
		}
	}
	d.idxMu.Unlock()
	for _, c := range pending {
		if err := d.finishPending(ctx, c.Claim.UID); err != nil {
			klog.FromContext(ctx).V(2).Info("MIG instance still cannot be destroyed", "claim", c.Claim.String(), "err", err)
		}
	}
}

func (d *Driver) finishPending(ctx context.Context, uid types.UID) error {
	c, unlock, err := d.lockCheckpoint(ctx, uid)
	if err != nil {
		return err
	}
	if c == nil || c.Phase != PhaseDestroyPending {
		unlock()
		return nil
	}
	err = d.undo(ctx, c, true)
	unlock() // republishing waits for rebuilds, which take GPU locks
	if err != nil {
		return err
	}
	klog.FromContext(ctx).Info("MIG instance destroyed after its processes ended", "claim", c.Claim.String())
	d.republish(ctx)
	return nil
}

// inUseTaints are the taints of the devices that overlap a MIG instance still waiting to be
// destroyed.
func (d *Driver) inUseTaints(inv *Inventory) Taints {
	d.idxMu.Lock()
	type busy struct {
		uuid string
		pl   nvmlib.Placement
	}
	var bs []busy
	for _, c := range d.index {
		if c.Phase != PhaseDestroyPending {
			continue
		}
		for _, pd := range c.Devices {
			if pd.Dynamic != nil {
				bs = append(bs, busy{pd.CDI.GPU.UUID, pd.Dynamic.Placement})
			}
		}
	}
	d.idxMu.Unlock()
	if len(bs) == 0 {
		return nil
	}
	out := Taints{}
	for _, dev := range inv.Devices {
		if dev.Dynamic == nil {
			continue
		}
		for _, b := range bs {
			if b.uuid == dev.GPU.UUID && (dev.Dynamic.Whole || b.pl.Overlaps(dev.Dynamic.Placement)) {
				out[dev.Name] = []resourceapi.DeviceTaint{{Key: InUseTaintKey, Value: "destroy-pending", Effect: resourceapi.DeviceTaintEffectNoSchedule}}
				break
			}
		}
	}
	return out
}

// dynamicInstance returns the GPU and compute instance a prepared claim made at a mig-dynamic
// device's placement (for the whole-GPU device: the full profile's).
func (d *Driver) dynamicInstance(dev *Device) (gi, ci int, ok bool) {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	for _, c := range d.index {
		for _, pd := range c.Devices {
			if m := pd.Dynamic; m != nil && m.GI >= 0 && pd.CDI.GPU.UUID == dev.GPU.UUID &&
				m.ProfileID == dev.Dynamic.Profile.ID && m.Placement == dev.Dynamic.Placement {
				return m.GI, m.CI, true
			}
		}
	}
	return 0, 0, false
}
