package api

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
)

var migProfileRE = regexp.MustCompile(`^([1-9][0-9]?c\.)?[1-9][0-9]?g\.[1-9][0-9]{0,3}gb([+-][a-z][a-z.]{0,15})?$`)

// computeSlices is the number of compute slices (the "Ng" of a profile name) a MIG device takes.
func computeSlices(prof string) int {
	m := migProfileRE.FindStringSubmatch(prof)
	if m == nil {
		return 0
	}
	rest := strings.TrimPrefix(prof, m[1])
	g, _, _ := strings.Cut(rest, "g.")
	n, _ := strconv.Atoi(g)
	return n
}

// ValidMIGProfileName reports whether s is spelt like a MIG profile ("1g.10gb", "1c.3g.40gb",
// "1g.10gb+me").
func ValidMIGProfileName(s string) bool { return migProfileRE.MatchString(s) }

const (
	fixOwner = "set owner to device-plugin, dra or none"
	fixMode  = "set mode to whole, mig-static, mig-dynamic, time-sliced, mps or shared"
)

// exclusion explains why two sharing modes cannot share one GPU.
func exclusion(mode Mode, block string) string {
	switch {
	case mode == ModeMPS && block == "timeSlicing", mode == ModeTimeSliced && block == "mps":
		return "a GPU has one mode at a time: MPS needs the GPU in EXCLUSIVE_PROCESS compute mode, time-slicing needs DEFAULT"
	case (mode == ModeMIGStatic || mode == ModeMIGDynamic) && block == "timeSlicing":
		return "a time-slice interval has no effect on MIG devices; to replicate MIG devices use mig.timeSlicing"
	case (mode == ModeMIGStatic || mode == ModeMIGDynamic) && block == "mps":
		return "MPS on MIG devices is not supported; give the GPU mode mps (MIG off) or keep it in MIG mode"
	case mode == ModeWhole:
		return "mode whole hands the GPU to one container; pick the mode whose settings you wrote"
	}
	return fmt.Sprintf("mode %s does not use %s settings", mode, block)
}

// Validate checks a profile on its own (without knowing the node's GPUs): every field, every
// reference, and rules that select the same GPU index or UUID. Resolve checks the rest against a
// node's GPUs.
func Validate(p *SharingProfile) (Warnings, ErrorList) {
	c := &collector{}
	if p == nil {
		c.errf("", "", "profile is empty")
		return nil, c.errs
	}
	if p.APIVersion != APIVersion {
		c.errf("apiVersion", "set apiVersion: "+APIVersion, "is %q, want %q", p.APIVersion, APIVersion)
	}
	if p.Kind != KindSharingProfile {
		c.errf("kind", "set kind: "+KindSharingProfile, "is %q, want %q", p.Kind, KindSharingProfile)
	}
	s := &p.Spec
	validateDevicePlugin(c, s.DevicePlugin, "spec.devicePlugin")
	validateHealth(c, s.Health, "spec.health")
	for _, name := range sortedKeys(s.MIGLayouts) {
		path := key("spec.migLayouts", name)
		if name == LayoutExisting || strings.HasPrefix(name, "all-") {
			c.errf(path, "rename the layout", "the name %q is reserved (existing and all-<profile> are built in)", name)
		} else if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
			c.errf(path, "use lower-case letters, digits, '-' and '.'", "layout name: %s", strings.Join(errs, "; "))
		}
		if len(s.MIGLayouts[name]) == 0 {
			c.errf(path, "list MIG profiles with counts, e.g. {\"3g.40gb\": 2}", "layout is empty")
		}
		used := 0
		for _, prof := range sortedKeys(s.MIGLayouts[name]) {
			n := s.MIGLayouts[name][prof]
			used += n * computeSlices(prof)
			pp := key(path, prof)
			if !ValidMIGProfileName(prof) {
				c.errf(pp, "use a MIG profile name as nvidia-smi prints it, e.g. 1g.10gb or 3g.40gb", "%q is not a MIG profile name", prof)
			}
			if n < 1 || n > 7 {
				c.errf(pp, "a GPU has at most 7 MIG devices", "count %d is out of range 1–7", n)
			}
		}
		if used > 7 {
			c.errf(path, "drop devices until the compute slices add up to 7 or fewer", "layout needs %d compute slices; a GPU has at most 7", used)
		}
	}
	if s.Defaults != nil {
		validateSharing(c, p, s.Defaults, "spec.defaults")
	}
	seenIdx := map[int]int{}
	seenUUID := map[string]int{}
	names := map[string]int{}
	for i := range s.Rules {
		r := &s.Rules[i]
		path := idx("spec.rules", i)
		if r.Name != "" {
			if j, ok := names[r.Name]; ok {
				c.errf(path+".name", "give each rule its own name", "rule name %q is also used by spec.rules[%d]", r.Name, j)
			}
			names[r.Name] = i
		}
		validateSelector(c, &r.Selector, path+".selector")
		for _, gi := range slices.Compact(slices.Sorted(slices.Values(r.Selector.Indices))) {
			if j, ok := seenIdx[gi]; ok && j != i {
				c.errf(path+".selector.indices", "select each GPU in one rule only", "GPU %d is also selected by %s; a GPU has exactly one owner and one mode", gi, ruleRef(s, j))
			}
			seenIdx[gi] = i
		}
		for _, u := range r.Selector.UUIDs {
			if j, ok := seenUUID[u]; ok && j != i {
				c.errf(path+".selector.uuids", "select each GPU in one rule only", "GPU %s is also selected by %s; a GPU has exactly one owner and one mode", u, ruleRef(s, j))
			}
			seenUUID[u] = i
		}
		validateSharing(c, p, &r.Sharing, path)
	}
	return c.warns, c.errs
}

func ruleRef(s *SharingProfileSpec, i int) string {
	if i < 0 {
		return "spec.defaults"
	}
	if i < len(s.Rules) && s.Rules[i].Name != "" {
		return fmt.Sprintf("spec.rules[%d] (%s)", i, s.Rules[i].Name)
	}
	return fmt.Sprintf("spec.rules[%d]", i)
}

func validateDevicePlugin(c *collector, d *DevicePluginSettings, path string) {
	if d == nil {
		return
	}
	if d.MIGStrategy != "" && !slices.Contains(MIGStrategies, d.MIGStrategy) {
		c.errf(path+".migStrategy", "use none, single or mixed", "unknown MIG strategy %q", d.MIGStrategy)
	}
	if d.DeviceIDStrategy != "" && !slices.Contains(DeviceIDStrategies, d.DeviceIDStrategy) {
		c.errf(path+".deviceIDStrategy", "use uuid or index", "unknown device ID strategy %q", d.DeviceIDStrategy)
	}
	for i, s := range d.DeviceListStrategy {
		if !slices.Contains(DeviceListStrategies, s) {
			c.errf(idx(path+".deviceListStrategy", i), "use envvar, volume-mounts, cdi-annotations or cdi-cri", "unknown device list strategy %q", s)
		}
		if slices.Index(d.DeviceListStrategy, s) != i {
			c.errf(idx(path+".deviceListStrategy", i), "list each strategy once", "%q is listed twice", s)
		}
	}
	if d.CDIAnnotationPrefix != "" {
		if errs := validation.IsQualifiedName(strings.TrimSuffix(d.CDIAnnotationPrefix, "/") + "/x"); len(errs) > 0 {
			c.errf(path+".cdiAnnotationPrefix", "use a DNS subdomain followed by '/', e.g. cdi.k8s.io/", "not an annotation prefix: %s", strings.Join(errs, "; "))
		}
	}
	if d.MPSRoot != "" && !strings.HasPrefix(d.MPSRoot, "/") {
		c.errf(path+".mpsRoot", "use an absolute path such as /run/nvidia/mps", "%q is not an absolute path", d.MPSRoot)
	}
	if d.Resources != nil {
		for i, r := range d.Resources.GPUs {
			validatePattern(c, r, idx(path+".resources.gpus", i))
		}
		for i, r := range d.Resources.MIG {
			validatePattern(c, r, idx(path+".resources.mig", i))
		}
	}
}

func validatePattern(c *collector, r ResourcePattern, path string) {
	if r.Pattern == "" {
		c.errf(path+".pattern", "set a pattern such as \"*A100*\"", "pattern is empty")
	}
	validateResourceName(c, r.Name, path+".name")
}

// ValidResourceName checks an extended resource name such as nvidia.com/gpu.shared.
func validateResourceName(c *collector, name, path string) {
	if name == "" {
		c.errf(path, "set a name such as nvidia.com/gpu.shared", "resource name is empty")
		return
	}
	domain, short, ok := strings.Cut(name, "/")
	if !ok {
		c.errf(path, "add a domain, e.g. nvidia.com/"+name, "%q has no domain prefix; extended resources are domain/name", name)
		return
	}
	if domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io") {
		c.errf(path, "use a domain of your own, e.g. nvidia.com", "the kubernetes.io domain is reserved")
		return
	}
	if errs := validation.IsQualifiedName(name); len(errs) > 0 {
		c.errf(path, "use letters, digits, '-', '_' and '.' in the name, at most 63 characters", "%q is not a valid resource name: %s", name, strings.Join(errs, "; "))
		return
	}
	_ = short
}

// ResetXIDs are the XIDs after which a GPU is unusable until it is reset (double-bit ECC, fallen off
// the bus, uncontained ECC). They always make a device unhealthy and cannot be ignored.
var ResetXIDs = []uint64{48, 79, 95}

func validateHealth(c *collector, h *HealthSettings, path string) {
	if h == nil {
		return
	}
	for i, x := range h.IgnoredXIDs {
		if slices.Contains(ResetXIDs, x) {
			c.errf(idx(path+".ignoredXIDs", i), "remove it: the GPU must be reset before it can be used again, so Tessera always marks it unhealthy",
				"XID %d cannot be ignored", x)
		}
	}
	for i, x := range h.CriticalXIDs {
		if slices.Contains(h.IgnoredXIDs, x) {
			c.errf(idx(path+".criticalXIDs", i), "list the XID in one of the two lists", "XID %d is both ignored and critical", x)
		}
	}
}

func validateSelector(c *collector, s *GPUSelector, path string) {
	if len(s.Indices) == 0 && len(s.UUIDs) == 0 && len(s.ProductNames) == 0 && s.MigCapable == nil && s.MigEnabled == nil {
		c.errf(path, "name indices, uuids, productNames, migCapable or migEnabled; put node-wide settings in spec.defaults", "selector is empty")
	}
	for i, n := range s.Indices {
		if n < 0 || n > 1023 {
			c.errf(idx(path+".indices", i), "use the GPU's NVML index (tessera inspect lists them)", "index %d is out of range", n)
		}
	}
	for i, u := range s.UUIDs {
		if !strings.HasPrefix(u, "GPU-") || len(u) < 8 {
			c.errf(idx(path+".uuids", i), "use the GPU UUID as nvidia-smi -L prints it (GPU-…); select MIG devices through their parent GPU", "%q is not a GPU UUID", u)
		}
	}
	for i, p := range s.ProductNames {
		if strings.TrimSpace(p) == "" {
			c.errf(idx(path+".productNames", i), "use a product name such as \"NVIDIA H100 80GB HBM3\" or a pattern such as \"*H100*\"", "product name is empty")
		}
	}
}

func validateSharing(c *collector, p *SharingProfile, s *Sharing, path string) {
	switch s.Owner {
	case OwnerDevicePlugin, OwnerDRA:
	case OwnerNone:
		if s.Mode != "" {
			c.errf(path+".mode", "remove mode, or pick owner device-plugin or dra", "a GPU with owner none is served by no one and has no mode")
		}
		for _, b := range setBlocks(s) {
			c.errf(path+"."+b, "remove it", "a GPU with owner none has no sharing settings")
		}
		if s.ResourceName != "" {
			c.errf(path+".resourceName", "remove it", "a GPU with owner none has no resource name")
		}
		return
	case "":
		c.errf(path+".owner", fixOwner, "owner is required")
	default:
		c.errf(path+".owner", fixOwner, "unknown owner %q", s.Owner)
	}
	if len(s.Modes) > 0 {
		validateModes(c, p, s, path)
		return
	}
	if s.Mode == "" {
		c.errf(path+".mode", fixMode, "mode is required")
		return
	}
	if !slices.Contains(Modes, s.Mode) {
		c.errf(path+".mode", fixMode, "unknown mode %q", s.Mode)
		return
	}
	want := blockFor(s.Mode)
	for _, b := range setBlocks(s) {
		if b != want {
			c.errf(path+"."+b, "remove "+b+" or change the mode", "%s", exclusion(s.Mode, b))
		}
	}
	dp := s.Owner == OwnerDevicePlugin
	if s.ResourceName != "" {
		switch {
		case !dp:
			c.errf(path+".resourceName", "remove it; DRA devices are requested through DeviceClasses", "resourceName is a device-plugin setting")
		case s.Mode != ModeWhole && s.Mode != ModeTimeSliced && s.Mode != ModeMPS:
			c.errf(path+".resourceName", "name MIG resources with spec.devicePlugin.resources.mig or mig.timeSlicing[].resourceName", "resourceName applies to modes whole, time-sliced and mps")
		default:
			validateResourceName(c, s.ResourceName, path+".resourceName")
		}
	}
	switch s.Mode {
	case ModeTimeSliced:
		t := s.TimeSlicing
		if t == nil {
			if dp {
				c.errf(path+".timeSlicing.replicas", "add timeSlicing: {replicas: N} with N ≥ 2", "the device plugin needs a replica count for mode time-sliced")
			}
			return
		}
		tp := path + ".timeSlicing"
		switch {
		case dp && t.Replicas < 2:
			c.errf(tp+".replicas", "set replicas to 2 or more, or use mode whole for one container per GPU", "replicas is %d; time-slicing needs at least 2", t.Replicas)
		case t.Replicas < 0:
			c.errf(tp+".replicas", "use 0 for no limit or a positive count", "replicas is %d", t.Replicas)
		case t.Replicas > MaxReplicas:
			c.errf(tp+".replicas", fmt.Sprintf("use at most %d", MaxReplicas), "replicas is %d", t.Replicas)
		}
		if t.Interval != "" && !slices.Contains(Intervals, t.Interval) {
			c.errf(tp+".interval", "use Default, Short, Medium or Long", "unknown interval %q", t.Interval)
		}
		if t.FailRequestsGreaterThanOne && !dp {
			c.warnf(tp+".failRequestsGreaterThanOne", "has no effect for owner dra: a claim asks for devices, not replicas")
		}
	case ModeMPS:
		validateMPS(c, s.MPS, path+".mps", dp)
	case ModeMIGStatic:
		m := s.MIG
		mp := path + ".mig"
		if m == nil || m.Layout == "" {
			c.errf(mp+".layout", "name a layout from spec.migLayouts, all-<profile> (e.g. all-1g.10gb) or existing", "mode mig-static needs a MIG layout")
			return
		}
		switch {
		case m.Layout == LayoutExisting:
		case strings.HasPrefix(m.Layout, "all-"):
			if !ValidMIGProfileName(strings.TrimPrefix(m.Layout, "all-")) {
				c.errf(mp+".layout", "write all-<profile> with a MIG profile name, e.g. all-1g.10gb", "%q does not name a MIG profile", m.Layout)
			}
		default:
			if _, ok := p.Spec.MIGLayouts[m.Layout]; !ok {
				c.errf(mp+".layout", "define it under spec.migLayouts or use all-<profile> or existing", "layout %q is not defined", m.Layout)
			}
		}
		if len(m.TimeSlicing) > 0 && !dp {
			c.errf(mp+".timeSlicing", "remove it; DRA claims share a MIG device through a GPUConfig with sharing strategy TimeSlicing", "MIG replicas are a device-plugin setting")
		}
		seen := map[string]bool{}
		for i, r := range m.TimeSlicing {
			rp := idx(mp+".timeSlicing", i)
			if !ValidMIGProfileName(r.Profile) {
				c.errf(rp+".profile", "use a MIG profile name such as 1g.10gb", "%q is not a MIG profile name", r.Profile)
			}
			if seen[r.Profile] {
				c.errf(rp+".profile", "list each profile once", "profile %q is listed twice", r.Profile)
			}
			seen[r.Profile] = true
			if r.Replicas < 2 || r.Replicas > MaxReplicas {
				c.errf(rp+".replicas", fmt.Sprintf("use 2 to %d", MaxReplicas), "replicas is %d", r.Replicas)
			}
			if r.ResourceName != "" {
				validateResourceName(c, r.ResourceName, rp+".resourceName")
			}
		}
		if dp && p.Spec.DevicePlugin != nil && p.Spec.DevicePlugin.MIGStrategy == "none" {
			c.errf(path+".mode", "set spec.devicePlugin.migStrategy to mixed (or single)", "migStrategy none exposes no MIG devices, so the device plugin cannot serve mode mig-static")
		}
	case ModeMIGDynamic:
		if dp {
			c.errf(path+".owner", "set owner: dra, or use mode mig-static for the device plugin", "mode mig-dynamic needs the DRA driver: the device plugin advertises a fixed set of devices")
		}
		if s.MIGDynamic != nil {
			for i, prof := range s.MIGDynamic.Profiles {
				if !ValidMIGProfileName(prof) {
					c.errf(idx(path+".migDynamic.profiles", i), "use a MIG profile name such as 1g.10gb", "%q is not a MIG profile name", prof)
				}
			}
		}
	case ModeShared:
		if dp {
			c.errf(path+".owner", "set owner: dra, or use time-sliced or mps for the device plugin", "mode shared publishes consumable capacity, which only DRA has")
		}
		if sh := s.Shared; sh != nil {
			sp := path + ".shared"
			switch sh.Isolation {
			case "", ModeTimeSliced, ModeMPS:
			default:
				c.errf(sp+".isolation", "use time-sliced or mps", "unknown isolation %q", sh.Isolation)
			}
			if sh.MaxClients < 0 {
				c.errf(sp+".maxClients", "use 0 for no bound or a positive count", "maxClients is %d", sh.MaxClients)
			}
			if sh.Isolation == ModeMPS && sh.MaxClients > MaxMPSClients {
				c.errf(sp+".maxClients", fmt.Sprintf("use at most %d", MaxMPSClients), "MPS serves at most %d clients per GPU", MaxMPSClients)
			}
			if sh.MemoryStep != nil && sh.MemoryStep.Sign() <= 0 {
				c.errf(sp+".memoryStep", "use a positive size such as 1Gi", "memoryStep must be positive")
			}
			if r := sh.MemoryReserve; r != nil && r.Sign() < 0 {
				c.errf(sp+".memoryReserve", "use 0 or a positive size such as 2Gi", "memoryReserve is %s, negative", r.String())
			}
			if dm := sh.DefaultMemory; dm != nil {
				step := resource.MustParse(DefaultSharedMemoryStep)
				if sh.MemoryStep != nil {
					step = *sh.MemoryStep
				}
				switch {
				case dm.Sign() <= 0:
					c.errf(sp+".defaultMemory", "use a positive multiple of memoryStep such as "+step.String(), "defaultMemory must be positive")
				case step.Sign() > 0 && dm.Value()%step.Value() != 0:
					c.errf(sp+".defaultMemory", fmt.Sprintf("use a multiple of memoryStep (%s), e.g. %s", step.String(), roundUp(dm.Value(), step.Value()).String()), "defaultMemory %s is not a multiple of memoryStep %s: the scheduler would refuse the GPU's request policy", dm.String(), step.String())
				}
			}
			if p := sh.DefaultComputePercent; p < 0 || p > 100 {
				c.errf(sp+".defaultComputePercent", "use 1 to 100, or leave it out for the default", "defaultComputePercent is %d, not a percentage", p)
			}
		}
	}
}

// SiblingModes are the modes a GPU can be offered in at once (Sharing.Modes): all run with MIG
// off, and the driver switches between them without a GPU reset.
var SiblingModes = []Mode{ModeWhole, ModeTimeSliced, ModeShared}

// validateModes checks a rule that offers a GPU in several modes, each with its own settings.
func validateModes(c *collector, p *SharingProfile, s *Sharing, path string) {
	mp := path + ".modes"
	if s.Mode != "" {
		c.errf(path+".mode", "remove mode; modes lists every mode the GPU is offered in", "mode and modes are both set")
	}
	if s.Owner == OwnerDevicePlugin {
		c.errf(path+".owner", "set owner: dra, or pick one mode for the device plugin", "modes needs the DRA driver: only the scheduler can pick a GPU's mode per claim")
	}
	if len(s.Modes) < 2 {
		c.errf(mp, "list two or more of whole, time-sliced and shared, or use mode", "modes has %d entry", len(s.Modes))
	}
	seen := map[Mode]bool{}
	want := map[string]bool{}
	for i, m := range s.Modes {
		switch {
		case !slices.Contains(SiblingModes, m):
			c.errf(idx(mp, i), "use whole, time-sliced or shared", "mode %q cannot be offered beside others: MIG modes need MIG mode on (a GPU reset on Ampere) and mps needs the device plugin", m)
			continue
		case seen[m]:
			c.errf(idx(mp, i), "list each mode once", "mode %s is listed twice", m)
			continue
		}
		seen[m] = true
		want[blockFor(m)] = true
		one := *s
		one.Modes, one.Mode = nil, m
		// Each mode is checked with its own settings only.
		one.TimeSlicing, one.Shared = nil, nil
		if m == ModeTimeSliced {
			one.TimeSlicing = s.TimeSlicing
		}
		if m == ModeShared {
			one.Shared = s.Shared
		}
		validateSharing(c, p, &one, path)
	}
	for _, b := range setBlocks(s) {
		if !want[b] {
			c.errf(path+"."+b, "remove "+b+" or add its mode to modes", "none of the modes %v uses %s settings", s.Modes, b)
		}
	}
}

func validateMPS(c *collector, m *MPSSettings, path string, dp bool) {
	if m == nil {
		c.errf(path, "add mps: {replicas: N} or mps: {shares: [...]}", "mode mps needs replicas or shares")
		return
	}
	switch {
	case m.Replicas != 0 && len(m.Shares) > 0:
		c.errf(path, "keep replicas for equal clients or shares for unequal ones", "replicas and shares are both set")
	case m.Replicas == 0 && len(m.Shares) == 0:
		c.errf(path+".replicas", "set replicas (equal clients) or shares (unequal clients)", "mode mps needs replicas or shares")
	case len(m.Shares) == 0 && (m.Replicas < 2 || m.Replicas > MaxMPSClients):
		c.errf(path+".replicas", fmt.Sprintf("use 2 to %d, or mode whole for one container per GPU", MaxMPSClients), "replicas is %d; MPS serves 2 to %d clients per GPU", m.Replicas, MaxMPSClients)
	}
	if m.ActiveThreadPercentage != nil && (*m.ActiveThreadPercentage < 1 || *m.ActiveThreadPercentage > 100) {
		c.errf(path+".activeThreadPercentage", "use 1 to 100", "is %d", *m.ActiveThreadPercentage)
	}
	positive(c, m.PinnedMemoryLimit, path+".pinnedMemoryLimit")
	if len(m.Shares) > 0 {
		if m.ActiveThreadPercentage != nil {
			c.errf(path+".activeThreadPercentage", "set activeThreadPercentage on each share", "with shares, limits are per share")
		}
		if m.PinnedMemoryLimit != nil {
			c.errf(path+".pinnedMemoryLimit", "set pinnedMemoryLimit on each share", "with shares, limits are per share")
		}
		total, threads := 0, 0
		for i, sh := range m.Shares {
			sp := idx(path+".shares", i)
			n := sh.Count
			if n == 0 {
				n = 1
			}
			if n < 0 || n > MaxMPSClients {
				c.errf(sp+".count", fmt.Sprintf("use 1 to %d", MaxMPSClients), "count is %d", sh.Count)
				continue
			}
			total += n
			if sh.ActiveThreadPercentage < 1 || sh.ActiveThreadPercentage > 100 {
				c.errf(sp+".activeThreadPercentage", "use 1 to 100 (the share's percentage of the GPU's SMs)", "is %d", sh.ActiveThreadPercentage)
			}
			threads += n * sh.ActiveThreadPercentage
			positive(c, sh.PinnedMemoryLimit, sp+".pinnedMemoryLimit")
		}
		if total < 2 || total > MaxMPSClients {
			c.errf(path+".shares", fmt.Sprintf("make the shares add up to 2 to %d clients", MaxMPSClients), "the shares make %d clients", total)
		}
		if threads > 100 {
			c.warnf(path+".shares", "thread percentages add up to %d%%: clients may contend for SMs (an MPS thread limit is a cap, not a reservation)", threads)
		}
	}
	if !dp && m.FailRequestsGreaterThanOne != nil {
		c.warnf(path+".failRequestsGreaterThanOne", "has no effect for owner dra")
	}
}

// roundUp is v rounded up to a multiple of step, as a binary quantity.
func roundUp(v, step int64) *resource.Quantity {
	n := (v + step - 1) / step * step
	return resource.NewQuantity(n, resource.BinarySI)
}

func positive(c *collector, q *resource.Quantity, path string) {
	if q != nil && q.Sign() <= 0 {
		c.errf(path, "use a positive size such as 10Gi", "must be positive")
	}
}

func blockFor(m Mode) string {
	switch m {
	case ModeTimeSliced:
		return "timeSlicing"
	case ModeMPS:
		return "mps"
	case ModeMIGStatic:
		return "mig"
	case ModeMIGDynamic:
		return "migDynamic"
	case ModeShared:
		return "shared"
	}
	return ""
}

func setBlocks(s *Sharing) []string {
	var out []string
	if s.TimeSlicing != nil {
		out = append(out, "timeSlicing")
	}
	if s.MPS != nil {
		out = append(out, "mps")
	}
	if s.MIG != nil {
		out = append(out, "mig")
	}
	if s.MIGDynamic != nil {
		out = append(out, "migDynamic")
	}
	if s.Shared != nil {
		out = append(out, "shared")
	}
	return out
}
