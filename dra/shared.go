package dra

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/mps"
)

// Environment a container of a share of a shared GPU gets, for information: what it was given.
// With isolation mps the CUDA_MPS_* variables carry the same limits to CUDA.
const (
	EnvMemoryLimitMiB = "TESSERA_MEMORY_LIMIT_MIB"
	EnvComputePercent = "TESSERA_COMPUTE_PERCENT"
)

// shareOf fills a prepared device of a shared GPU from its allocation result: what the claim
// consumed (the scheduler's consumedCapacity; the device's defaults when the result has none) and
// what its container gets. pd.ShareID is set.
func (d *Driver) shareOf(pd *PreparedDevice, dev *Device, r resourceapi.DeviceRequestAllocationResult, cfg *api.GPUConfig, claim types.UID) error {
	c := dev.Capacity
	mem, pct := c.DefaultMemoryBytes, c.DefaultComputePercent
	if q, ok := r.ConsumedCapacity[CapacityMemory]; ok {
		mem = q.Value()
	}
	if q, ok := r.ConsumedCapacity[CapacityComputePercent]; ok {
		pct = int(q.Value())
	}
	switch {
	case mem <= 0 || mem > c.MemoryBytes:
		return fmt.Errorf("device %s: the allocation consumes %d bytes of memory; the device offers 1 to %d", dev.Name, mem, c.MemoryBytes)
	case pct < 1 || pct > 100:
		return fmt.Errorf("device %s: the allocation consumes computePercent %d; the device offers 1 to 100", dev.Name, pct)
	}
	pd.MemoryMiB = uint64((mem + 1<<20 - 1) >> 20)
	pd.ComputePercent = pct
	pd.Isolation = c.Isolation
	base := cdi.WholeGPU(dev.GPU)
	if c.Isolation != api.ModeMPS {
		// Time-slicing: the whole GPU, as a time-sliced GPU gives it; the share is accounted by
		// the scheduler and told to the container, not enforced.
		pd.CDI = base.WithEnv(EnvMemoryLimitMiB+"="+strconv.FormatUint(pd.MemoryMiB, 10), EnvComputePercent+"="+strconv.Itoa(pct))
		return nil
	}
	if d.mps == nil {
		return fmt.Errorf("device %s is shared through MPS, but this driver runs without an MPS manager (start it with --mps-root)", dev.Name)
	}
	own, err := sharedLimits(cfg, dev, pd)
	if err != nil {
		return err
	}
	p := d.mps.PathsFor(dev.GPU.UUID)
	pd.MPSClient = string(claim) + "/" + pd.ShareID
	pd.CDI = base.MPSFraction(cdi.MPS{PipeDir: p.Pipe, ShmDir: p.Shm, ActiveThreadPercentage: own.ActiveThreadPercentage, PinnedMemoryLimitMiB: own.PinnedMemoryMiB}).
		WithEnv(EnvMemoryLimitMiB+"="+strconv.FormatUint(own.PinnedMemoryMiB, 10), EnvComputePercent+"="+strconv.Itoa(own.ActiveThreadPercentage))
	return nil
}

// sharedLimits are a claim's own MPS limits: what it consumed, lowered by its GPUConfig's
// sharing.mps settings if it has any. Raising them is refused: the scheduler accounted what was
// consumed, so a claim that needs more must request more capacity.
func sharedLimits(cfg *api.GPUConfig, dev *Device, pd *PreparedDevice) (mps.Limits, error) {
	own := mps.Limits{ActiveThreadPercentage: pd.ComputePercent, PinnedMemoryMiB: pd.MemoryMiB}
	if cfg == nil || cfg.Sharing == nil || cfg.Sharing.MPS == nil {
		return own, nil
	}
	m := cfg.Sharing.MPS
	if p := m.DefaultActiveThreadPercentage; p != nil {
		if *p > own.ActiveThreadPercentage {
			return own, fmt.Errorf("device %s: sharing.mps.defaultActiveThreadPercentage %d is above the claim's computePercent %d; parameters can only lower a share's limits: lower it, or request more computePercent", dev.Name, *p, own.ActiveThreadPercentage)
		}
		own.ActiveThreadPercentage = *p
	}
	field, q := "sharing.mps.defaultPinnedDeviceMemoryLimit", m.DefaultPinnedDeviceMemoryLimit
	for _, k := range []string{strconv.Itoa(dev.GPU.Index), dev.GPU.UUID} {
		if v, ok := m.DefaultPerDevicePinnedMemoryLimit[k]; ok {
			field, q = "sharing.mps.defaultPerDevicePinnedMemoryLimit["+k+"]", &v
			break
		}
	}
	if q != nil {
		mib := uint64((q.Value() + 1<<20 - 1) >> 20)
		if mib > own.PinnedMemoryMiB {
			return own, fmt.Errorf("device %s: %s %s is above the claim's memory %d MiB; parameters can only lower a share's limits: lower it, or request more memory", dev.Name, field, q.String(), own.PinnedMemoryMiB)
		}
		own.PinnedMemoryMiB = mib
	}
	return own, nil
}

// checkShares is the driver's own accounting of shared GPUs, the last line of defense behind the
// scheduler's: the memory the claims prepared on a shared GPU consumed, with this claim's, fits the
// device, and there are no more claims than maxClients. The caller holds the GPUs' locks.
func (d *Driver) checkShares(c *Checkpoint) error {
	inv := d.inv.Load()
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	for _, pd := range c.Devices {
		if pd.Isolation == "" || pd.AdminAccess {
			continue
		}
		dev, ok := inv.Device(pd.Device)
		if !ok || dev.Capacity == nil {
			continue
		}
		mem, n := pd.MemoryMiB, 1
		for uid, other := range d.index {
			if uid == c.Claim.UID {
				continue
			}
			for _, od := range other.Devices {
				if od.Device == pd.Device && od.CDI.GPU.UUID == pd.CDI.GPU.UUID && od.Isolation != "" && !od.AdminAccess {
					mem += od.MemoryMiB
					n++
				}
			}
		}
		if int64(mem)<<20 > dev.Capacity.MemoryBytes {
			return fmt.Errorf("device %s: the claims prepared on it would consume %d MiB, more than its %d MiB", pd.Device, mem, dev.Capacity.MemoryBytes>>20)
		}
		if dev.Replicas > 0 && n > dev.Replicas {
			return fmt.Errorf("device %s: it would have %d claims, more than maxClients %d", pd.Device, n, dev.Replicas)
		}
	}
	return nil
}

// mpsCeiling is the largest of the MPS limits of the claims prepared (or being prepared) on a GPU,
// leaving out one claim, and how many MPS shares there are. The caller holds the GPU's lock.
func (d *Driver) mpsCeiling(gpu string, skip types.UID) (mps.Limits, int) {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	var l mps.Limits
	n := 0
	for uid, c := range d.index {
		if uid == skip {
			continue
		}
		for _, pd := range c.Devices {
			if pd.MPSClient == "" || pd.CDI.GPU.UUID != gpu || pd.CDI.MPS == nil {
				continue
			}
			n++
			l = maxLimits(l, mps.Limits{ActiveThreadPercentage: pd.CDI.MPS.ActiveThreadPercentage, PinnedMemoryMiB: pd.CDI.MPS.PinnedMemoryLimitMiB})
		}
	}
	return l, n
}

func maxLimits(a, b mps.Limits) mps.Limits {
	return mps.Limits{ActiveThreadPercentage: max(a.ActiveThreadPercentage, b.ActiveThreadPercentage), PinnedMemoryMiB: max(a.PinnedMemoryMiB, b.PinnedMemoryMiB)}
}

// mpsGPUs groups a claim's MPS shares by GPU, in GPU order.
func mpsGPUs(c *Checkpoint) ([]string, map[string][]PreparedDevice) {
	by := map[string][]PreparedDevice{}
	var gpus []string
	for _, pd := range c.Devices {
		if pd.MPSClient == "" {
			continue
		}
		u := pd.CDI.GPU.UUID
		if _, ok := by[u]; !ok {
			gpus = append(gpus, u)
		}
		by[u] = append(by[u], pd)
	}
	slices.Sort(gpus)
	return gpus, by
}

// prepareMPS makes the claim's MPS shares real, under the GPUs' locks and with the claim's
// started checkpoint in the index: the GPU's daemon runs (started or adopted) with the largest
// limits of the GPU's claims — raised before the client is added, so the client's own limits fit
// under them — and each share is a registered client.
func (d *Driver) prepareMPS(ctx context.Context, c *Checkpoint) error {
	gpus, by := mpsGPUs(c)
	for _, gpu := range gpus {
		ceiling, _ := d.mpsCeiling(gpu, "")
		dm, err := d.mps.Ensure(ctx, gpu, mps.Config{Mode: mps.ModeMPS, Limits: ceiling})
		if err != nil {
			return err
		}
		if dm.Limits() != ceiling {
			if err := dm.SetLimits(ctx, ceiling); err != nil {
				return err
			}
		}
		for _, pd := range by[gpu] {
			own := mps.Limits{ActiveThreadPercentage: pd.CDI.MPS.ActiveThreadPercentage, PinnedMemoryMiB: pd.CDI.MPS.PinnedMemoryLimitMiB}
			cl, err := dm.AddClient(ctx, pd.MPSClient, own)
			if err != nil {
				return err
			}
			klog.FromContext(ctx).V(2).Info("MPS client added", "gpu", pd.CDI.GPU.Index, "client", cl.ID, "limits", own.String(), "daemonLimits", ceiling.String(),
				"memory", cl.Enforcement.Memory, "compute", cl.Enforcement.Compute)
		}
	}
	return nil
}

// undoMPS removes a claim's MPS clients and brings each of its GPUs' daemons down to the largest
// remaining claim, stopping the daemon (which restores the GPU's compute mode) when none is left.
// A daemon that no longer runs has nothing to remove; its record is cleared by Stop.
func (d *Driver) undoMPS(ctx context.Context, c *Checkpoint) error {
	gpus, by := mpsGPUs(c)
	if len(gpus) == 0 {
		return nil
	}
	if d.mps == nil {
		return errors.New("the claim has MPS clients, but this driver runs without an MPS manager (start it with --mps-root)")
	}
	for _, gpu := range gpus {
		dm, err := d.mps.Attach(ctx, gpu)
		if err != nil && !errors.Is(err, mps.ErrNotRunning) {
			return err
		}
		rest, n := d.mpsCeiling(gpu, c.Claim.UID)
		registered := 0
		if dm != nil {
			for _, pd := range by[gpu] {
				if err := dm.RemoveClient(ctx, pd.MPSClient); err != nil {
					return err
				}
			}
			// Clients this driver does not know of (another front end's, by mistake) keep their
			// limits: the daemon is never lowered below them.
			for _, cl := range dm.Clients() {
				rest = maxLimits(rest, cl.Limits)
				registered++
			}
		}
		if n == 0 && registered == 0 {
			// A daemon that no longer runs (it died with an earlier container) still lists its
			// clients in its record: clear it, restoring the compute mode, or the claim never
			// unprepares.
			if err := d.mps.Stop(ctx, gpu, mps.StopOptions{Force: dm == nil}); err != nil {
				return err
			}
			continue
		}
		if dm != nil && dm.Limits() != rest {
			if err := dm.SetLimits(ctx, rest); err != nil {
				return err
			}
		}
	}
	return nil
}
