package mig

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Options change how a layout is applied.
type Options struct {
	// DryRun plans and reports without changing anything.
	DryRun bool
	// Force destroys instances that processes are using (NVML may still refuse).
	Force bool
	// GPUs limits the change to these indices (nil: every GPU the layout selects). Used by callers
	// that own only some GPUs.
	GPUs []int
}

// Status is the outcome for one GPU.
type Status string

// Outcomes.
const (
	StatusUnchanged    Status = "unchanged"
	StatusChanged      Status = "changed"
	StatusPlanned      Status = "planned" // dry run: would change
	StatusPendingReset Status = "pending-reset"
	StatusNotSelected  Status = "not-selected"
	StatusRefused      Status = "refused"
	StatusFailed       Status = "failed"
)

// GPUResult says what happened to one GPU.
type GPUResult struct {
	GPU       int        `json:"gpu"`
	Product   string     `json:"product"`
	Status    Status     `json:"status"`
	MIG       bool       `json:"migEnabled"`
	Layout    []Instance `json:"layout,omitempty"`
	Created   []Instance `json:"created,omitempty"`
	Destroyed []Instance `json:"destroyed,omitempty"`
	// ModeChange is set when the GPU's MIG mode changes (or, in a dry run, would change).
	ModeChange bool   `json:"modeChange,omitempty"`
	Message    string `json:"message,omitempty"`
}

// Report is the outcome for the node.
type Report struct {
	Config string      `json:"config"`
	DryRun bool        `json:"dryRun"`
	GPUs   []GPUResult `json:"gpus"`
}

// OK reports whether every selected GPU reached (or, in a dry run, can reach) its layout.
func (r Report) OK() bool {
	for _, g := range r.GPUs {
		switch g.Status {
		case StatusRefused, StatusFailed, StatusPendingReset:
			return false
		}
	}
	return true
}

// desired is what one GPU should look like.
type desired struct {
	entry  string
	mig    bool
	counts map[string]int
	pinned []PinnedPlacement
}

// Select maps each GPU to the entry of the named layout that selects it. A GPU selected by two
// entries is an error naming both.
func Select(cfg *Config, name string, gpus []nvmlib.GPU) (map[int]desired, error) {
	entries, ok := cfg.MigConfigs[name]
	if !ok {
		return nil, fmt.Errorf("no MIG layout %q; the config has %s", name, strings.Join(cfg.Names(), ", "))
	}
	out := map[int]desired{}
	for i, e := range entries {
		label := fmt.Sprintf("mig-configs.%s[%d] (line %d)", name, i, e.line)
		for _, idx := range e.Devices.Indices {
			if idx >= len(gpus) {
				return nil, fmt.Errorf("%s: devices: GPU %d does not exist; the node has GPUs 0 to %d", label, idx, len(gpus)-1)
			}
		}
		for _, g := range gpus {
			if !e.Devices.All && !contains(e.Devices.Indices, g.Index) {
				continue
			}
			if len(e.DeviceFilter) > 0 && !matchesFilter(e.DeviceFilter, g) {
				continue
			}
			if prev, ok := out[g.Index]; ok {
				return nil, fmt.Errorf("GPU %d is selected by both %s and %s: make the entries' devices or device-filter disjoint", g.Index, prev.entry, label)
			}
			if *e.MigEnabled && !g.MigCapable {
				return nil, fmt.Errorf("%s: GPU %d (%s) is not MIG-capable: exclude it with devices or device-filter", label, g.Index, g.ProductName)
			}
			out[g.Index] = desired{entry: label, mig: *e.MigEnabled, counts: e.MigDevices, pinned: e.Placements}
		}
	}
	return out, nil
}

func matchesFilter(f StringList, g nvmlib.GPU) bool {
	for _, v := range f {
		if strings.HasPrefix(v, "0x") {
			if id, err := strconv.ParseUint(v[2:], 16, 32); err == nil && uint32(id) == g.PCIDeviceID {
				return true
			}
		} else if strings.EqualFold(v, g.ProductName) {
			return true
		}
	}
	return false
}

func contains(xs []int, x int) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// Apply makes the node's MIG layout match layout `name` of cfg. GPUs are handled concurrently and
// independently: a refusal or failure on one GPU does not stop the others.
func Apply(ctx context.Context, lib nvmlib.Interface, cfg *Config, name string, opts Options) (Report, error) {
	n, err := lib.DeviceCount()
	if err != nil {
		return Report{}, err
	}
	gpus := make([]nvmlib.GPU, n)
	for i := range n {
		if gpus[i], err = lib.GPU(i); err != nil {
			return Report{}, fmt.Errorf("reading GPU %d: %w", i, err)
		}
	}
	want, err := Select(cfg, name, gpus)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Config: name, DryRun: opts.DryRun, GPUs: make([]GPUResult, n)}
	var wg sync.WaitGroup
	for i, g := range gpus {
		d, selected := want[i]
		if opts.GPUs != nil && !contains(opts.GPUs, i) {
			selected = false
		}
		if !selected {
			rep.GPUs[i] = GPUResult{GPU: i, Product: g.ProductName, Status: StatusNotSelected, MIG: g.MigEnabled}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep.GPUs[i] = applyGPU(ctx, lib, g, d, opts)
			klog.V(2).InfoS("MIG layout", "gpu", i, "status", rep.GPUs[i].Status, "message", rep.GPUs[i].Message)
		}()
	}
	wg.Wait()
	return rep, nil
}

// current reads a GPU's instances as a layout, with the GPU-instance IDs and whether each instance is
// exactly one full-size compute instance (the only shape a layout describes).
type existing struct {
	Instance
	gi       nvmlib.GpuInstance
	complete bool
}

func readLayout(lib nvmlib.Interface, idx int, shape GPUShape) ([]existing, error) {
	gis, err := lib.GpuInstances(idx)
	if err != nil {
		return nil, err
	}
	var out []existing
	for _, gi := range gis {
		var p nvmlib.MigProfile
		for _, q := range shape.Profiles {
			if q.ID == gi.ProfileID {
				p = q
			}
		}
		complete := len(gi.ComputeInstances) == 1 && gi.ComputeInstances[0].Slices == p.ComputeSlices
		out = append(out, existing{Instance: Instance{Profile: p.Name, ProfileID: gi.ProfileID, Placement: gi.Placement}, gi: gi, complete: complete})
	}
	return out, nil
}

func applyGPU(ctx context.Context, lib nvmlib.Interface, g nvmlib.GPU, d desired, opts Options) GPUResult {
	res := GPUResult{GPU: g.Index, Product: g.ProductName, MIG: g.MigEnabled}
	fail := func(st Status, format string, args ...any) GPUResult {
		res.Status, res.Message = st, fmt.Sprintf(format, args...)
		return res
	}
	if ctx.Err() != nil {
		return fail(StatusFailed, "cancelled: %v", ctx.Err())
	}
	if !d.mig {
		return disableGPU(lib, g, opts, res)
	}
	if !g.MigEnabled {
		if g.MigPending {
			return fail(StatusPendingReset, "MIG mode is pending enable: reset the GPU or reboot the node, then apply again")
		}
		res.ModeChange = true
		if opts.DryRun {
			res.Status = StatusPlanned
			res.Message = "would enable MIG mode, then place " + countsString(d.counts) + " (NVML lists placements only in MIG mode)"
			return res
		}
		ch, err := lib.SetMigMode(g.Index, true)
		if err != nil {
			return fail(StatusFailed, "enabling MIG mode: %v", err)
		}
		if ch.Pending {
			return fail(StatusPendingReset, "MIG mode enable is pending: %s", ch.Reason)
		}
		res.MIG = true
	}
	profiles, err := lib.MigProfiles(g.Index)
	if err != nil {
		return fail(StatusFailed, "reading MIG profiles: %v", err)
	}
	shape := GPUShape{Index: g.Index, Product: g.ProductName, Profiles: profiles}
	cur, err := readLayout(lib, g.Index, shape)
	if err != nil {
		return fail(StatusFailed, "reading MIG instances: %v", err)
	}
	if matches(cur, d) {
		res.Status, res.Layout = StatusUnchanged, layoutOf(cur)
		return res
	}
	var keep []Instance
	for _, e := range cur {
		if e.complete {
			keep = append(keep, e.Instance)
		}
	}
	plan, err := Place(shape, d.counts, d.pinned, keep)
	if err != nil {
		return fail(StatusRefused, "%v", err)
	}
	// Diff: instances in the plan that exist complete at the same place stay.
	var destroy []existing
	var create []Instance
	for _, e := range cur {
		if !(e.complete && containsInstance(plan, e.Instance)) {
			destroy = append(destroy, e)
		}
	}
	for _, p := range plan {
		if !hasComplete(cur, p) {
			create = append(create, p)
		}
	}
	if len(destroy) > 0 && !opts.Force {
		if busy, err := busyInstances(lib, g.Index, destroy); err != nil {
			return fail(StatusFailed, "reading processes: %v", err)
		} else if len(busy) > 0 {
			return fail(StatusRefused, "%s in use by processes %s; the layout would destroy them (use --force to destroy anyway)",
				instancesString(busy), pidsString(lib, g.Index, busy))
		}
	}
	res.Layout = plan
	for _, e := range destroy {
		res.Destroyed = append(res.Destroyed, e.Instance)
	}
	res.Created = create
	if opts.DryRun {
		res.Status = StatusPlanned
		return res
	}
	tx := &txn{lib: lib, gpu: g.Index}
	if err := tx.run(destroy, create, shape); err != nil {
		if rbErr := tx.rollback(shape); rbErr != nil {
			return fail(StatusFailed, "%v; rolling back also failed, the GPU may be half-configured: %v", err, rbErr)
		}
		res.Created, res.Destroyed, res.Layout = nil, nil, layoutOf(cur)
		return fail(StatusFailed, "%v; rolled back to the previous layout", err)
	}
	res.Status = StatusChanged
	return res
}

func disableGPU(lib nvmlib.Interface, g nvmlib.GPU, opts Options, res GPUResult) GPUResult {
	if !g.MigCapable || (!g.MigEnabled && !g.MigPending) {
		res.Status = StatusUnchanged
		return res
	}
	res.ModeChange = true
	if !g.MigEnabled && g.MigPending {
		if opts.DryRun {
			res.Status, res.Message = StatusPlanned, "would cancel the pending MIG enable"
			return res
		}
		if _, err := lib.SetMigMode(g.Index, false); err != nil {
			res.Status, res.Message = StatusFailed, fmt.Sprintf("cancelling pending MIG enable: %v", err)
			return res
		}
		res.Status = StatusChanged
		return res
	}
	profiles, err := lib.MigProfiles(g.Index)
	if err != nil {
		res.Status, res.Message = StatusFailed, fmt.Sprintf("reading MIG profiles: %v", err)
		return res
	}
	shape := GPUShape{Index: g.Index, Product: g.ProductName, Profiles: profiles}
	cur, err := readLayout(lib, g.Index, shape)
	if err != nil {
		res.Status, res.Message = StatusFailed, fmt.Sprintf("reading MIG instances: %v", err)
		return res
	}
	if len(cur) > 0 && !opts.Force {
		if busy, err := busyInstances(lib, g.Index, cur); err == nil && len(busy) > 0 {
			res.Status, res.Message = StatusRefused, fmt.Sprintf("%s in use by processes %s; disabling MIG would destroy them (use --force)", instancesString(busy), pidsString(lib, g.Index, busy))
			return res
		}
	}
	for _, e := range cur {
		res.Destroyed = append(res.Destroyed, e.Instance)
	}
	if opts.DryRun {
		res.Status, res.Message = StatusPlanned, "would disable MIG mode"
		return res
	}
	tx := &txn{lib: lib, gpu: g.Index}
	if err := tx.run(cur, nil, shape); err != nil {
		if rbErr := tx.rollback(shape); rbErr != nil {
			res.Status, res.Message = StatusFailed, fmt.Sprintf("%v; rolling back also failed: %v", err, rbErr)
			return res
		}
		res.Status, res.Message, res.Destroyed = StatusFailed, fmt.Sprintf("%v; rolled back to the previous layout", err), nil
		return res
	}
	ch, err := lib.SetMigMode(g.Index, false)
	if err != nil {
		res.Status, res.Message = StatusFailed, fmt.Sprintf("disabling MIG mode: %v", err)
		return res
	}
	res.MIG = false
	if ch.Pending {
		res.MIG = true
		res.Status, res.Message = StatusPendingReset, "MIG mode disable is pending: "+ch.Reason
		return res
	}
	res.Status = StatusChanged
	return res
}

// txn records what it changed on one GPU so that a failure can restore the previous layout.
type txn struct {
	lib       nvmlib.Interface
	gpu       int
	destroyed []existing
	created   []int // GPU-instance IDs created
}

func (t *txn) run(destroy []existing, create []Instance, shape GPUShape) error {
	for _, e := range destroy {
		for _, ci := range e.gi.ComputeInstances {
			if err := t.lib.DestroyComputeInstance(t.gpu, e.gi.ID, ci.ID); err != nil {
				return fmt.Errorf("destroying compute instance %d of %s: %w", ci.ID, e.Instance, err)
			}
		}
		if err := t.lib.DestroyGpuInstance(t.gpu, e.gi.ID); err != nil {
			// Its compute instances are gone; record it so that rollback recreates them.
			t.destroyed = append(t.destroyed, existing{Instance: e.Instance, gi: nvmlib.GpuInstance{ID: e.gi.ID, ComputeInstances: e.gi.ComputeInstances}, complete: e.complete})
			return fmt.Errorf("destroying %s: %w", e.Instance, err)
		}
		t.destroyed = append(t.destroyed, e)
	}
	for _, c := range create {
		p, _ := shape.profile(c.Profile)
		id, err := t.lib.CreateGpuInstance(t.gpu, c.ProfileID, c.Placement)
		if err != nil {
			return fmt.Errorf("creating %s: %w", c, err)
		}
		t.created = append(t.created, id)
		if _, err := t.lib.CreateComputeInstance(t.gpu, id, p.ComputeSlices); err != nil {
			return fmt.Errorf("creating the compute instance of %s: %w", c, err)
		}
	}
	return nil
}

// rollback destroys what the transaction created and recreates what it destroyed, at the same
// placements with the same compute instances.
func (t *txn) rollback(shape GPUShape) error {
	var errs []error
	for i := len(t.created) - 1; i >= 0; i-- {
		id := t.created[i]
		gis, err := t.lib.GpuInstances(t.gpu)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, gi := range gis {
			if gi.ID != id {
				continue
			}
			for _, ci := range gi.ComputeInstances {
				if err := t.lib.DestroyComputeInstance(t.gpu, id, ci.ID); err != nil {
					errs = append(errs, err)
				}
			}
			if err := t.lib.DestroyGpuInstance(t.gpu, id); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for i := len(t.destroyed) - 1; i >= 0; i-- {
		e := t.destroyed[i]
		gis, _ := t.lib.GpuInstances(t.gpu)
		id, found := -1, false
		for _, gi := range gis {
			if gi.ID == e.gi.ID && gi.Placement == e.Placement {
				id, found = gi.ID, true // the GPU instance survived; only its CIs need recreating
			}
		}
		if !found {
			var err error
			if id, err = t.lib.CreateGpuInstance(t.gpu, e.ProfileID, e.Placement); err != nil {
				errs = append(errs, fmt.Errorf("recreating %s: %w", e.Instance, err))
				continue
			}
		}
		for _, ci := range e.gi.ComputeInstances {
			if _, err := t.lib.CreateComputeInstance(t.gpu, id, ci.Slices); err != nil {
				errs = append(errs, fmt.Errorf("recreating a compute instance of %s: %w", e.Instance, err))
			}
		}
	}
	return errors.Join(errs...)
}

func matches(cur []existing, d desired) bool {
	got := map[string]int{}
	for _, e := range cur {
		if !e.complete {
			return false
		}
		got[e.Profile]++
	}
	for name, n := range d.counts {
		if got[name] != n {
			return false
		}
		delete(got, name)
	}
	for _, n := range got {
		if n != 0 {
			return false
		}
	}
	for _, pp := range d.pinned {
		found := false
		for _, e := range cur {
			found = found || (e.Profile == pp.Profile && e.Placement.Start == pp.Start)
		}
		if !found {
			return false
		}
	}
	return true
}

func containsInstance(is []Instance, x Instance) bool {
	for _, i := range is {
		if i.Profile == x.Profile && i.Placement == x.Placement {
			return true
		}
	}
	return false
}

func hasComplete(cur []existing, x Instance) bool {
	for _, e := range cur {
		if e.complete && e.Profile == x.Profile && e.Placement == x.Placement {
			return true
		}
	}
	return false
}

func layoutOf(cur []existing) []Instance {
	out := make([]Instance, 0, len(cur))
	for _, e := range cur {
		out = append(out, e.Instance)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Placement.Start < out[j].Placement.Start })
	return out
}

func busyInstances(lib nvmlib.Interface, gpu int, es []existing) ([]existing, error) {
	procs, err := lib.Processes(gpu)
	if err != nil {
		return nil, err
	}
	var busy []existing
	for _, e := range es {
		for _, p := range procs {
			if p.GI == e.gi.ID {
				busy = append(busy, e)
				break
			}
		}
	}
	return busy, nil
}

func pidsString(lib nvmlib.Interface, gpu int, es []existing) string {
	procs, _ := lib.Processes(gpu)
	var pids []string
	for _, p := range procs {
		for _, e := range es {
			if p.GI == e.gi.ID {
				pids = append(pids, strconv.Itoa(p.PID))
			}
		}
	}
	return strings.Join(pids, ", ")
}

func instancesString(es []existing) string {
	var s []string
	for _, e := range es {
		s = append(s, e.Instance.String())
	}
	return strings.Join(s, ", ")
}

func countsString(c map[string]int) string {
	var parts []string
	for _, k := range sortedKeys(c) {
		if c[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s x%d", k, c[k]))
		}
	}
	if len(parts) == 0 {
		return "no instances"
	}
	return strings.Join(parts, " + ")
}

// Assert compares the node with layout `name` and returns one line per GPU that differs.
func Assert(ctx context.Context, lib nvmlib.Interface, cfg *Config, name string) ([]string, error) {
	rep, err := Apply(ctx, lib, cfg, name, Options{DryRun: true})
	if err != nil {
		return nil, err
	}
	var diffs []string
	for _, g := range rep.GPUs {
		switch g.Status {
		case StatusUnchanged, StatusNotSelected:
			continue
		case StatusPlanned:
			msg := g.Message
			if msg == "" {
				msg = fmt.Sprintf("would destroy [%s] and create [%s]", joinInstances(g.Destroyed), joinInstances(g.Created))
			}
			diffs = append(diffs, fmt.Sprintf("GPU %d (%s): differs: %s", g.GPU, g.Product, msg))
		default:
			diffs = append(diffs, fmt.Sprintf("GPU %d (%s): %s: %s", g.GPU, g.Product, g.Status, g.Message))
		}
	}
	return diffs, nil
}

func joinInstances(is []Instance) string {
	var s []string
	for _, i := range is {
		s = append(s, i.String())
	}
	return strings.Join(s, ", ")
}
