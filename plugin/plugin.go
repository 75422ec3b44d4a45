// Package plugin is Tessera's kubelet device plugin (deviceplugin v1beta1): a drop-in replacement
// for NVIDIA's k8s-device-plugin with the same resource names and config files.
//
// It serves the GPUs a sharing profile gives to the device-plugin owner: whole GPUs, MIG devices
// (strategies none, single, mixed), time-sliced replicas and MPS clients, one gRPC server per
// extended resource. Each server holds its own immutable device table, swapped atomically, so
// Allocate, GetPreferredAllocation and ListAndWatch take no lock, make no NVML or API call and
// never wait for another resource. The control plane (profile changes, kubelet restarts) is
// serialised by one lock that no RPC takes.
//
// Device IDs are UUIDs (or indices) with ::<n> for replicas, so a restarted plugin advertises the
// same IDs. Health comes from health.Monitor: a GPU-wide fault marks the GPU and every replica and
// MIG device on it unhealthy, and recovery marks them healthy again. Which devices are in use comes
// from the kubelet's PodResources API: a profile change that would take away devices in use waits
// for them to be released. See docs/device-plugin.md.
package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// KubeletSocket is the kubelet's registration socket's name in the device plugin directory.
const KubeletSocket = "kubelet.sock"

// EventRecorder posts Events about the node (profile.NewNodeEvents); nil means none.
type EventRecorder interface {
	Event(eventType, reason, message string)
}

// Event reasons of the plugin.
const (
	ReasonGPUNotServed   = "DevicePluginGPUNotServed"
	ReasonChangeDeferred = "DevicePluginChangeDeferred"
)

// Option configures a Plugin.
type Option func(*config)

type config struct {
	dir             string
	cdi             *cdi.Generator
	monitor         *health.Monitor
	mps             *mps.Manager
	mpsAttach       bool
	mpsMultiUser    bool
	inUse           InUse
	replicaPolicy   Policy
	migPolicy       Policy
	events          EventRecorder
	labels          NodeLabeler
	kubeletInterval time.Duration
	pendingInterval time.Duration
	gate            *miggate.Follower
}

// WithDevicePluginDir sets where kubelet.sock is and where the plugin's sockets go
// (default /var/lib/kubelet/device-plugins).
func WithDevicePluginDir(dir string) Option { return func(c *config) { c.dir = dir } }

// WithCDI sets the CDI generator that writes the node spec; without it only the envvar and
// volume-mounts strategies work.
func WithCDI(g *cdi.Generator) Option { return func(c *config) { c.cdi = g } }

// WithHealth sets the health monitor whose changes the plugin advertises. The caller runs it.
func WithHealth(m *health.Monitor) Option { return func(c *config) { c.monitor = m } }

// WithMPS sets the MPS manager for GPUs in mode mps. With attach the plugin only attaches to
// daemons another container runs (tessera mps run); otherwise it starts (or adopts) them itself.
func WithMPS(m *mps.Manager, attach, multiUser bool) Option {
	return func(c *config) { c.mps, c.mpsAttach, c.mpsMultiUser = m, attach, multiUser }
}

// WithInUse sets where the devices in use come from (the kubelet's PodResources API). Without it
// nothing counts as in use, and profile changes apply at once.
func WithInUse(s InUse) Option { return func(c *config) { c.inUse = s } }

// WithPolicies sets how preferred allocation picks replicas (default distributed) and MIG devices
// (default packed).
func WithPolicies(replicas, migDevices Policy) Option {
	return func(c *config) { c.replicaPolicy, c.migPolicy = replicas, migDevices }
}

// WithEvents sets where Events about the node go.
func WithEvents(e EventRecorder) Option { return func(c *config) { c.events = e } }

// WithNodeLabels sets what publishes the node labels after each change.
func WithNodeLabels(l NodeLabeler) Option { return func(c *config) { c.labels = l } }

// WithIntervals sets how often the kubelet socket is checked (default 1s) and how often deferred
// changes are retried (default 5s).
func WithIntervals(kubelet, pending time.Duration) Option {
	return func(c *config) { c.kubeletInterval, c.pendingInterval = kubelet, pending }
}

// Plugin serves a node's device-plugin GPUs to the kubelet.
type Plugin struct {
	lib  nvmlib.Interface
	cfg  config
	inv  *inventory.Inventory
	topo *topology

	// ctl serialises the control plane: Update, retries of deferred changes, kubelet restarts.
	// No RPC takes it.
	ctl     sync.Mutex
	res     *api.Resolution
	snap    *inventory.Snapshot
	gpus    map[int]*gpuState
	servers map[string]*resourceServer
	extras  map[*Device]*deviceExtras
	pending map[int]string
	// rescan are GPUs whose MIG devices the MIG manager changed: re-planned from the hardware as
	// it is, without any change to it (so devices in use do not hold them back).
	rescan map[int]bool
	// extrasSpecs is whether extras hold device specs (passDeviceSpecs when they were computed).
	extrasSpecs bool

	// dirtyMu guards dirty: GPUs to re-plan although their settings did not change (a MIG GPU
	// that recovered from a reset lost its MIG devices). The health path sets it without ctl.
	dirtyMu sync.Mutex
	dirty   map[int]bool

	live      atomic.Pointer[[]*resourceServer]
	unserved  atomic.Pointer[map[int]bool]
	pendingN  atomic.Int64
	healthOff atomic.Bool
	poke      chan struct{}
}

// gpuState is what one GPU serves now.
type gpuState struct {
	digest     string
	assignment api.Assignment
	devices    []*Device
}

// New reads the node's GPUs and their topology once and returns a plugin serving nothing yet;
// Update gives it a profile, Run serves.
func New(ctx context.Context, lib nvmlib.Interface, opts ...Option) (*Plugin, error) {
	cfg := config{dir: pluginapi.DevicePluginPath, replicaPolicy: Distributed, migPolicy: Packed,
		kubeletInterval: time.Second, pendingInterval: 5 * time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.replicaPolicy == "" {
		cfg.replicaPolicy = Distributed
	}
	if cfg.migPolicy == "" {
		cfg.migPolicy = Packed
	}
	inv := inventory.New(lib)
	snap, err := inv.Snapshot(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the node's GPUs: %w", err)
	}
	numa := map[int]int{}
	for _, g := range snap.GPUs {
		numa[g.Index] = g.NUMANode
		if g.Error != "" {
			klog.ErrorS(nil, "GPU cannot be read at start; its devices are unhealthy until it answers again", "gpu", g.Index, "uuid", g.UUID, "error", g.Error)
			if cfg.monitor != nil {
				cfg.monitor.Handle(nvmlib.Event{Time: time.Now(), GPUIndex: g.Index, GPUUUID: g.UUID, Type: nvmlib.EventGPULost, XID: 79, GI: -1, CI: -1})
			}
		}
	}
	p := &Plugin{lib: lib, cfg: cfg, inv: inv, topo: readTopology(lib, numa), snap: snap,
		gpus: map[int]*gpuState{}, servers: map[string]*resourceServer{}, extras: map[*Device]*deviceExtras{},
		pending: map[int]string{}, rescan: map[int]bool{}, dirty: map[int]bool{}, poke: make(chan struct{}, 1)}
	p.live.Store(&[]*resourceServer{})
	p.unserved.Store(&map[int]bool{})
	return p, nil
}

// Dir is the device plugin directory.
func (p *Plugin) Dir() string { return p.cfg.dir }

// Resources lists what is served now: resource → device IDs in advertised order.
func (p *Plugin) Resources() map[string][]string {
	out := map[string][]string{}
	for _, s := range *p.live.Load() {
		out[s.name] = s.table.Load().ids()
	}
	return out
}

// Pending lists the GPUs whose profile change waits for devices in use, with the reason.
func (p *Plugin) Pending() map[int]string {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	return maps.Clone(p.pending)
}

// Update makes the plugin serve a (new) profile resolution. GPUs whose settings did not change keep
// their devices untouched; a GPU whose change would take away devices in use keeps serving them
// and changes once they are released (Run retries). Resources whose devices did not change are not
// touched; changed ones send their new list on ListAndWatch; new ones register; ones left without
// devices are withdrawn. Errors for single GPUs do not stop the others; they are returned joined.
func (p *Plugin) Update(ctx context.Context, res *api.Resolution) error {
	if res == nil {
		return errors.New("no profile resolution")
	}
	if err := p.checkStrategies(res); err != nil {
		return err
	}
	p.ctl.Lock()
	defer p.ctl.Unlock()
	p.res = res
	p.healthOff.Store(res.Health.Disabled)
	if p.cfg.monitor != nil {
		pol, err := policyFor(res.Health)
		if err != nil {
			klog.ErrorS(err, "Health settings of the profile partly applied")
		}
		p.cfg.monitor.SetPolicy(pol)
	}
	err := p.reconcileLocked(ctx)
	if p.cfg.gate != nil {
		p.cfg.gate.Poke() // the GPUs the plugin owns may have changed: tell the MIG manager now
	}
	return err
}

func (p *Plugin) checkStrategies(res *api.Resolution) error {
	for _, s := range res.DevicePlugin.DeviceListStrategy {
		switch s {
		case StrategyCDICRI, StrategyCDIAnnotations:
			if p.cfg.cdi == nil {
				return fmt.Errorf("spec.devicePlugin.deviceListStrategy %s needs CDI specs, but this plugin has no CDI generator (check --cdi-dir and the driver root)", s)
			}
		case StrategyEnvvar, StrategyVolumeMounts:
		default:
			return fmt.Errorf("spec.devicePlugin.deviceListStrategy: unknown strategy %q", s)
		}
	}
	return nil
}

// policyFor is the health policy of a profile's health settings. An XID of the reset class cannot
// be ignored (the GPU is unusable after it); such entries are reported and left out.
func policyFor(h api.HealthSettings) (health.Policy, error) {
	pol := health.DefaultPolicy()
	var errs []error
	for _, x := range h.IgnoredXIDs {
		next, err := pol.WithIgnored(x)
		if err != nil {
			errs = append(errs, fmt.Errorf("spec.health.ignoredXIDs: %w; it stays critical", err))
			continue
		}
		pol = next
	}
	return pol.WithCritical(h.CriticalXIDs...), errors.Join(errs...)
}

// assignmentDigest identifies what of an assignment shapes a GPU's devices.
func assignmentDigest(dp api.DevicePluginSettings, a api.Assignment) string {
	b, _ := json.Marshal(struct {
		UUID      string
		IDs       string
		MIG       string
		Resources *api.ResourceNaming
		Owner     api.Owner
		Mode      api.Mode
		Name      string
		Replicas  int
		Fail      bool
		Clients   []api.MPSClient
		Layout    *api.ResolvedMIG
		Compute   string
	}{a.GPU.UUID, dp.DeviceIDStrategy, dp.MIGStrategy, dp.Resources, a.Owner, a.Mode, a.ResourceName, a.Replicas,
		a.FailRequestsGreaterThanOne, a.MPSClients, a.MIG, a.ComputeMode})
	return string(b)
}

// reconcileLocked brings the served devices to p.res, as far as devices in use allow.
func (p *Plugin) reconcileLocked(ctx context.Context) error {
	res := p.res
	if res == nil {
		return nil
	}
	want := map[int]api.Assignment{}
	for _, a := range res.Owned(api.OwnerDevicePlugin) {
		want[a.GPU.Index] = a
	}
	indices := map[int]bool{}
	for i := range want {
		indices[i] = true
	}
	for i := range p.gpus {
		indices[i] = true
	}
	var inUse map[string]map[string]bool
	var inUseErr error
	if p.cfg.inUse != nil && len(p.gpus) > 0 {
		inUse, inUseErr = p.cfg.inUse.InUse(ctx)
		if inUseErr != nil {
			klog.ErrorS(inUseErr, "Cannot tell which devices are in use; changes to GPUs with devices wait")
		}
	}
	p.dirtyMu.Lock()
	dirty := maps.Clone(p.dirty)
	p.dirtyMu.Unlock()
	var changed, rescanned []int
	for _, i := range slices.Sorted(maps.Keys(indices)) {
		a, owned := want[i]
		digest := ""
		if owned {
			digest = assignmentDigest(res.DevicePlugin, a)
		}
		old := p.gpus[i]
		if old != nil && old.digest == digest && !dirty[i] {
			delete(p.pending, i)
			if p.rescan[i] {
				rescanned = append(rescanned, i)
			}
			continue
		}
		if old == nil && !owned {
			continue
		}
		if old != nil && len(old.devices) > 0 {
			if inUseErr != nil {
				p.defer_(i, "the kubelet's PodResources API cannot be read: "+inUseErr.Error())
				continue
			}
			if busy := devicesInUse(old.devices, inUse); len(busy) > 0 {
				p.defer_(i, fmt.Sprintf("devices in use: %v", busy))
				continue
			}
		}
		delete(p.pending, i)
		p.dirtyMu.Lock()
		delete(p.dirty, i)
		p.dirtyMu.Unlock()
		changed = append(changed, i)
	}
	clear(p.rescan)
	var errs []error
	if len(changed) > 0 || len(rescanned) > 0 {
		hwChanged, err := p.prepareHardware(ctx, changed, want)
		if err != nil {
			errs = append(errs, err)
		}
		if hwChanged || len(dirty) > 0 || len(rescanned) > 0 {
			snap, err := p.inv.Snapshot(ctx)
			if err != nil {
				return fmt.Errorf("reading the node's GPUs: %w", err)
			}
			p.snap = snap
		}
		for _, i := range slices.Sorted(slices.Values(append(changed, rescanned...))) {
			a, owned := want[i]
			old := p.gpus[i]
			if !owned {
				delete(p.gpus, i)
				continue
			}
			st := &gpuState{digest: assignmentDigest(res.DevicePlugin, a), assignment: a}
			p.gpus[i] = st
			g, ok := p.gpuInfo(i)
			if !ok {
				errs = append(errs, p.gpuError(i, fmt.Errorf("GPU %d is not on this node", i)))
				continue
			}
			devs, err := planGPU(res, a, g, p.mpsDirs())
			if err != nil {
				errs = append(errs, p.gpuError(i, err))
				continue
			}
			if old != nil {
				devs = keepSame(old.devices, devs)
			}
			st.devices = devs
		}
	}
	if err := p.publishLocked(ctx, res); err != nil {
		errs = append(errs, err)
	}
	p.pendingN.Store(int64(len(p.pending)))
	return errors.Join(errs...)
}

func (p *Plugin) defer_(gpu int, why string) {
	if p.pending[gpu] != why {
		klog.InfoS("Profile change of a GPU waits until its devices are released", "gpu", gpu, "reason", why)
		if p.cfg.events != nil {
			p.cfg.events.Event("Normal", ReasonChangeDeferred, fmt.Sprintf("GPU %d keeps its current devices until they are released (%s)", gpu, why))
		}
	}
	p.pending[gpu] = why
}

func (p *Plugin) gpuError(gpu int, err error) error {
	klog.ErrorS(err, "GPU not served", "gpu", gpu)
	if p.cfg.events != nil {
		p.cfg.events.Event("Warning", ReasonGPUNotServed, err.Error())
	}
	return err
}

func (p *Plugin) gpuInfo(i int) (inventory.GPU, bool) {
	for _, g := range p.snap.GPUs {
		if g.Index == i {
			return g, true
		}
	}
	return inventory.GPU{}, false
}

func (p *Plugin) mpsDirs() mpsDirs {
	if p.cfg.mps == nil {
		return nil
	}
	return func(uuid string) (string, string) {
		ps := p.cfg.mps.PathsFor(uuid)
		return ps.Pipe, ps.Shm
	}
}

func devicesInUse(devs []*Device, inUse map[string]map[string]bool) []string {
	var out []string
	for _, d := range devs {
		if inUse[d.Resource][d.ID] {
			out = append(out, d.Resource+"="+d.ID)
		}
	}
	return out
}

// keepSame reuses the old Device of every device a re-plan describes identically, so its health and
// identity carry over and unchanged resources need no new list.
func keepSame(old, devs []*Device) []*Device {
	byKey := make(map[string]*Device, len(old))
	for _, d := range old {
		byKey[d.key()] = d
	}
	for i, d := range devs {
		if o, ok := byKey[d.key()]; ok && o.sameAs(d) {
			devs[i] = o
		}
	}
	return devs
}

// prepareHardware makes the changed GPUs ready for their new assignments: MPS daemons stopped or
// started, MIG layouts applied, compute modes set. It reports whether NVML state may have changed.
func (p *Plugin) prepareHardware(ctx context.Context, changed []int, want map[int]api.Assignment) (bool, error) {
	var errs []error
	hw := false
	migCfg := &mig.Config{Version: "v1", MigConfigs: map[string][]mig.DeviceSpec{}}
	const layout = "tessera-device-plugin"
	var migGPUs []int
	for _, i := range changed {
		a, owned := want[i]
		old := p.gpus[i]
		wasMPS := old != nil && old.assignment.Mode == api.ModeMPS
		isMPS := owned && a.Mode == api.ModeMPS
		if wasMPS && !isMPS && p.cfg.mps != nil && !p.cfg.mpsAttach {
			if err := p.cfg.mps.Stop(ctx, old.assignment.GPU.UUID, mps.StopOptions{}); err != nil {
				errs = append(errs, p.gpuError(i, fmt.Errorf("stopping the MPS daemon of GPU %d: %w", i, err)))
			}
			hw = true
		}
		if !owned {
			continue
		}
		switch a.Mode {
		case api.ModeMPS:
			if p.cfg.mps == nil {
				continue // planGPU reports it
			}
			split := mps.Split{}
			for _, c := range a.MPSClients {
				split = append(split, mps.SplitPart{Count: 1, Limits: mps.Limits{ActiveThreadPercentage: c.ActiveThreadPercentage, PinnedMemoryMiB: c.PinnedMemoryMiB}})
			}
			var err error
			if p.cfg.mpsAttach {
				_, err = p.cfg.mps.Attach(ctx, a.GPU.UUID)
			} else {
				_, err = p.cfg.mps.Ensure(ctx, a.GPU.UUID, mps.Config{Limits: split.Ceiling(), Mode: mps.ModeMPS, MultiUser: p.cfg.mpsMultiUser})
				hw = true
			}
			if err != nil {
				errs = append(errs, p.gpuError(i, fmt.Errorf("MPS daemon of GPU %d: %w", i, err)))
			}
		case api.ModeTimeSliced:
			g, err := p.lib.GPU(i)
			if err == nil && g.ComputeMode != nvmlib.ComputeModeDefault {
				klog.InfoS("Setting the compute mode time-slicing needs", "gpu", i, "from", g.ComputeMode, "to", nvmlib.ComputeModeDefault)
				if err := p.lib.SetComputeMode(i, nvmlib.ComputeModeDefault); err != nil {
					errs = append(errs, p.gpuError(i, fmt.Errorf("GPU %d: setting compute mode Default for time-slicing: %w", i, err)))
				}
				hw = true
			}
		case api.ModeMIGStatic:
			if a.MIG == nil || a.MIG.Existing {
				continue
			}
			counts := maps.Clone(a.MIG.Devices)
			if a.MIG.AllOf != "" {
				n, err := p.fitCount(i, a.MIG.AllOf)
				if err != nil {
					errs = append(errs, p.gpuError(i, err))
					continue
				}
				counts = map[string]int{a.MIG.AllOf: n}
			}
			on := true
			migCfg.MigConfigs[layout] = append(migCfg.MigConfigs[layout], mig.DeviceSpec{
				Devices: mig.DeviceList{Indices: []int{i}}, MigEnabled: &on, MigDevices: counts})
			migGPUs = append(migGPUs, i)
		}
	}
	if len(migGPUs) > 0 {
		hw = true
		rep, err := mig.Apply(ctx, p.lib, migCfg, layout, mig.Options{GPUs: migGPUs})
		if err != nil {
			errs = append(errs, fmt.Errorf("applying MIG layouts: %w", err))
		}
		for _, g := range rep.GPUs {
			switch g.Status {
			case mig.StatusRefused, mig.StatusFailed, mig.StatusPendingReset:
				errs = append(errs, p.gpuError(g.GPU, fmt.Errorf("MIG layout of GPU %d: %s: %s", g.GPU, g.Status, g.Message)))
			case mig.StatusChanged:
				klog.InfoS("MIG layout applied", "gpu", g.GPU, "created", len(g.Created), "destroyed", len(g.Destroyed))
			}
		}
	}
	return hw, errors.Join(errs...)
}

// fitCount is how many instances of a MIG profile fit on a GPU ("all-<profile>").
func (p *Plugin) fitCount(gpu int, profile string) (int, error) {
	profs, err := p.lib.MigProfiles(gpu)
	if err != nil {
		return 0, fmt.Errorf("GPU %d: reading MIG profiles: %w", gpu, err)
	}
	for _, pr := range profs {
		if pr.Name == profile {
			return pr.InstanceCount, nil
		}
	}
	return 0, fmt.Errorf("GPU %d offers no MIG profile %s", gpu, profile)
}

// publishLocked writes the CDI spec for every served device, then publishes one table per
// resource: unchanged resources are left alone, changed ones notified, new ones served and
// registered, empty ones withdrawn.
func (p *Plugin) publishLocked(ctx context.Context, res *api.Resolution) error {
	var all []*Device
	for _, i := range slices.Sorted(maps.Keys(p.gpus)) {
		for _, d := range p.gpus[i].devices {
			// Devices the MIG manager holds are not advertised until its change is done.
			if !p.held(d) {
				all = append(all, d)
			}
		}
	}
	var errs []error
	// Extras of devices no longer served are dropped; new ones computed (all of them again when
	// passDeviceSpecs changed).
	if res.DevicePlugin.PassDeviceSpecs != p.extrasSpecs {
		clear(p.extras)
		p.extrasSpecs = res.DevicePlugin.PassDeviceSpecs
	}
	live := make(map[*Device]bool, len(all))
	for _, d := range all {
		live[d] = true
	}
	for d := range p.extras {
		if !live[d] {
			delete(p.extras, d)
		}
	}
	for _, d := range all {
		if _, ok := p.extras[d]; ok {
			continue
		}
		x, err := p.deviceExtras(d, res.DevicePlugin.PassDeviceSpecs)
		if err != nil {
			errs = append(errs, err)
		}
		p.extras[d] = x
	}
	if p.cfg.cdi != nil && len(all) > 0 {
		devs := make([]cdi.Device, 0, len(all))
		seen := map[string]bool{}
		for _, d := range all {
			if n := d.CDI.Name(); !seen[n] {
				seen[n] = true
				devs = append(devs, d.CDI)
			}
		}
		if _, err := p.cfg.cdi.WriteNodeSpec(devs); err != nil {
			return errors.Join(append(errs, fmt.Errorf("writing the CDI node spec: %w", err))...)
		}
	}
	groups := map[string][]*Device{}
	for _, d := range all {
		groups[d.Resource] = append(groups[d.Resource], d)
	}
	resp := response{strategies: res.DevicePlugin.DeviceListStrategy, passDeviceSpecs: res.DevicePlugin.PassDeviceSpecs}
	for name, s := range p.servers {
		if _, ok := groups[name]; !ok {
			s.stop()
			delete(p.servers, name)
			klog.InfoS("Resource withdrawn: no device left", "resource", name)
		}
	}
	kubeletSock := filepath.Join(p.cfg.dir, KubeletSocket)
	kid, kerr := statID(kubeletSock)
	for _, name := range slices.Sorted(maps.Keys(groups)) {
		devs := groups[name]
		r := resp
		r.annotationKey = annotationKey(res.DevicePlugin.CDIAnnotationPrefix, name)
		ex := make(map[*Device]*deviceExtras, len(devs))
		for _, d := range devs {
			ex[d] = p.extras[d]
		}
		t := newDeviceTable(name, devs, ex, r, p.cfg.replicaPolicy, p.cfg.migPolicy, p.topo)
		if s, ok := p.servers[name]; ok {
			same := slices.Equal(s.table.Load().devices, t.devices)
			s.setTable(t, !same)
			if !same {
				klog.InfoS("Resource devices changed", "resource", name, "devices", len(t.devices))
			}
			continue
		}
		s := newResourceServer(name, p.cfg.dir, t)
		if err := s.serve(); err != nil {
			errs = append(errs, err)
			continue
		}
		p.servers[name] = s
		klog.InfoS("Serving resource", "resource", name, "devices", len(t.devices), "socket", s.socket)
		if kerr == nil {
			if err := s.register(ctx, kubeletSock, kid); err != nil {
				klog.ErrorS(err, "Registration failed; retrying", "resource", name)
			}
		}
	}
	unserved := map[int]bool{}
	for i, st := range p.gpus {
		if len(st.devices) == 0 {
			unserved[i] = true
		}
	}
	p.unserved.Store(&unserved)
	list := slices.Collect(maps.Values(p.servers))
	sort.Slice(list, func(i, j int) bool { return list[i].name < list[j].name })
	p.live.Store(&list)
	p.syncHealth()
	if p.cfg.labels != nil {
		if err := p.cfg.labels.Apply(ctx, nodeLabels(res, p.snap, p.gpus)); err != nil {
			klog.ErrorS(err, "Node labels not updated")
		}
	}
	return errors.Join(errs...)
}

// deviceExtras precomputes a device's answer pieces.
func (p *Plugin) deviceExtras(d *Device, passSpecs bool) (*deviceExtras, error) {
	x := &deviceExtras{}
	if p.cfg.cdi != nil {
		x.cdiName = p.cfg.cdi.QualifiedName(d.CDI.Name())
	}
	if d.MPS != nil && d.CDI.MPS != nil {
		mpsExtras(x, *d.MPS, d.CDI.MPS.PipeDir, d.CDI.MPS.ShmDir)
	}
	if passSpecs && p.cfg.cdi != nil {
		edits, err := p.cfg.cdi.DeviceEdits(d.CDI)
		if err != nil {
			return x, fmt.Errorf("device specs of %s: %w", d.ID, err)
		}
		common := p.cfg.cdi.CommonEdits()
		for _, n := range append(common.DeviceNodes, edits.DeviceNodes...) {
			host := n.HostPath
			if host == "" {
				host = n.Path
			}
			x.specs = append(x.specs, &pluginapi.DeviceSpec{ContainerPath: n.Path, HostPath: host, Permissions: "rw"})
		}
	}
	return x, nil
}

// Run serves until ctx ends: it advertises health changes, re-registers when the kubelet restarts
// (a new kubelet.sock) without re-reading NVML, and retries changes that waited for devices in use.
// At the end the plugin's sockets are removed.
func (p *Plugin) Run(ctx context.Context) error {
	if p.cfg.monitor != nil {
		ch, unsub := p.cfg.monitor.Subscribe()
		defer unsub()
		go func() {
			for s := range ch {
				p.healthChanged(s)
			}
		}()
	}
	kt := time.NewTicker(p.cfg.kubeletInterval)
	defer kt.Stop()
	pt := time.NewTicker(p.cfg.pendingInterval)
	defer pt.Stop()
	p.checkKubelet(ctx)
	for {
		select {
		case <-ctx.Done():
			p.shutdown()
			return nil
		case <-kt.C:
			p.checkKubelet(ctx)
		case <-p.poke:
			p.retry(ctx)
		case <-pt.C:
			p.retry(ctx)
		}
	}
}

func (p *Plugin) retry(ctx context.Context) {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	p.dirtyMu.Lock()
	dirty := len(p.dirty)
	p.dirtyMu.Unlock()
	if len(p.pending) == 0 && dirty == 0 {
		return
	}
	if err := p.reconcileLocked(ctx); err != nil {
		klog.ErrorS(err, "Applying a deferred change")
	}
}

// checkKubelet re-creates sockets the kubelet removed and registers every resource not registered
// with the kubelet that owns kubelet.sock now. It uses the device tables as they are: no NVML.
func (p *Plugin) checkKubelet(ctx context.Context) {
	sock := filepath.Join(p.cfg.dir, KubeletSocket)
	id, err := statID(sock)
	if err != nil {
		return
	}
	p.ctl.Lock()
	defer p.ctl.Unlock()
	for _, name := range slices.Sorted(maps.Keys(p.servers)) {
		s := p.servers[name]
		if !s.socketOK() {
			klog.InfoS("Socket gone (kubelet restarted?); serving it again", "resource", name, "socket", s.socket)
			if err := s.serve(); err != nil {
				klog.ErrorS(err, "Cannot serve", "resource", name)
				continue
			}
		}
		if s.needsRegistration(id) {
			if err := s.register(ctx, sock, id); err != nil {
				klog.ErrorS(err, "Registration failed; retrying", "resource", name)
			}
		}
	}
}

func (p *Plugin) shutdown() {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	for _, s := range p.servers {
		s.stop()
	}
}

// healthChanged advertises a health change of a GPU or MIG device on every device cut from it.
func (p *Plugin) healthChanged(s health.Status) {
	for _, srv := range *p.live.Load() {
		changed := false
		for _, d := range srv.table.Load().devices {
			if d.GPU != s.GPU {
				continue
			}
			h := p.deviceHealthy(d)
			if d.healthy.Swap(h) != h {
				changed = true
			}
		}
		if changed {
			srv.notify()
			klog.InfoS("Device health advertised", "resource", srv.name, "gpu", s.GPU, "gi", s.GI, "ci", s.CI, "healthy", s.Healthy, "reason", s.Reason)
		}
	}
	if s.Healthy && s.GI < 0 && (p.servesMIG(s.GPU) || (*p.unserved.Load())[s.GPU]) {
		// A reset clears MIG devices: re-plan (and re-partition) a MIG GPU when it recovers; a GPU
		// that could not be served (lost at start) is planned once it answers.
		p.dirtyMu.Lock()
		p.dirty[s.GPU] = true
		p.dirtyMu.Unlock()
		select {
		case p.poke <- struct{}{}:
		default:
		}
	}
}

// servesMIG reports whether MIG devices of the GPU are served now.
func (p *Plugin) servesMIG(gpu int) bool {
	for _, srv := range *p.live.Load() {
		for _, d := range srv.table.Load().devices {
			if d.GPU == gpu && d.MIG != nil {
				return true
			}
		}
	}
	return false
}

func (p *Plugin) deviceHealthy(d *Device) bool {
	m := p.cfg.monitor
	if m == nil || p.healthOff.Load() {
		return true
	}
	if d.MIG != nil {
		return m.DeviceHealthy(d.GPU, d.MIG.GI, d.MIG.CI)
	}
	return m.GPUHealthy(d.GPU)
}

// syncHealth sets every served device's health from the monitor (after a new table is published,
// so that an event that arrived while planning is not lost).
func (p *Plugin) syncHealth() {
	for _, srv := range *p.live.Load() {
		changed := false
		for _, d := range srv.table.Load().devices {
			h := p.deviceHealthy(d)
			if d.healthy.Swap(h) != h {
				changed = true
			}
		}
		if changed {
			srv.notify()
		}
	}
}
