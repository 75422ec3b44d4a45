package api

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
)

// GPUInfo is what Resolve needs to know of a GPU. The profile package fills it from an inventory
// snapshot; tests and the webhook may fill it by hand.
type GPUInfo struct {
	Index       int    `json:"index"`
	UUID        string `json:"uuid"`
	ProductName string `json:"productName"`
	MigCapable  bool   `json:"migCapable"`
	MigEnabled  bool   `json:"migEnabled"`
	// MemoryMiB is the GPU's memory; 0 when unknown (memory checks are then skipped).
	MemoryMiB uint64 `json:"memoryMiB,omitempty"`
	// MigProfiles are the GPU-instance profiles the GPU offers; empty when unknown.
	MigProfiles []string `json:"migProfiles,omitempty"`
	// MigDevices are the profiles of the MIG devices the GPU has now; nil when unknown.
	MigDevices []string `json:"migDevices,omitempty"`
}

// Resolution is a profile applied to one node's GPUs: every GPU with exactly one owner and mode.
type Resolution struct {
	// DevicePlugin holds the device plugin's node-wide settings with defaults filled in.
	DevicePlugin DevicePluginSettings `json:"devicePlugin"`
	// Health holds the health settings (zero when the profile has none).
	Health HealthSettings `json:"health"`
	// Assignments has one entry per GPU, by index.
	Assignments []Assignment `json:"assignments"`
	// Warnings from validation and resolution.
	Warnings Warnings `json:"warnings,omitempty"`
}

// Assignment is one GPU's owner, mode and settings, ready for its front end.
type Assignment struct {
	GPU GPUInfo `json:"gpu"`
	// Source is the rule that decided, e.g. "spec.rules[2] (mps)", "spec.defaults" or "built-in default".
	Source string `json:"source"`
	Owner  Owner  `json:"owner"`
	Mode   Mode   `json:"mode,omitempty"`
	// MIGEnabled is the MIG mode the GPU must be in (true for mig-static and mig-dynamic).
	MIGEnabled bool `json:"migEnabled"`
	// ComputeMode is the NVML compute mode the owner sets: "Default" for time-slicing,
	// "ExclusiveProcess" for MPS, "" to leave as is.
	ComputeMode string `json:"computeMode,omitempty"`
	// ResourceName is the device plugin's extended resource for a whole, time-sliced or MPS GPU.
	ResourceName string `json:"resourceName,omitempty"`
	// Replicas is how many containers share the GPU (1 for whole; 0 for DRA time-slicing without limit).
	Replicas int `json:"replicas,omitempty"`
	// FailRequestsGreaterThanOne refuses containers asking for more than one replica (device plugin).
	FailRequestsGreaterThanOne bool `json:"failRequestsGreaterThanOne,omitempty"`
	// Interval is the time-slice interval for mode time-sliced.
	Interval TimeSliceInterval `json:"interval,omitempty"`
	// MPSClients are the MPS client slots for mode mps (and shared with isolation mps: nil).
	MPSClients []MPSClient `json:"mpsClients,omitempty"`
	// MIG is the layout for mode mig-static.
	MIG *ResolvedMIG `json:"mig,omitempty"`
	// MIGDynamic holds the settings for mode mig-dynamic.
	MIGDynamic *MIGDynamicSettings `json:"migDynamic,omitempty"`
	// Shared holds the settings for mode shared, with defaults filled.
	Shared *SharedSettings `json:"shared,omitempty"`
	// Modes lists every mode a GPU is offered in when the profile gives it several (Mode is then the
	// first); nil for one mode.
	Modes []Mode `json:"modes,omitempty"`
}

// MPSClient is one MPS client slot.
type MPSClient struct {
	ActiveThreadPercentage int `json:"activeThreadPercentage"`
	// PinnedMemoryMiB is the client's device-memory limit; 0 means none.
	PinnedMemoryMiB uint64 `json:"pinnedMemoryMiB,omitempty"`
}

// ResolvedMIG is a mig-static layout.
type ResolvedMIG struct {
	// Layout is the layout's name as written.
	Layout string `json:"layout"`
	// Existing is true for layout "existing": the GPU keeps the MIG devices it has.
	Existing bool `json:"existing,omitempty"`
	// AllOf is set for "all-<profile>": as many devices of that profile as fit.
	AllOf string `json:"allOf,omitempty"`
	// Devices counts MIG devices per profile for a named layout.
	Devices MIGLayout `json:"devices,omitempty"`
	// Replicas time-slice MIG devices of a profile (device plugin).
	Replicas []MIGReplicas `json:"replicas,omitempty"`
}

// Owned returns the assignments of one owner.
func (r *Resolution) Owned(o Owner) []Assignment {
	var out []Assignment
	for _, a := range r.Assignments {
		if a.Owner == o {
			out = append(out, a)
		}
	}
	return out
}

// ForGPU returns the assignment of the GPU with the given UUID.
func (r *Resolution) ForGPU(uuid string) (Assignment, bool) {
	for _, a := range r.Assignments {
		if a.GPU.UUID == uuid {
			return a, true
		}
	}
	return Assignment{}, false
}

// MIGResourceName is the device plugin's resource for a MIG device of the given profile on this
// node: a spec.devicePlugin.resources.mig pattern, else nvidia.com/mig-<profile> (mixed) or
// nvidia.com/gpu (single); replicas of the profile may rename it. A profile's attribute suffix is
// written with a dot, since `+` cannot appear in a resource name: 1g.10gb+me → nvidia.com/mig-1g.10gb.me.
func (r *Resolution) MIGResourceName(a Assignment, profile string) string {
	if a.MIG != nil {
		for _, rep := range a.MIG.Replicas {
			if rep.Profile == profile && rep.ResourceName != "" {
				return rep.ResourceName
			}
		}
	}
	if r.DevicePlugin.Resources != nil {
		for _, p := range r.DevicePlugin.Resources.MIG {
			if wildcard(p.Pattern, profile) {
				return p.Name
			}
		}
	}
	if r.DevicePlugin.MIGStrategy == "single" {
		return "nvidia.com/gpu"
	}
	return "nvidia.com/mig-" + strings.ReplaceAll(profile, "+", ".")
}

// Resolve applies a profile to a node's GPUs. It validates the profile, then gives every GPU
// exactly one owner and mode: a GPU selected by two rules is an error naming both rules and the
// GPU; a GPU no rule selects takes spec.defaults (or, without defaults, device-plugin/whole).
// Settings that do not fit a GPU (MIG on a GPU without MIG, MPS limits beyond its memory) are
// errors naming the rule's field.
func Resolve(p *SharingProfile, gpus []GPUInfo) (*Resolution, error) {
	warns, errs := Validate(p)
	if len(errs) > 0 {
		return nil, errs
	}
	c := &collector{warns: warns}
	res := &Resolution{}
	if p.Spec.DevicePlugin != nil {
		res.DevicePlugin = *p.Spec.DevicePlugin
	}
	if p.Spec.Health != nil {
		res.Health = *p.Spec.Health
	}
	if res.DevicePlugin.DeviceIDStrategy == "" {
		res.DevicePlugin.DeviceIDStrategy = "uuid"
	}
	if len(res.DevicePlugin.DeviceListStrategy) == 0 {
		res.DevicePlugin.DeviceListStrategy = []string{"cdi-cri"}
	}
	if res.DevicePlugin.FailOnInitError == nil {
		t := true
		res.DevicePlugin.FailOnInitError = &t
	}

	sorted := slices.Clone(gpus)
	slices.SortFunc(sorted, func(a, b GPUInfo) int { return a.Index - b.Index })
	matched := make([]int, len(p.Spec.Rules))
	for gi, g := range sorted {
		if gi > 0 && sorted[gi-1].Index == g.Index {
			c.errf("", "", "GPU index %d is listed twice in the node inventory", g.Index)
			continue
		}
		var hits []int
		for i := range p.Spec.Rules {
			if p.Spec.Rules[i].Selector.Matches(g) {
				hits = append(hits, i)
				matched[i]++
			}
		}
		if len(hits) > 1 {
			c.errf(idx("spec.rules", hits[1])+".selector", "narrow one of the selectors so each GPU matches one rule",
				"GPU %d (%s, %s) is selected by both %s and %s; a GPU has exactly one owner and one mode",
				g.Index, g.UUID, g.ProductName, ruleRef(&p.Spec, hits[0]), ruleRef(&p.Spec, hits[1]))
			continue
		}
		var s *Sharing
		var source, path string
		switch {
		case len(hits) == 1:
			s = &p.Spec.Rules[hits[0]].Sharing
			source, path = ruleRef(&p.Spec, hits[0]), idx("spec.rules", hits[0])
		case p.Spec.Defaults != nil:
			s, source, path = p.Spec.Defaults, "spec.defaults", "spec.defaults"
		default:
			s, source, path = &Sharing{Owner: OwnerDevicePlugin, Mode: ModeWhole}, "built-in default", "spec.defaults"
		}
		res.Assignments = append(res.Assignments, assign(c, p, res, g, s, source, path))
	}
	for i, n := range matched {
		if n == 0 && len(gpus) > 0 {
			c.warnf(idx("spec.rules", i)+".selector", "selects no GPU on this node")
		}
	}
	checkSingleStrategy(c, res)
	res.Warnings = c.warns
	if len(c.errs) > 0 {
		return nil, c.errs
	}
	return res, nil
}

func assign(c *collector, p *SharingProfile, res *Resolution, g GPUInfo, s *Sharing, source, path string) Assignment {
	if len(s.Modes) > 0 {
		return assignModes(c, p, res, g, s, source, path)
	}
	a := Assignment{GPU: g, Source: source, Owner: s.Owner, Mode: s.Mode}
	gpuRef := fmt.Sprintf("GPU %d (%s)", g.Index, g.ProductName)
	if s.Owner == OwnerNone {
		a.MIGEnabled = g.MigEnabled
		return a
	}
	dp := s.Owner == OwnerDevicePlugin
	if dp && (s.Mode == ModeWhole || s.Mode == ModeTimeSliced || s.Mode == ModeMPS) {
		a.ResourceName = s.ResourceName
		if a.ResourceName == "" {
			a.ResourceName = gpuResourceName(res, g)
		}
	}
	switch s.Mode {
	case ModeWhole:
		a.Replicas = 1
	case ModeTimeSliced:
		a.ComputeMode = "Default"
		a.Interval = IntervalDefault
		if t := s.TimeSlicing; t != nil {
			a.Replicas = t.Replicas
			if t.Interval != "" {
				a.Interval = t.Interval
			}
			a.FailRequestsGreaterThanOne = dp && t.FailRequestsGreaterThanOne
		}
	case ModeMPS:
		a.ComputeMode = "ExclusiveProcess"
		a.MPSClients = mpsClients(c, s.MPS, g, path+".mps")
		a.Replicas = len(a.MPSClients)
		a.FailRequestsGreaterThanOne = dp && (s.MPS.FailRequestsGreaterThanOne == nil || *s.MPS.FailRequestsGreaterThanOne)
	case ModeMIGStatic, ModeMIGDynamic:
		a.MIGEnabled = true
		if !g.MigCapable {
			c.errf(path+".mode", "select only MIG-capable GPUs (selector migCapable: true) or pick another mode", "%s cannot run MIG, so it cannot have mode %s", gpuRef, s.Mode)
			return a
		}
		if s.Mode == ModeMIGDynamic {
			a.MIGDynamic = s.MIGDynamic
			if a.MIGDynamic == nil {
				a.MIGDynamic = &MIGDynamicSettings{}
			}
			for i, prof := range a.MIGDynamic.Profiles {
				checkOffered(c, g, prof, idx(path+".migDynamic.profiles", i), gpuRef)
			}
			break
		}
		m := &ResolvedMIG{Layout: s.MIG.Layout, Replicas: s.MIG.TimeSlicing}
		switch {
		case s.MIG.Layout == LayoutExisting:
			m.Existing = true
		case strings.HasPrefix(s.MIG.Layout, "all-"):
			m.AllOf = strings.TrimPrefix(s.MIG.Layout, "all-")
			checkOffered(c, g, m.AllOf, path+".mig.layout", gpuRef)
		default:
			m.Devices = p.Spec.MIGLayouts[s.MIG.Layout]
			for _, prof := range sortedKeys(m.Devices) {
				checkOffered(c, g, prof, key("spec.migLayouts", s.MIG.Layout)+"["+prof+"]", gpuRef)
			}
		}
		a.MIG = m
	case ModeShared:
		sh := SharedSettings{Isolation: ModeTimeSliced}
		if s.Shared != nil {
			sh = *s.Shared
			if sh.Isolation == "" {
				sh.Isolation = ModeTimeSliced
			}
		}
		if sh.Isolation == ModeMPS {
			a.ComputeMode = "ExclusiveProcess"
		} else {
			a.ComputeMode = "Default"
		}
		sharedDefaults(c, &sh, g, path+".shared", gpuRef)
		a.Shared = &sh
	}
	if !a.MIGEnabled && g.MigEnabled {
		c.warnf(path+".mode", "%s has MIG mode on; mode %s needs it off, which the owner does only while the GPU is idle", gpuRef, s.Mode)
	}
	return a
}

// assignModes resolves a GPU offered in several modes: Mode is the first, Modes all of them, and
// the settings of each (time-slicing's replicas and interval, shared's settings) are filled in.
func assignModes(c *collector, p *SharingProfile, res *Resolution, g GPUInfo, s *Sharing, source, path string) Assignment {
	var a Assignment
	for i, m := range s.Modes {
		one := *s
		one.Modes, one.Mode = nil, m
		b := assign(c, p, res, g, &one, source, path)
		if i == 0 {
			a = b
		}
		switch m {
		case ModeTimeSliced:
			a.Replicas, a.Interval = b.Replicas, b.Interval
		case ModeShared:
			a.Shared = b.Shared
		}
	}
	a.Modes = slices.Clone(s.Modes)
	a.ComputeMode = "" // set per claim, by the mode it is prepared in
	return a
}

// sharedDefaults fills the defaults of mode shared (memoryStep 1Gi, memoryReserve 0, defaultMemory
// one step, defaultComputePercent 100/maxClients or 10) and checks them against the GPU's memory
// when it is known.
func sharedDefaults(c *collector, sh *SharedSettings, g GPUInfo, path, gpuRef string) {
	if sh.MemoryStep == nil {
		q := resource.MustParse(DefaultSharedMemoryStep)
		sh.MemoryStep = &q
	} else {
		q := sh.MemoryStep.DeepCopy()
		sh.MemoryStep = &q
	}
	if sh.MemoryReserve == nil {
		q := resource.MustParse("0")
		sh.MemoryReserve = &q
	} else {
		q := sh.MemoryReserve.DeepCopy()
		sh.MemoryReserve = &q
	}
	if sh.DefaultMemory == nil {
		q := sh.MemoryStep.DeepCopy()
		sh.DefaultMemory = &q
	} else {
		q := sh.DefaultMemory.DeepCopy()
		sh.DefaultMemory = &q
	}
	if sh.DefaultComputePercent == 0 {
		sh.DefaultComputePercent = DefaultSharedComputePercent
		if sh.MaxClients > 0 {
			sh.DefaultComputePercent = max(1, 100/sh.MaxClients)
		}
	}
	if g.MemoryMiB == 0 {
		return
	}
	total := int64(g.MemoryMiB) << 20
	usable := total - sh.MemoryReserve.Value()
	step := sh.MemoryStep.Value()
	switch {
	case usable < step:
		c.errf(path+".memoryReserve", "lower memoryReserve (or memoryStep) so that at least one step is left to claims",
			"%s has %d MiB; after memoryReserve %s less than one memoryStep (%s) is left", gpuRef, g.MemoryMiB, sh.MemoryReserve.String(), sh.MemoryStep.String())
	case sh.DefaultMemory.Value() > usable:
		c.errf(path+".defaultMemory", fmt.Sprintf("use at most %d MiB (a multiple of memoryStep)", usable>>20),
			"defaultMemory %s is more than the %d MiB %s leaves to claims after memoryReserve %s", sh.DefaultMemory.String(), usable>>20, gpuRef, sh.MemoryReserve.String())
	}
}

func checkOffered(c *collector, g GPUInfo, prof, path, gpuRef string) {
	if len(g.MigProfiles) == 0 {
		return
	}
	base := prof
	if i := strings.Index(prof, "c."); i >= 0 && i < 3 {
		base = prof[i+2:]
	}
	if !slices.Contains(g.MigProfiles, base) {
		c.errf(path, "use one of: "+strings.Join(g.MigProfiles, ", "), "%s offers no MIG profile %q", gpuRef, prof)
	}
}

func mpsClients(c *collector, m *MPSSettings, g GPUInfo, path string) []MPSClient {
	var out []MPSClient
	var total uint64
	if len(m.Shares) == 0 {
		pct := 100 / m.Replicas
		if pct < 1 {
			pct = 1
		}
		if m.ActiveThreadPercentage != nil {
			pct = *m.ActiveThreadPercentage
		}
		var mem uint64
		switch {
		case m.PinnedMemoryLimit != nil:
			mem = toMiB(m.PinnedMemoryLimit.Value())
		case g.MemoryMiB > 0:
			mem = g.MemoryMiB / uint64(m.Replicas)
		}
		for range m.Replicas {
			out = append(out, MPSClient{ActiveThreadPercentage: pct, PinnedMemoryMiB: mem})
		}
		total = mem * uint64(m.Replicas)
		if g.MemoryMiB > 0 && m.PinnedMemoryLimit != nil && total > g.MemoryMiB {
			c.errf(path+".pinnedMemoryLimit", "lower the limit or the replicas", "%d clients × %d MiB is more than GPU %d's %d MiB", m.Replicas, mem, g.Index, g.MemoryMiB)
		}
		return out
	}
	for _, sh := range m.Shares {
		n := sh.Count
		if n == 0 {
			n = 1
		}
		var mem uint64
		if sh.PinnedMemoryLimit != nil {
			mem = toMiB(sh.PinnedMemoryLimit.Value())
		}
		for range n {
			out = append(out, MPSClient{ActiveThreadPercentage: sh.ActiveThreadPercentage, PinnedMemoryMiB: mem})
			total += mem
		}
	}
	if g.MemoryMiB > 0 && total > g.MemoryMiB {
		c.errf(path+".shares", "lower the shares' pinnedMemoryLimit", "the shares pin %d MiB, more than GPU %d's %d MiB", total, g.Index, g.MemoryMiB)
	}
	return out
}

func toMiB(bytes int64) uint64 {
	if bytes <= 0 {
		return 0
	}
	return uint64(bytes+(1<<20)-1) >> 20
}

func gpuResourceName(res *Resolution, g GPUInfo) string {
	if res.DevicePlugin.Resources != nil {
		for _, p := range res.DevicePlugin.Resources.GPUs {
			if wildcard(p.Pattern, g.ProductName) {
				return p.Name
			}
		}
	}
	return "nvidia.com/gpu"
}

// checkSingleStrategy enforces what NVIDIA's single strategy means: every device-plugin GPU is in
// MIG mode with devices of one profile.
func checkSingleStrategy(c *collector, res *Resolution) {
	dpMIG := false
	for _, a := range res.Assignments {
		if a.Owner == OwnerDevicePlugin && a.Mode == ModeMIGStatic {
			dpMIG = true
		}
	}
	switch res.DevicePlugin.MIGStrategy {
	case "":
		if dpMIG {
			res.DevicePlugin.MIGStrategy = "mixed"
		} else {
			res.DevicePlugin.MIGStrategy = "none"
		}
		return
	case "single":
		if !dpMIG {
			return // no GPU in MIG mode: whole GPUs, as NVIDIA's plugin serves them
		}
	default:
		return
	}
	profile := ""
	for _, a := range res.Assignments {
		if a.Owner != OwnerDevicePlugin {
			continue
		}
		if a.Mode != ModeMIGStatic {
			c.errf("spec.devicePlugin.migStrategy", "use migStrategy mixed, or give every device-plugin GPU mode mig-static", "single needs every device-plugin GPU in MIG mode, but GPU %d has mode %s (from %s)", a.GPU.Index, a.Mode, a.Source)
			return
		}
		var profs []string
		switch {
		case a.MIG.AllOf != "":
			profs = []string{a.MIG.AllOf}
		case a.MIG.Devices != nil:
			profs = sortedKeys(a.MIG.Devices)
		default:
			profs = slices.Compact(slices.Sorted(slices.Values(a.GPU.MigDevices)))
		}
		for _, p := range profs {
			if profile == "" {
				profile = p
			}
			if p != profile {
				c.errf("spec.devicePlugin.migStrategy", "use migStrategy mixed, or one MIG profile on every device-plugin GPU", "single needs MIG devices of one profile, but GPU %d has %s and another GPU %s", a.GPU.Index, p, profile)
				return
			}
		}
	}
}

// Matches reports whether the selector picks the GPU.
func (s *GPUSelector) Matches(g GPUInfo) bool {
	if len(s.Indices) > 0 && !slices.Contains(s.Indices, g.Index) {
		return false
	}
	if len(s.UUIDs) > 0 && !slices.ContainsFunc(s.UUIDs, func(u string) bool { return strings.EqualFold(u, g.UUID) }) {
		return false
	}
	if len(s.ProductNames) > 0 && !slices.ContainsFunc(s.ProductNames, func(p string) bool { return wildcard(p, g.ProductName) }) {
		return false
	}
	if s.MigCapable != nil && *s.MigCapable != g.MigCapable {
		return false
	}
	if s.MigEnabled != nil && *s.MigEnabled != g.MigEnabled {
		return false
	}
	return true
}

// wildcard matches s against a pattern in which `*` matches any run of characters; case-insensitive.
func wildcard(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	for i := range parts {
		parts[i] = regexp.QuoteMeta(parts[i])
	}
	re, err := regexp.Compile("(?i)^" + strings.Join(parts, ".*") + "$")
	return err == nil && re.MatchString(s)
}

// String renders an assignment's settings briefly, for tables and logs.
func (a Assignment) String() string {
	var parts []string
	switch a.Mode {
	case ModeWhole:
	case ModeTimeSliced:
		parts = append(parts, "replicas="+strconv.Itoa(a.Replicas), "interval="+string(a.Interval))
	case ModeMPS:
		parts = append(parts, "clients="+strconv.Itoa(len(a.MPSClients)))
		if len(a.MPSClients) > 0 {
			cl := a.MPSClients[0]
			uneven := false
			for _, x := range a.MPSClients {
				uneven = uneven || x != cl
			}
			if uneven {
				parts = append(parts, "unequal")
			} else {
				parts = append(parts, fmt.Sprintf("threads=%d%%", cl.ActiveThreadPercentage))
				if cl.PinnedMemoryMiB > 0 {
					parts = append(parts, fmt.Sprintf("mem=%dMiB", cl.PinnedMemoryMiB))
				}
			}
		}
	case ModeMIGStatic:
		if a.MIG != nil {
			parts = append(parts, "layout="+a.MIG.Layout)
			for _, r := range a.MIG.Replicas {
				parts = append(parts, fmt.Sprintf("%s×%d", r.Profile, r.Replicas))
			}
		}
	case ModeMIGDynamic:
		if a.MIGDynamic != nil && len(a.MIGDynamic.Profiles) > 0 {
			parts = append(parts, "profiles="+strings.Join(a.MIGDynamic.Profiles, ","))
		}
	case ModeShared:
		if a.Shared != nil {
			parts = append(parts, "isolation="+string(a.Shared.Isolation))
			if a.Shared.MaxClients > 0 {
				parts = append(parts, "maxClients="+strconv.Itoa(a.Shared.MaxClients))
			}
		}
	}
	if a.ResourceName != "" {
		parts = append([]string{a.ResourceName}, parts...)
	}
	if len(a.Modes) > 0 {
		ms := make([]string, len(a.Modes))
		for i, m := range a.Modes {
			ms[i] = string(m)
		}
		parts = append([]string{"modes=" + strings.Join(ms, ",")}, parts...)
		if slices.Contains(a.Modes, ModeTimeSliced) && a.Mode != ModeTimeSliced {
			parts = append(parts, "replicas="+strconv.Itoa(a.Replicas), "interval="+string(a.Interval))
		}
	}
	return strings.Join(parts, " ")
}
