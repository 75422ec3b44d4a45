package dra

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// PrepareResourceClaims implements kubeletplugin.DRAPlugin. Claims are prepared concurrently.
func (d *Driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	if len(claims) == 1 {
		out[claims[0].UID] = d.prepareClaim(ctx, claims[0])
		return out, nil
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, c := range claims {
		wg.Go(func() {
			r := d.prepareClaim(ctx, c)
			mu.Lock()
			out[c.UID] = r
			mu.Unlock()
		})
	}
	wg.Wait()
	return out, nil
}

func (d *Driver) prepareClaim(ctx context.Context, claim *resourceapi.ResourceClaim) kubeletplugin.PrepareResult {
	start := time.Now()
	ref := ClaimRef{UID: claim.UID, Namespace: claim.Namespace, Name: claim.Name}
	logger := klog.FromContext(ctx).WithValues("claim", ref.String())
	sw := &stopwatch{last: start}
	devs, err := d.prepare(klog.NewContext(ctx, logger), claim, ref, sw)
	d.metrics.observePrepare(time.Since(start), err)
	if err != nil {
		logger.Error(err, "Prepare failed")
		return kubeletplugin.PrepareResult{Err: fmt.Errorf("claim %s: %w", ref, err)}
	}
	logger.V(2).Info("Prepared", append([]any{"devices", len(devs), "duration", time.Since(start)}, sw.laps...)...)
	return kubeletplugin.PrepareResult{Devices: devs}
}

func resultOf(c *Checkpoint) []kubeletplugin.Device {
	out := make([]kubeletplugin.Device, 0, len(c.Devices))
	for _, pd := range c.Devices {
		kd := kubeletplugin.Device{Requests: pd.Requests, PoolName: pd.Pool, DeviceName: pd.Device}
		if pd.CDIDeviceID != "" {
			kd.CDIDeviceIDs = []string{pd.CDIDeviceID}
		}
		if pd.ShareID != "" {
			id := types.UID(pd.ShareID)
			kd.ShareID = &id
		}
		out = append(out, kd)
	}
	return out
}

// sameAllocation reports whether a checkpoint records exactly these results.
func sameAllocation(c *Checkpoint, results []resourceapi.DeviceRequestAllocationResult) bool {
	if len(c.Devices) != len(results) {
		return false
	}
	for i, r := range results {
		pd := c.Devices[i]
		share := ""
		if r.ShareID != nil {
			share = string(*r.ShareID)
		}
		if pd.Pool != r.Pool || pd.Device != r.Device || pd.ShareID != share || len(pd.Requests) != 1 || pd.Requests[0] != r.Request {
			return false
		}
	}
	return true
}

// stopwatch records how long each step of a Prepare took, for the log.
type stopwatch struct {
	last time.Time
	laps []any
}

func (s *stopwatch) lap(name string) {
	now := time.Now()
	s.laps = append(s.laps, name, now.Sub(s.last))
	s.last = now
}

func (d *Driver) prepare(ctx context.Context, claim *resourceapi.ResourceClaim, ref ClaimRef, sw *stopwatch) ([]kubeletplugin.Device, error) {
	if claim.Status.Allocation == nil {
		return nil, errors.New("claim is not allocated")
	}
	var results []resourceapi.DeviceRequestAllocationResult
	for _, r := range claim.Status.Allocation.Devices.Results {
		if r.Driver == DriverName {
			results = append(results, r)
		}
	}
	// Prepared already (a retry, or the kubelet preparing again after a restart): the same answer.
	d.idxMu.Lock()
	prev := d.index[ref.UID]
	d.idxMu.Unlock()
	if prev != nil && prev.Phase == PhaseCompleted && prev.BootID == d.bootID && sameAllocation(prev, results) {
		if err := d.ensureSpec(prev); err != nil {
			return nil, err
		}
		if slices.ContainsFunc(prev.Devices, d.usesStatic) {
			if err := d.ensureStaticSpec(); err != nil {
				return nil, err
			}
		}
		return resultOf(prev), nil
	}

	// What the allocation asks for, checked against what this node publishes now.
	inv := d.inv.Load()
	if inv == nil {
		return nil, errors.New("the driver has not published its devices yet")
	}
	prepared := make([]PreparedDevice, 0, len(results))
	devs := make([]*Device, 0, len(results))
	for _, r := range results {
		if r.Pool != inv.Pool {
			return nil, fmt.Errorf("device %s is from pool %q, but this node's pool is %q", r.Device, r.Pool, inv.Pool)
		}
		dev, ok := inv.Device(r.Device)
		if !ok {
			// MIG devices may have been made since the last read of the node: read it once more
			// (not for a device the MIG manager holds: a new read withholds it again).
			if _, held := inv.Withheld(r.Device); !held {
				if err := d.rebuild(ctx); err == nil {
					inv = d.inv.Load()
					dev, ok = inv.Device(r.Device)
				}
			}
			if w, held := inv.Withheld(r.Device); !ok && held {
				return nil, withdrawnError(w)
			}
			if !ok {
				return nil, fmt.Errorf("device %s is not (or no longer) published by this node", r.Device)
			}
		}
		if r.ShareID != nil && !dev.Shared() || r.ShareID == nil && dev.Shared() {
			return nil, fmt.Errorf("device %s: allocation share ID does not match the device (shared: %v)", r.Device, dev.Shared())
		}
		cfg, err := configFor(claim.Status.Allocation, r.Request)
		if err != nil {
			return nil, err
		}
		interval, err := checkConfig(cfg, dev)
		if err != nil {
			return nil, err
		}
		if dev.Sibling() && dev.Mode == api.ModeTimeSliced {
			// The GPU is time-sliced only while such claims hold it: the profile's interval is set
			// at Prepare and put back when the last of them goes.
			interval = dev.Interval
		}
		pd := PreparedDevice{Requests: []string{r.Request}, Pool: r.Pool, Device: r.Device, Mode: dev.Mode, CDI: dev.CDI(), Interval: interval}
		if dp := dev.Dynamic; dp != nil {
			pd.Dynamic = &DynamicMIG{ProfileID: dp.Profile.ID, Profile: dp.Profile.Name, Placement: dp.Placement, GI: -1, CI: -1}
		}
		if r.ShareID != nil {
			pd.ShareID = string(*r.ShareID)
		}
		pd.AdminAccess = r.AdminAccess != nil && *r.AdminAccess
		if dev.Capacity != nil && !pd.AdminAccess {
			if slices.ContainsFunc(prepared, func(o PreparedDevice) bool { return o.Device == pd.Device }) {
				return nil, fmt.Errorf("device %s is a shared GPU given to this claim twice: one container cannot hold two shares of it; ask for one share with the capacity of both", r.Device)
			}
			if err := d.shareOf(&pd, dev, r, cfg, ref.UID); err != nil {
				return nil, err
			}
		}
		prepared = append(prepared, pd)
		devs = append(devs, dev)
	}
	c := &Checkpoint{Format: CheckpointFormat, DriverVersion: d.version, Claim: ref, BootID: d.bootID, Phase: PhaseStarted, Devices: prepared}

	sw.lap("check")
	gpus := c.GPUs()
	if prev != nil {
		gpus = append(gpus, prev.GPUs()...) // a prepare of an earlier allocation is undone below
	}
	unlock, err := d.locks.Lock(ctx, gpus)
	if err != nil {
		return nil, err
	}
	defer unlock()
	sw.lap("lock")
	d.idxMu.Lock()
	d.inflight[ref.UID] = true
	d.idxMu.Unlock()
	defer func() {
		d.idxMu.Lock()
		delete(d.inflight, ref.UID)
		d.idxMu.Unlock()
	}()
	if err := d.refreshIndex(); err != nil {
		return nil, err
	}
	if err := d.checkInUse(c); err != nil {
		return nil, err
	}
	if err := d.checkShares(c); err != nil {
		return nil, err
	}
	if old := d.indexed(ref.UID); old != nil && old.Phase != "unreadable" {
		// A prepare of this claim that did not complete, or one of an earlier allocation (a claim can
		// be deallocated and allocated again under the same UID): undo it first.
		if err := d.undo(ctx, old, true); err != nil {
			return nil, err
		}
	}

	// Phase 1: started, durably, before anything on the node changes.
	d.idxMu.Lock()
	d.index[ref.UID] = c
	d.idxMu.Unlock()
	// The MIG manager's holds are checked only now that the claim is in the index: a hold stored
	// before this check refuses the claim, one stored after it finds the claim in use.
	if err := d.checkHeld(devs); err != nil {
		d.forget(ref.UID)
		return nil, err
	}
	sw.lap("inUse")
	// PrepareStarted exists so that a crash part-way undoes what was changed on the node. A claim
	// whose Prepare changes nothing there (a whole GPU, an existing MIG device, a share without MPS)
	// leaves only its CDI spec behind, and start-up removes specs no checkpoint owns: it goes straight
	// to PrepareCompleted, one fsynced write instead of two.
	if c.changesNode() {
		if err := d.ckpt.write(c); err != nil {
			d.forget(ref.UID)
			return nil, err
		}
	}
	sw.lap("started")
	if d.hooks.afterStarted != nil {
		if err := d.hooks.afterStarted(ref); err != nil {
			return nil, err // a simulated crash: nothing is undone
		}
	}
	// Checkpoints in the index are never modified (other prepares read them): the completed one is a copy.
	done := *c
	done.Phase = PhaseCompleted
	done.Devices = slices.Clone(c.Devices)
	for i := range done.Devices {
		done.Devices[i].Dynamic = nil // set once its instance exists: a failure destroys only what this Prepare made
	}
	fail := func(err error) ([]kubeletplugin.Device, error) {
		if uerr := d.undo(ctx, &done, true); uerr != nil {
			return nil, errors.Join(err, fmt.Errorf("rolling back: %w", uerr))
		}
		return nil, err
	}
	for i, pd := range c.Devices {
		if pd.Interval != "" {
			if err := d.slicer.SetTimeSlice(ctx, pd.CDI.GPU.Index, pd.Interval); err != nil {
				return fail(err)
			}
		}
		if pd.Dynamic != nil {
			dm := *pd.Dynamic
			dev, err := createDynamic(d.lib, pd.CDI.GPU, &dm)
			if err != nil {
				if dm.GI >= 0 { // made, and not destroyed again: undo tries once more
					done.Devices[i].Dynamic = &dm
				}
				return fail(err)
			}
			done.Devices[i].Dynamic, done.Devices[i].CDI = &dm, dev
		}
	}
	if made := slices.ContainsFunc(done.Devices, func(pd PreparedDevice) bool { return pd.Dynamic != nil }); made {
		// Record the instances' IDs at once, so that a crash from here on undoes exactly them, never
		// an instance someone else makes at the same placement meanwhile.
		mid := done
		mid.Phase = PhaseStarted
		if err := d.ckpt.write(&mid); err != nil {
			return fail(err)
		}
	}
	sw.lap("mig")
	if err := d.prepareMPS(ctx, &done); err != nil {
		return fail(err)
	}
	sw.lap("mps")
	if len(c.Devices) > 0 {
		// Whole GPUs and existing MIG devices are answered from the static spec; the rest get the
		// claim's transient spec.
		if rest := d.splitStatic(&done); len(rest) > 0 {
			sub := Checkpoint{Devices: make([]PreparedDevice, len(rest))}
			for k, i := range rest {
				sub.Devices[k] = done.Devices[i]
			}
			devs, at := specDevices(&sub)
			names, err := d.cdi.WriteClaimSpec(string(ref.UID), devs)
			if err != nil {
				return fail(err)
			}
			for k, i := range rest {
				done.Devices[i].CDIDeviceID = names[at[k]]
			}
		}
	}
	sw.lap("cdi")
	if d.hooks.beforeCompleted != nil {
		if err := d.hooks.beforeCompleted(ref); err != nil {
			return nil, err // a simulated crash: nothing is undone
		}
	}
	// Phase 2: completed.
	if err := d.ckpt.write(&done); err != nil {
		return fail(err)
	}
	sw.lap("completed")
	d.idxMu.Lock()
	d.index[ref.UID] = &done
	d.idxMu.Unlock()
	d.status.set(&done, false)
	return resultOf(&done), nil
}

func (d *Driver) indexed(uid types.UID) *Checkpoint {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	return d.index[uid]
}

func (d *Driver) forget(uid types.UID) {
	d.idxMu.Lock()
	delete(d.index, uid)
	d.idxMu.Unlock()
}

// refreshIndex brings the index in line with the checkpoint directory, which another driver
// instance (a rolling update) may have changed. Entries for the GPUs whose locks the caller holds are
// exact afterwards: every checkpoint of a GPU is written under its lock.
func (d *Driver) refreshIndex() error {
	uids, err := d.ckpt.list()
	if err != nil {
		return fmt.Errorf("listing checkpoints: %w", err)
	}
	onDisk := make(map[types.UID]bool, len(uids))
	var missing []types.UID
	d.idxMu.Lock()
	for _, u := range uids {
		onDisk[u] = true
		if _, ok := d.index[u]; !ok {
			missing = append(missing, u)
		}
	}
	for u := range d.index {
		if !onDisk[u] && !d.inflight[u] {
			delete(d.index, u)
		}
	}
	d.idxMu.Unlock()
	for _, u := range missing {
		c, err := d.ckpt.read(u)
		if errors.Is(err, ErrNoCheckpoint) {
			continue
		}
		if err != nil {
			c = &Checkpoint{Claim: ClaimRef{UID: u}, Phase: "unreadable"}
		}
		d.idxMu.Lock()
		if _, ok := d.index[u]; !ok {
			d.index[u] = c
		}
		d.idxMu.Unlock()
	}
	return nil
}

// conflicts reports whether two prepared devices cannot be used by different claims at once.
func conflicts(a, b PreparedDevice) bool {
	if a.CDI.GPU.UUID != b.CDI.GPU.UUID || a.AdminAccess || b.AdminAccess {
		return false
	}
	if a.Device == b.Device && a.ShareID != "" && b.ShareID != "" {
		return false // both share a time-sliced GPU
	}
	if a.Dynamic != nil && b.Dynamic != nil {
		return a.Dynamic.Placement.Overlaps(b.Dynamic.Placement)
	}
	if a.CDI.MIG != nil && b.CDI.MIG != nil {
		return a.CDI.MIG.GI == b.CDI.MIG.GI && a.CDI.MIG.CI == b.CDI.MIG.CI
	}
	return true
}

// checkInUse refuses devices another claim has prepared: the driver is the last line of defense
// against two workloads on one device. The caller holds the GPUs' locks.
func (d *Driver) checkInUse(c *Checkpoint) error {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	for uid, other := range d.index {
		if uid == c.Claim.UID {
			continue
		}
		for _, od := range other.Devices {
			for _, pd := range c.Devices {
				if conflicts(pd, od) {
					return fmt.Errorf("device %s is in use by claim %s (%s)", pd.Device, other.Claim, od.Device)
				}
			}
		}
	}
	return nil
}

// UnprepareResourceClaims implements kubeletplugin.DRAPlugin. It works from the checkpoints: the
// claims may be gone.
func (d *Driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := make(map[types.UID]error, len(claims))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, c := range claims {
		wg.Go(func() {
			start := time.Now()
			err := d.unprepare(ctx, c)
			d.metrics.observeUnprepare(time.Since(start), err)
			if err != nil {
				klog.FromContext(ctx).Error(err, "Unprepare failed", "claim", c.String())
				err = fmt.Errorf("claim %s: %w", c, err)
			}
			mu.Lock()
			out[c.UID] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	return out, nil
}

// lockCheckpoint reads a claim's checkpoint, takes the locks of its GPUs and reads it again (another
// driver instance may have changed it while this one waited). A claim without checkpoint gives nil.
//
// The GPUs to lock come from the index when it has the claim (the file is read once, under the
// locks); if the file then names other GPUs — another instance prepared the claim again meanwhile —
// the locks are taken again for those.
func (d *Driver) lockCheckpoint(ctx context.Context, uid types.UID) (*Checkpoint, func(), error) {
	var gpus []string
	if c := d.indexed(uid); c != nil && c.Phase != "unreadable" {
		gpus = c.GPUs()
	} else {
		c, err := d.ckpt.read(uid)
		if errors.Is(err, ErrNoCheckpoint) {
			d.forget(uid)
			return nil, func() {}, nil
		}
		if err != nil {
			return nil, nil, err
		}
		gpus = c.GPUs()
	}
	for {
		unlock, err := d.locks.Lock(ctx, gpus)
		if err != nil {
			return nil, nil, err
		}
		c, err := d.ckpt.read(uid)
		if errors.Is(err, ErrNoCheckpoint) {
			d.forget(uid)
			return nil, unlock, nil
		} else if err != nil {
			unlock()
			return nil, nil, err
		}
		if now := c.GPUs(); !slices.Equal(now, gpus) {
			unlock()
			gpus = now
			continue
		}
		return c, unlock, nil
	}
}

func (d *Driver) unprepare(ctx context.Context, obj kubeletplugin.NamespacedObject) error {
	c, unlock, err := d.lockCheckpoint(ctx, obj.UID)
	if err != nil {
		return err
	}
	release := sync.OnceFunc(unlock)
	defer release()
	if c == nil {
		// Never prepared, or unprepared already: make sure nothing is left.
		return d.cdi.RemoveClaimSpec(string(obj.UID))
	}
	if c.Phase == PhaseDestroyPending {
		return nil // unprepared already; retryPending destroys its MIG instance
	}
	if err := d.undo(ctx, c, true); errors.Is(err, nvmlib.ErrInUse) {
		// The claim is done with; its instance is not free yet. Keep it ours and tainted, and report
		// the claim unprepared so the pod can go.
		if err := d.destroyPending(c); err != nil {
			return err
		}
		release() // republishing waits for rebuilds, which take GPU locks
		d.republish(ctx)
	} else if err != nil {
		return err
	}
	d.status.set(c, true)
	klog.FromContext(ctx).V(2).Info("Unprepared", "claim", c.Claim.String(), "devices", len(c.Devices))
	return nil
}
