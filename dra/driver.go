package dra

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/telemetry/startup"
)

// EventRecorder posts Events about the node (profile.NewNodeEvents is the client-go one).
type EventRecorder interface {
	Event(eventType, reason, message string)
}

// Publisher publishes the node's ResourceSlices; kubeletplugin.Helper is the real one.
type Publisher interface {
	PublishResources(ctx context.Context, resources resourceslice.DriverResources) error
}

// Event reasons the driver posts on its Node.
const (
	ReasonModeOff        = "DRAModeTurnedOff"
	ReasonTaintsOff      = "DRADeviceTaintsTurnedOff"
	ReasonGPUNotServed   = "DRAGPUNotPublished"
	ReasonTimeSliceError = "DRATimeSliceFailed"
)

// Option configures a Driver.
type Option func(*Driver) error

// WithNodeName sets the node (and pool) name. Required.
func WithNodeName(name string) Option { return func(d *Driver) error { d.node = name; return nil } }

// WithKubeClient sets the API client (claim status; the helper's claim GETs and slice publishing).
func WithKubeClient(c kubernetes.Interface) Option {
	return func(d *Driver) error { d.client = c; return nil }
}

// WithStatusClient sets a separate API client (its own rate limiter) for claim status writes, so
// they never delay the helper's claim GETs on the Prepare path (default: the kube client).
func WithStatusClient(c kubernetes.Interface) Option {
	return func(d *Driver) error { d.statusClient = c; return nil }
}

// WithStateDir sets where checkpoints and lock files live (persistent across restarts). Required.
func WithStateDir(dir string) Option { return func(d *Driver) error { d.stateDir = dir; return nil } }

// WithCDI sets the CDI generator that writes the per-claim specs. Required.
func WithCDI(g *cdi.Generator) Option { return func(d *Driver) error { d.cdi = g; return nil } }

// WithBootID sets how the node's boot ID is read (default /proc/sys/kernel/random/boot_id; on a
// simulated node sim.Node.BootID).
func WithBootID(fn func() (string, error)) Option {
	return func(d *Driver) error { d.bootIDFn = fn; return nil }
}

// WithTimeSlicer sets what applies time-slice intervals (default: nvidia-smi on PATH).
func WithTimeSlicer(t TimeSlicer) Option { return func(d *Driver) error { d.slicer = t; return nil } }

// WithEvents sets where Events about the node go (default: none).
func WithEvents(e EventRecorder) Option { return func(d *Driver) error { d.events = e; return nil } }

// WithHealth sets the health monitor (health.NewMonitor over the same NVML). Without one, health
// is not reported and devices are never tainted.
func WithHealth(m *health.Monitor) Option { return func(d *Driver) error { d.monitor = m; return nil } }

// WithNoExecute makes health taints NoExecute (the profile's spec.health.noExecute).
func WithNoExecute(on bool) Option {
	return func(d *Driver) error { d.noExecute.Store(on); return nil }
}

// WithMPS sets the MPS manager for GPUs in mode shared with isolation mps: Prepare starts (or
// adopts) the GPU's control daemon, sets its limits to the largest claim's and registers each
// claim as a client; Unprepare removes it and stops the daemon after the last one. Without it such
// claims fail to prepare.
func WithMPS(m *mps.Manager) Option { return func(d *Driver) error { d.mps = m; return nil } }

// WithVersion sets the driver release recorded in checkpoints.
func WithVersion(v string) Option { return func(d *Driver) error { d.version = v; return nil } }

// WithStartup records Start's phases (the first publish, the kubelet plugin's sockets and
// registration, the helper's ResourceSlice controller taking over) in the daemon's start-up record.
func WithStartup(p *startup.Phases) Option {
	return func(d *Driver) error { d.startup = p; return nil }
}

// WithSysfsRoot sets the sysfs the PCIe root complexes are read from (default /sys).
func WithSysfsRoot(dir string) Option { return func(d *Driver) error { d.sysfsRoot = dir; return nil } }

// WithResyncInterval sets how often the node's GPUs are read again to catch MIG devices created
// or removed outside the driver (default 30s; 0 turns it off).
func WithResyncInterval(iv time.Duration) Option {
	return func(d *Driver) error { d.resync = iv; return nil }
}

// WithHealthResend sets how often WatchHealthStatus repeats its report (default 10s); the kubelet
// treats health older than 3× this as unknown.
func WithHealthResend(iv time.Duration) Option {
	return func(d *Driver) error { d.healthResend = iv; return nil }
}

// Driver is the DRA kubelet plugin. It implements kubeletplugin.DRAPlugin.
type Driver struct {
	static       staticSpec
	lib          nvmlib.Interface
	reader       *inventory.Inventory
	node         string
	client       kubernetes.Interface
	statusClient kubernetes.Interface
	stateDir     string
	cdi          *cdi.Generator
	bootIDFn     func() (string, error)
	slicer       TimeSlicer
	events       EventRecorder
	monitor      *health.Monitor
	mps          *mps.Manager
	gate         *miggate.Follower
	noExecute    atomic.Bool
	version      string
	startup      *startup.Phases
	sysfsRoot    string
	resync       time.Duration
	healthResend time.Duration

	bootID string
	ckpt   *checkpoints
	locks  *gpuLocks
	status *statusWriter
	hooks  hooks

	// What is published: rebuilt under rebuildMu, read lock-free by Prepare.
	inv       atomic.Pointer[Inventory]
	res       atomic.Pointer[api.Resolution]
	rebuildMu sync.Mutex
	features  Features
	published *resourceslice.DriverResources
	// publishedInv is the inventory of the slices published last (nil: none yet).
	publishedInv *Inventory
	publisher    Publisher
	withheldLast []string
	skipped      map[int]string
	hidden       []string
	timeSliced   map[int]api.TimeSliceInterval
	pcieRoots    sync.Map // bus ID → root ("" when unknown)

	// index caches the checkpoints (claim → devices) for the in-use check and Unprepare.
	idxMu    sync.Mutex
	index    map[types.UID]*Checkpoint
	inflight map[types.UID]bool

	metrics *Metrics
	helper  *kubeletplugin.Helper
	cancel  context.CancelFunc
	done    <-chan struct{}
	wg      sync.WaitGroup
}

// hooks let tests crash a Prepare between its phases.
type hooks struct {
	afterStarted    func(ClaimRef) error // after the started checkpoint, before any change
	beforeCompleted func(ClaimRef) error // after every change, before the completed checkpoint
}

var _ kubeletplugin.DRAPlugin = (*Driver)(nil)

// New opens the driver's state and reconciles it with the node: half-done prepares are rolled back,
// prepares of an earlier boot dropped, and missing CDI specs of prepared claims written again.
// SetResolution then says which GPUs to publish, and Start serves the kubelet.
func New(ctx context.Context, lib nvmlib.Interface, opts ...Option) (*Driver, error) {
	d := &Driver{
		lib: lib, reader: inventory.New(lib), version: "dev", sysfsRoot: "/sys",
		resync: 30 * time.Second, healthResend: 10 * time.Second,
		index: map[types.UID]*Checkpoint{}, inflight: map[types.UID]bool{},
		skipped: map[int]string{}, timeSliced: map[int]api.TimeSliceInterval{}, metrics: newMetrics(),
	}
	for _, o := range opts {
		if err := o(d); err != nil {
			return nil, err
		}
	}
	switch {
	case d.node == "":
		return nil, errors.New("dra: no node name")
	case d.stateDir == "":
		return nil, errors.New("dra: no state directory")
	case d.cdi == nil:
		return nil, errors.New("dra: no CDI generator")
	}
	if d.bootIDFn == nil {
		d.bootIDFn = ReadBootID
	}
	if d.slicer == nil {
		d.slicer = NvidiaSMI{Path: "nvidia-smi"}
	}
	var err error
	if d.bootID, err = d.bootIDFn(); err != nil {
		return nil, fmt.Errorf("dra: reading the boot ID: %w", err)
	}
	if d.ckpt, err = newCheckpoints(filepath.Join(d.stateDir, "checkpoints")); err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	if d.locks, err = newGPULocks(filepath.Join(d.stateDir, "locks")); err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	if d.statusClient == nil {
		d.statusClient = d.client
	}
	if d.statusClient != nil {
		d.status = newStatusWriter(d.statusClient, d.node)
	}
	if err := d.reconcile(ctx); err != nil {
		d.locks.Close()
		return nil, fmt.Errorf("dra: start-up reconciliation: %w", err)
	}
	return d, nil
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// ReadBootID reads the node's boot ID from /proc/sys/kernel/random/boot_id.
func ReadBootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b)), err
}

// BootID is the boot ID the driver runs under.
func (d *Driver) BootID() string { return d.bootID }

// Metrics returns the driver's metrics.
func (d *Driver) Metrics() *Metrics { return d.metrics }

// Inventory returns what is published now.
func (d *Driver) Inventory() *Inventory { return d.inv.Load() }

// allGPUs lists the UUIDs of the node's GPUs.
func (d *Driver) allGPUs(ctx context.Context) []string {
	snap, err := d.reader.Snapshot(ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, g := range snap.GPUs {
		if g.UUID != "" {
			out = append(out, g.UUID)
		}
	}
	return out
}

// reconcile runs at start, holding every GPU's lock (so a driver instance still running during a
// rolling update is not in the middle of a Prepare or Unprepare): it finishes what a crash or reboot
// left.
func (d *Driver) reconcile(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	// Which GPUs to lock: the node's, and any a checkpoint names (a GPU since removed).
	gpus := d.allGPUs(ctx)
	uids, err := d.ckpt.list()
	if err != nil {
		return err
	}
	for _, uid := range uids {
		if c, err := d.ckpt.read(uid); err == nil {
			gpus = append(gpus, c.GPUs()...)
		}
	}
	unlock, err := d.locks.Lock(ctx, gpus)
	if err != nil {
		return err
	}
	defer unlock()
	// Under the locks nothing else writes checkpoints or specs: read them again, for good.
	d.ckpt.cleanTemp()
	if uids, err = d.ckpt.list(); err != nil {
		return err
	}
	var cps []*Checkpoint
	for _, uid := range uids {
		c, err := d.ckpt.read(uid)
		if err != nil {
			// Damaged, or written by a newer driver: leave it (and its spec) for a human or that driver.
			logger.Error(err, "Checkpoint cannot be used; leaving it and its CDI spec in place", "claim", uid)
			d.index[uid] = &Checkpoint{Claim: ClaimRef{UID: uid}, Phase: "unreadable"}
			continue
		}
		cps = append(cps, c)
	}
	var keep []string
	for uid, c := range d.index {
		if c.Phase == "unreadable" {
			keep = append(keep, string(uid))
		}
	}
	// Claims that stay prepared are indexed before any interrupted prepare is rolled back: undoing
	// one asks whether other claims still share its GPU (its interval, its MPS daemon).
	slices.SortStableFunc(cps, func(a, b *Checkpoint) int {
		return cmpBool(a.BootID == d.bootID && a.Phase == PhaseStarted, b.BootID == d.bootID && b.Phase == PhaseStarted)
	})
	for _, c := range cps {
		switch {
		case c.BootID != d.bootID:
			// Prepared in an earlier boot: its spec lived in a tmpfs and its MIG devices may be gone.
			// The kubelet prepares the claim again for a pod that still needs it.
			logger.Info("Dropping a claim prepared in an earlier boot", "claim", c.Claim.String(), "bootID", c.BootID, "phase", c.Phase)
			if err := d.undo(ctx, c, false); err != nil {
				return err
			}
		case c.Phase == PhaseDestroyPending:
			// Unprepared, but its MIG instance was still in use: keep trying (retryPending).
			d.index[c.Claim.UID] = c
			keep = append(keep, string(c.Claim.UID))
		case c.Phase != PhaseCompleted:
			logger.Info("Rolling back a prepare interrupted between its phases", "claim", c.Claim.String(), "phase", c.Phase)
			if err := d.undo(ctx, c, true); errors.Is(err, nvmlib.ErrInUse) {
				if err := d.destroyPending(c); err != nil {
					return err
				}
				keep = append(keep, string(c.Claim.UID))
			} else if err != nil {
				return err
			}
		default:
			if err := d.ensureSpec(c); err != nil {
				return err
			}
			d.index[c.Claim.UID] = c
			keep = append(keep, string(c.Claim.UID))
		}
	}
	// The static spec for the prepared claims' devices (the node's own join when it is read).
	if err := d.syncStaticSpec(); err != nil {
		return err
	}
	removed, err := d.cdi.CleanupStale(cdi.Stale{Claims: true, KeepClaims: keep})
	for _, r := range removed {
		logger.Info("Removed a CDI spec no prepared claim owns", "path", r)
	}
	if err != nil {
		logger.Error(err, "Cleaning up stale CDI specs")
	}
	logger.Info("Checkpoints reconciled", "prepared", len(keep), "bootID", d.bootID)
	return nil
}

// undo removes what a (partial) prepare made — its CDI spec, its MPS clients (lowering the
// daemon's limits, stopping it after the last client) and, when restore is set, the time-slice
// intervals its parameters set and the MIG instances it created — then its checkpoint. An instance
// still in use leaves the checkpoint in place and returns an error matching nvmlib.ErrInUse (see
// destroyPending).
func (d *Driver) undo(ctx context.Context, c *Checkpoint, restore bool) error {
	if err := d.cdi.RemoveClaimSpec(string(c.Claim.UID)); err != nil {
		return fmt.Errorf("claim %s: %w", c.Claim, err)
	}
	if err := d.undoMPS(ctx, c); err != nil {
		return fmt.Errorf("claim %s: %w", c.Claim, err)
	}
	if restore {
		var inUse error
		for _, dev := range c.Devices {
			if dev.Dynamic == nil {
				continue
			}
			if err := destroyDynamic(d.lib, dev.CDI.GPU.Index, *dev.Dynamic); errors.Is(err, nvmlib.ErrInUse) {
				inUse = errors.Join(inUse, err)
			} else if err != nil {
				return fmt.Errorf("claim %s: %w", c.Claim, err)
			}
		}
		if inUse != nil {
			return fmt.Errorf("claim %s: %w", c.Claim, inUse)
		}
		for _, dev := range c.Devices {
			if dev.Interval == "" || (dev.ShareID != "" && d.othersOnGPU(c.Claim.UID, dev.CDI.GPU.UUID)) {
				continue // a GPU still shared keeps its interval until the last claim goes
			}
			if err := d.slicer.SetTimeSlice(ctx, dev.CDI.GPU.Index, api.IntervalDefault); err != nil {
				return fmt.Errorf("claim %s: restoring the time-slice interval: %w", c.Claim, err)
			}
		}
	}
	if err := d.ckpt.remove(c.Claim.UID); err != nil {
		return err
	}
	d.idxMu.Lock()
	delete(d.index, c.Claim.UID)
	d.idxMu.Unlock()
	return nil
}

// othersOnGPU reports whether a claim other than uid has devices on the GPU.
func (d *Driver) othersOnGPU(uid types.UID, gpuUUID string) bool {
	d.idxMu.Lock()
	defer d.idxMu.Unlock()
	for u, c := range d.index {
		if u == uid {
			continue
		}
		for _, pd := range c.Devices {
			if pd.CDI.GPU.UUID == gpuUUID {
				return true
			}
		}
	}
	return false
}

// ensureSpec writes a prepared claim's CDI spec again if it is missing (for the devices not answered
// from the static spec; see ensureStaticSpec for those).
func (d *Driver) ensureSpec(c *Checkpoint) error {
	c, ok := d.claimSpecDevices(c)
	if !ok {
		return nil
	}
	if _, err := os.Stat(filepath.Join(d.cdi.SpecDir(), d.cdi.ClaimSpecName(string(c.Claim.UID)))); err == nil {
		return nil
	}
	devs, _ := specDevices(c)
	if _, err := d.cdi.WriteClaimSpec(string(c.Claim.UID), devs); err != nil {
		return fmt.Errorf("writing the missing CDI spec of prepared claim %s: %w", c.Claim, err)
	}
	klog.InfoS("Wrote the missing CDI spec of a prepared claim", "claim", c.Claim.String())
	return nil
}

// specDevices lists the distinct CDI devices of a claim (a claim may be given one shared device
// twice, under two share IDs) and, per prepared device, its position in that list.
func specDevices(c *Checkpoint) ([]cdi.Device, []int) {
	var devs []cdi.Device
	at := make([]int, len(c.Devices))
	seen := map[string]int{}
	for i, pd := range c.Devices {
		n := pd.CDI.Name()
		j, ok := seen[n]
		if !ok {
			j = len(devs)
			seen[n] = j
			devs = append(devs, pd.CDI)
		}
		at[i] = j
	}
	return devs, at
}

// SetResolution applies a (new) sharing profile resolution: the driver publishes the GPUs it gives
// to `dra`, and applies the intervals of time-sliced GPUs.
func (d *Driver) SetResolution(ctx context.Context, res *api.Resolution) error {
	d.res.Store(res)
	d.noExecute.Store(res.Health.NoExecute)
	if d.monitor != nil {
		p, err := HealthPolicy(res.Health)
		if err != nil {
			klog.FromContext(ctx).Error(err, "Health settings of the sharing profile not applied; keeping the previous ones")
		} else {
			d.monitor.SetPolicy(p)
		}
	}
	err := d.rebuild(ctx)
	if d.gate != nil {
		d.gate.Poke() // the GPUs the driver owns may have changed: tell the MIG manager now
	}
	return err
}

// rebuild reads the node again and publishes what changed.
func (d *Driver) rebuild(ctx context.Context) error {
	res := d.res.Load()
	if res == nil {
		return errors.New("dra: no sharing profile resolution yet")
	}
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	snap, err := d.reader.Snapshot(ctx)
	if err != nil {
		return fmt.Errorf("dra: reading the node's GPUs: %w", err)
	}
	if d.ensureMIGMode(ctx, snap, res) {
		if snap, err = d.reader.Snapshot(ctx); err != nil {
			return fmt.Errorf("dra: reading the node's GPUs: %w", err)
		}
	}
	// The GPU instances are read before the claims' own list: an instance a Prepare makes in between
	// is then in both or in neither, never foreign.
	instances := map[int][]nvmlib.GpuInstance{}
	instErr := map[int]error{}
	for _, g := range snap.GPUs {
		if g.MigEnabled && g.Error == "" {
			instances[g.Index], instErr[g.Index] = d.lib.GpuInstances(g.Index)
		}
	}
	owned := d.ownedInstances()
	inv := Build(BuildInput{Pool: d.node, Snapshot: snap, Resolution: res, Profiles: d.lib.MigProfiles,
		Instances: func(i int) ([]nvmlib.GpuInstance, error) {
			if gis, ok := instances[i]; ok || instErr[i] != nil {
				return gis, instErr[i]
			}
			return d.lib.GpuInstances(i)
		}, Owned: owned, Features: d.features})
	// The MIG manager's holds, read under rebuildMu: a rebuild that starts after the follower stored
	// new holds publishes without the devices they cover.
	inv = inv.withhold(d.gateHolds())
	d.inv.Store(inv)
	if err := d.syncStaticSpec(); err != nil {
		// Prepare then writes claim specs for the devices the static spec lacks.
		klog.FromContext(ctx).Error(err, "Writing the CDI static spec")
	}
	d.reportSkipped(inv)
	d.reportHidden(inv)
	d.reportWithheld(ctx, inv)
	d.applyIntervals(ctx, inv)
	return d.publishLocked(ctx)
}

func (d *Driver) reportSkipped(inv *Inventory) {
	now := map[int]string{}
	for _, s := range inv.Skipped {
		now[s.GPU] = s.Reason
		if d.skipped[s.GPU] != s.Reason {
			klog.InfoS("GPU owned by DRA is not published", "gpu", s.GPU, "mode", s.Mode, "reason", s.Reason)
			d.event("Warning", ReasonGPUNotServed, fmt.Sprintf("GPU %d (mode %s) is not published: %s", s.GPU, s.Mode, s.Reason))
		}
	}
	d.skipped = now
}

// applyIntervals sets the interval of each time-sliced GPU whose interval is new, under its lock.
func (d *Driver) applyIntervals(ctx context.Context, inv *Inventory) {
	uuids := map[int]string{}
	for _, dev := range inv.Devices {
		uuids[dev.GPU.Index] = dev.GPU.UUID
	}
	idx := slices.Sorted(func(yield func(int) bool) {
		for i := range inv.TimeSliced {
			if !yield(i) {
				return
			}
		}
	})
	for _, i := range idx {
		iv := inv.TimeSliced[i]
		if prev, ok := d.timeSliced[i]; ok && prev == iv {
			continue
		}
		unlock, err := d.locks.Lock(ctx, []string{uuids[i]})
		if err != nil {
			klog.ErrorS(err, "Time-slice interval not applied", "gpu", i)
			continue
		}
		err = d.slicer.SetTimeSlice(ctx, i, iv)
		unlock()
		if err != nil {
			klog.ErrorS(err, "Time-slice interval not applied", "gpu", i, "interval", iv)
			d.event("Warning", ReasonTimeSliceError, fmt.Sprintf("GPU %d: time-slice interval %s not applied: %v", i, iv, err))
			continue
		}
		klog.InfoS("Time-slice interval applied", "gpu", i, "interval", iv)
		d.timeSliced[i] = iv
	}
	for i := range d.timeSliced {
		if _, ok := inv.TimeSliced[i]; !ok {
			delete(d.timeSliced, i)
		}
	}
}

func (d *Driver) event(typ, reason, msg string) {
	if d.events != nil {
		d.events.Event(typ, reason, msg)
	}
}

// SetPublisher sets where slices go and publishes the current ones (Start does this with the helper).
func (d *Driver) SetPublisher(ctx context.Context, p Publisher) error {
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	d.publisher = p
	d.published = nil
	return d.publishLocked(ctx)
}

// publishLocked publishes the current inventory with its health taints if it differs from what was
// published last. rebuildMu is held.
func (d *Driver) publishLocked(ctx context.Context) error {
	inv := d.inv.Load()
	if d.publisher == nil || inv == nil {
		return nil
	}
	dr := inv.DriverResources(d.taints(inv), d.attrOptions())
	if d.published != nil && reflect.DeepEqual(*d.published, dr) {
		d.publishedInv = inv
		return nil
	}
	if err := d.publisher.PublishResources(ctx, dr); err != nil {
		return fmt.Errorf("dra: publishing ResourceSlices: %w", err)
	}
	d.published, d.publishedInv = &dr, inv
	n := 0
	for _, s := range dr.Pools[d.node].Slices {
		n += len(s.Devices)
	}
	d.metrics.setPublished(n)
	klog.FromContext(ctx).V(2).Info("ResourceSlices published", "pool", d.node, "slices", len(dr.Pools[d.node].Slices), "devices", n)
	return nil
}

// republish publishes again (after a health change).
func (d *Driver) republish(ctx context.Context) {
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	if err := d.publishLocked(ctx); err != nil {
		klog.FromContext(ctx).Error(err, "Publishing after a health change")
	}
}

func (d *Driver) pcieRoot(bus string) string {
	if v, ok := d.pcieRoots.Load(bus); ok {
		return v.(string)
	}
	root := ""
	attr, err := deviceattribute.GetPCIeRootAttributeByPCIBusID(bus, deviceattribute.WithFSFromRoot(d.sysfsRoot))
	if err == nil && attr.Value.StringValue != nil {
		root = *attr.Value.StringValue
	} else {
		klog.V(2).InfoS("PCIe root complex unknown; the device is published without resource.kubernetes.io/pcieRoot", "pciBusID", bus, "err", err)
	}
	d.pcieRoots.Store(bus, root)
	return root
}

// HandleError implements kubeletplugin.DRAPlugin. A slice the API server stored without some of
// its fields (an older cluster, or a feature turned off) turns off what depends on them on this node,
// with an Event, and the driver publishes again without it instead of publishing wrong slices.
func (d *Driver) HandleError(ctx context.Context, err error, msg string) {
	var dropped *resourceslice.DroppedFieldsError
	if errors.As(err, &dropped) {
		feats := dropped.DisabledFeatures()
		changed := false
		d.rebuildMu.Lock()
		for _, f := range feats {
			switch f {
			case "DRAConsumableCapacity":
				if !d.features.NoTimeSliced {
					d.features.NoTimeSliced, changed = true, true
					d.event("Warning", ReasonModeOff, "the API server dropped allowMultipleAllocations from our ResourceSlices (feature DRAConsumableCapacity is off): modes time-sliced and shared are turned off on this node; their GPUs are not published")
				}
			case "DRAPartitionableDevices":
				if !d.features.NoPartitionable {
					d.features.NoPartitionable, changed = true, true
					d.event("Warning", ReasonModeOff, "the API server dropped shared counters from our ResourceSlices (feature DRAPartitionableDevices is off): mode mig-dynamic is turned off on this node; its GPUs are not published")
				}
			case "DRAPartitionableDevicesType":
				// Alpha in Kubernetes 1.37: the slices mean the same without it.
				if !d.features.NoPartitionType {
					d.features.NoPartitionType, changed = true, true
					klog.FromContext(ctx).Info("The API server does not keep partitionTypeAttribute (feature DRAPartitionableDevicesType is off); publishing without it")
				}
			case "DRADeviceTaints":
				if !d.features.NoTaints {
					d.features.NoTaints, changed = true, true
					d.event("Warning", ReasonTaintsOff, "the API server dropped device taints from our ResourceSlices (feature DRADeviceTaints is off): unhealthy devices are no longer tainted; their health still reaches the kubelet")
				}
			}
		}
		d.rebuildMu.Unlock()
		if slices.Equal(feats, []string{"DRAPartitionableDevicesType"}) {
			klog.FromContext(ctx).V(2).Info("ResourceSlice stored without partitionTypeAttribute", "turnedOff", changed)
		} else {
			klog.FromContext(ctx).Error(err, "ResourceSlice stored without some fields", "disabledFeatures", feats, "turnedOff", changed)
		}
		if changed {
			// Not from this goroutine: the slice controller is calling us.
			go func() {
				if err := d.rebuild(context.WithoutCancel(ctx)); err != nil {
					klog.ErrorS(err, "Publishing without the dropped fields")
				}
			}()
		}
		return
	}
	utilruntime.HandleErrorWithContext(ctx, err, msg)
	if !errors.Is(err, kubeletplugin.ErrRecoverable) && d.cancel != nil {
		klog.FromContext(ctx).Error(err, "Fatal error; stopping the driver", "msg", msg)
		d.cancel()
	}
}

// Features returns what is turned off.
func (d *Driver) Features() Features {
	d.rebuildMu.Lock()
	defer d.rebuildMu.Unlock()
	return d.features
}

// Start serves the kubelet through the kubeletplugin helper (prepare and unprepare calls run
// concurrently: the helper's serialization is off), publishes the slices and runs the background
// work (claim status, health, resync) until ctx ends or Stop.
func (d *Driver) Start(ctx context.Context, opts ...kubeletplugin.Option) error {
	ctx, d.cancel = context.WithCancel(ctx)
	d.done = ctx.Done()
	base := []kubeletplugin.Option{
		kubeletplugin.DriverName(DriverName), kubeletplugin.NodeName(d.node),
		kubeletplugin.KubeClient(d.client), kubeletplugin.Serialize(false),
	}
	if d.monitor == nil {
		base = append(base, kubeletplugin.HealthService(false))
	}
	if inv := d.inv.Load(); inv != nil {
		d.rebuildMu.Lock()
		dr := inv.DriverResources(d.taints(inv), d.attrOptions())
		d.rebuildMu.Unlock()
		d.firstPublish(ctx, dr)
	}
	d.startup.Mark("first-publish")
	h, err := kubeletplugin.Start(ctx, d, append(base, opts...)...)
	if err != nil {
		d.cancel()
		return fmt.Errorf("dra: starting the kubelet plugin: %w", err)
	}
	d.helper = h
	d.startup.Mark("kubelet-plugin")
	d.Run(ctx)
	// The helper's ResourceSlice controller takes over the slices; it waits for its informer in
	// one-second steps before it returns.
	if err := d.SetPublisher(ctx, h); err != nil {
		return err
	}
	d.startup.Mark("slice-controller")
	return nil
}

// Run starts the background work without the helper (Start calls it; tests use it alone).
func (d *Driver) Run(ctx context.Context) {
	if d.status != nil {
		d.wg.Go(func() { d.status.run(ctx, 4) })
	}
	if d.monitor != nil {
		d.wg.Go(func() {
			if err := d.monitor.Run(ctx); err != nil {
				klog.FromContext(ctx).Error(err, "Health monitor stopped")
			}
		})
		d.wg.Go(func() { d.watchTaints(ctx) })
	}
	if d.gate != nil {
		d.wg.Go(func() { d.gate.Run(ctx, d.applyMIGGate, d.reportMIGGate) })
	}
	if d.resync > 0 {
		d.wg.Go(func() {
			t := time.NewTicker(d.resync)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					d.retryPending(ctx)
					if err := d.rebuild(ctx); err != nil {
						klog.FromContext(ctx).Error(err, "Resync")
					}
				}
			}
		})
	}
}

// Done is closed when the driver stopped serving: its context ended, or a fatal error stopped it.
func (d *Driver) Done() <-chan struct{} { return d.done }

// Stop stops serving and waits for the background work.
func (d *Driver) Stop() {
	if d.cancel != nil {
		d.cancel()
	}
	if d.helper != nil {
		d.helper.Stop()
	}
	d.wg.Wait()
	d.locks.Close()
}
