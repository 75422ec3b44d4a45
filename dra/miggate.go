package dra

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// The MIG manager's handshake (partitioning/miggate): while the manager changes a GPU's MIG layout,
// the devices the change touches are withdrawn from the ResourceSlices, and the driver tells the
// manager which of them prepared claims still use. Devices the change does not touch stay published.

// WithMIGGate makes the driver follow the MIG manager's handshake: devices the follower holds are
// not published (and not prepared), and Run acknowledges the manager's plans with the GPUs the
// driver owns and the held devices prepared claims still use. The follower must be made for
// miggate.FrontEndDRA with the driver's boot ID, before the first SetResolution, so that holds of an
// earlier boot apply from the very first publish.
func WithMIGGate(f *miggate.Follower) Option { return func(d *Driver) error { d.gate = f; return nil } }

// gateHolds are the holds in force (nil without a follower).
func (d *Driver) gateHolds() map[int]miggate.Hold {
	if d.gate == nil {
		return nil
	}
	return d.gate.Holds()
}

// heldBy reports whether holds cover a device: every device of a GPU held whole (its whole-GPU,
// time-sliced, shared and sibling devices, its mig-dynamic placements), and the mig-static MIG
// devices whose GPU instance starts at a held placement. A mig-dynamic placement is never held by
// placement: the manager does not touch mig-dynamic GPUs.
func heldBy(holds map[int]miggate.Hold, dev *Device) bool {
	h, ok := holds[dev.GPU.Index]
	if !ok {
		return false
	}
	if h.All {
		return true
	}
	return dev.MIG != nil && h.Covers(true, dev.MIG.Placement.Start)
}

// Withheld looks up a device the MIG manager's holds keep out of the slices.
func (inv *Inventory) Withheld(name string) (*Device, bool) {
	d, ok := inv.withheld[name]
	return d, ok
}

// withhold returns the inventory without the devices holds cover (inv itself when none is). The
// counter sets of GPUs held whole go too when no remaining device consumes them, and held GPUs get
// no time-slice interval while held. inv is not modified: Prepare reads it without a lock.
func (inv *Inventory) withhold(holds map[int]miggate.Hold) *Inventory {
	if len(holds) == 0 || !slices.ContainsFunc(inv.Devices, func(d *Device) bool { return heldBy(holds, d) }) {
		return inv
	}
	out := *inv
	out.Devices = nil
	out.byName = make(map[string]*Device, len(inv.Devices))
	out.withheld = maps.Clone(inv.withheld)
	if out.withheld == nil {
		out.withheld = map[string]*Device{}
	}
	out.WithheldDevices = slices.Clone(inv.WithheldDevices)
	for _, d := range inv.Devices {
		if heldBy(holds, d) {
			out.withheld[d.Name] = d
			out.WithheldDevices = append(out.WithheldDevices, d)
			continue
		}
		out.add(d)
	}
	used := map[string]bool{}
	for _, d := range out.Devices {
		for _, c := range d.consumes {
			used[c.CounterSet] = true
		}
	}
	out.CounterSets = slices.DeleteFunc(slices.Clone(inv.CounterSets), func(cs resourceapi.CounterSet) bool {
		if used[cs.Name] {
			return false
		}
		for i, h := range holds {
			if h.All && cs.Name == CounterSetName(i) {
				return true
			}
		}
		return false
	})
	out.TimeSliced = maps.Clone(inv.TimeSliced)
	for i, h := range holds {
		if h.All {
			delete(out.TimeSliced, i)
		}
	}
	return &out
}

// reportWithheld logs the devices withheld when the set changes. rebuildMu is held.
func (d *Driver) reportWithheld(ctx context.Context, inv *Inventory) {
	names := make([]string, 0, len(inv.WithheldDevices))
	for _, w := range inv.WithheldDevices {
		names = append(names, w.Name)
	}
	if slices.Equal(names, d.withheldLast) {
		return
	}
	if len(names) > 0 {
		klog.FromContext(ctx).Info("Devices withdrawn while the MIG manager changes their GPUs' layout", "devices", names, "holds", miggate.FormatHolds(d.gateHolds()))
	} else if len(d.withheldLast) > 0 {
		klog.FromContext(ctx).Info("The MIG manager released its holds; every device is published again")
	}
	d.withheldLast = names
}

// applyMIGGate is the follower's apply: it reads the node again and publishes without the devices
// the new holds cover (the follower has stored them; rebuild reads them), and returns once the new
// slices are handed to the publisher. If the node cannot be read, the held devices are taken out of
// what is published now; should that fail too, reportMIGGate reports them as in use until they are
// gone.
func (d *Driver) applyMIGGate(ctx context.Context, ch miggate.Change) {
	logger := klog.FromContext(ctx)
	logger.Info("MIG manager plan moved", "holds", miggate.FormatHolds(ch.Holds), "rescan", ch.Rescan)
	err := d.rebuild(ctx)
	if err == nil {
		return
	}
	logger.Error(err, "Reading the node after a MIG manager change; withdrawing the held devices from what is published")
	if err := d.withdrawHeld(ctx); err != nil {
		logger.Error(err, "Withdrawing the devices the MIG manager holds; they are reported to it as in use")
	}
}

// withdrawHeld takes the held devices out of the current inventory and publishes it.
func (d *Driver) withdrawHeld(ctx context.Context) error {
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	inv := d.inv.Load()
	if inv == nil {
		return nil
	}
	if w := inv.withhold(d.gateHolds()); w != inv {
		d.inv.Store(w)
		d.reportWithheld(ctx, w)
	}
	return d.publishLocked(ctx)
}

// stillOffered lists the held devices the driver still offers: in the inventory Prepare reads, or in
// the slices published last (a publish that failed).
func (d *Driver) stillOffered(holds map[int]miggate.Hold) []*Device {
	d.rebuildMu.Lock()
	invs := []*Inventory{d.inv.Load(), d.publishedInv}
	d.rebuildMu.Unlock()
	var out []*Device
	seen := map[string]bool{}
	for _, inv := range invs {
		if inv == nil {
			continue
		}
		for _, dev := range inv.Devices {
			if heldBy(holds, dev) && !seen[dev.Name] {
				seen[dev.Name] = true
				out = append(out, dev)
			}
		}
	}
	return out
}

// reportMIGGate is the follower's Reporter: the GPUs the sharing profile gives to DRA, with their
// mode, and every held device a prepared claim (completed, being prepared, or unprepared with its
// MIG instance still in use) is on. A held device still published is reported as in use too, so the
// manager never changes a GPU whose devices the scheduler can still hand out.
func (d *Driver) reportMIGGate(holds map[int]miggate.Hold) (map[int]miggate.GPUOwnership, []miggate.Busy) {
	gpus := map[int]miggate.GPUOwnership{}
	if res := d.res.Load(); res != nil {
		for _, a := range res.Owned(api.OwnerDRA) {
			// The driver never applies a mig-static layout the profile names (it serves the MIG
			// devices that exist), so Layout stays empty and the manager manages the GPU.
			gpus[a.GPU.Index] = miggate.GPUOwnership{Mode: string(a.Mode)}
		}
	}
	if len(holds) == 0 {
		return gpus, nil
	}
	var busy []miggate.Busy
	if offered := d.stillOffered(holds); len(offered) > 0 {
		// Try once more; what is still offered afterwards blocks the change.
		ctx := context.Background()
		if err := d.rebuild(ctx); err != nil {
			_ = d.withdrawHeld(ctx)
		}
		for _, dev := range d.stillOffered(holds) {
			busy = append(busy, miggate.Busy{GPU: dev.GPU.Index, Device: dev.Name, User: "still published by the DRA driver"})
		}
	}
	if err := d.refreshIndex(); err != nil {
		klog.ErrorS(err, "Reading the checkpoints for the MIG manager; reporting the claims known in memory")
	}
	// MIG devices of held GPUs as NVML has them now, for the placement of prepared MIG devices.
	migs := map[int][]nvmlib.MigDevice{}
	migErr := map[int]error{}
	placementOf := func(gpu int, uuid string, gi, ci int) (int, bool) {
		if _, ok := migs[gpu]; !ok && migErr[gpu] == nil {
			migs[gpu], migErr[gpu] = d.lib.MigDevices(gpu)
			if migs[gpu] == nil {
				migs[gpu] = []nvmlib.MigDevice{}
			}
		}
		for _, m := range migs[gpu] {
			if uuid != "" && m.UUID == uuid || uuid == "" && m.GI == gi && m.CI == ci {
				return m.Placement.Start, true
			}
		}
		return 0, false
	}
	d.idxMu.Lock()
	cps := slices.Collect(maps.Values(d.index))
	d.idxMu.Unlock()
	seen := map[miggate.Busy]bool{}
	for _, c := range cps {
		for _, pd := range c.Devices {
			gpu := pd.CDI.GPU.Index
			h, ok := holds[gpu]
			if !ok {
				continue
			}
			covered := h.All
			if !covered && pd.Dynamic == nil && pd.CDI.MIG != nil {
				start, found := placementOf(gpu, pd.CDI.MIG.UUID, pd.CDI.MIG.GI, pd.CDI.MIG.CI)
				switch {
				case found:
					covered = h.Covers(true, start)
				case migErr[gpu] != nil:
					covered = true // cannot tell: in use until NVML answers
				}
				// Not found: the claim's MIG instance is gone already; nothing of it is destroyed.
			}
			if !covered {
				continue
			}
			b := miggate.Busy{GPU: gpu, Device: pd.Device, User: "claim " + c.Claim.Namespace + "/" + c.Claim.Name}
			if !seen[b] {
				seen[b] = true
				busy = append(busy, b)
			}
		}
	}
	slices.SortFunc(busy, func(a, b miggate.Busy) int {
		return cmp.Or(cmp.Compare(a.GPU, b.GPU), strings.Compare(a.Device, b.Device), strings.Compare(a.User, b.User))
	})
	return gpus, busy
}

// checkHeld refuses devices the MIG manager holds. Prepare calls it after its checkpoint is in the
// index: the follower stores new holds before it asks which held devices are in use, so a Prepare
// either sees the holds here or is reported to the manager as in use.
func (d *Driver) checkHeld(devs []*Device) error {
	holds := d.gateHolds()
	for _, dev := range devs {
		if heldBy(holds, dev) {
			return withdrawnError(dev)
		}
	}
	return nil
}

func withdrawnError(dev *Device) error {
	return fmt.Errorf("device %s is withdrawn while the MIG manager changes GPU %d's layout", dev.Name, dev.GPU.Index)
}
