package api

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NVIDIAConfig is NVIDIA's k8s-device-plugin config file, `version: v1`, as Tessera reads it: every
// field NVIDIA documents is known here, so a typo is an error rather than a silent no-op.
// docs/nvidia-config-compat.md lists what each field does in Tessera.
type NVIDIAConfig struct {
	Version   string           `json:"version,omitempty"`
	Flags     *NVIDIAFlags     `json:"flags,omitempty"`
	Resources *NVIDIAResources `json:"resources,omitempty"`
	Sharing   *NVIDIASharing   `json:"sharing,omitempty"`
	Imex      *NVIDIAImex      `json:"imex,omitempty"`
	Health    *NVIDIAHealth    `json:"health,omitempty"`
}

// NVIDIAFlags are the config's `flags`.
type NVIDIAFlags struct {
	MigStrategy              *string            `json:"migStrategy,omitempty"`
	FailOnInitError          *bool              `json:"failOnInitError,omitempty"`
	MpsRoot                  *string            `json:"mpsRoot,omitempty"`
	NvidiaDriverRoot         *string            `json:"nvidiaDriverRoot,omitempty"`
	NvidiaDevRoot            *string            `json:"nvidiaDevRoot,omitempty"`
	GDRCopyEnabled           *bool              `json:"gdrcopyEnabled,omitempty"`
	GDSEnabled               *bool              `json:"gdsEnabled,omitempty"`
	MOFEDEnabled             *bool              `json:"mofedEnabled,omitempty"`
	UseNodeFeatureAPI        *bool              `json:"useNodeFeatureAPI,omitempty"`
	DeviceDiscoveryStrategy  *string            `json:"deviceDiscoveryStrategy,omitempty"`
	RestartOnDeviceUnhealthy *bool              `json:"restartOnDeviceUnhealthy,omitempty"`
	Plugin                   *NVIDIAPluginFlags `json:"plugin,omitempty"`
	GFD                      *NVIDIAGFDFlags    `json:"gfd,omitempty"`
}

// NVIDIAPluginFlags are `flags.plugin`.
type NVIDIAPluginFlags struct {
	PassDeviceSpecs     *bool         `json:"passDeviceSpecs,omitempty"`
	DeviceListStrategy  *StringOrList `json:"deviceListStrategy,omitempty"`
	DeviceIDStrategy    *string       `json:"deviceIDStrategy,omitempty"`
	CDIAnnotationPrefix *string       `json:"cdiAnnotationPrefix,omitempty"`
	NvidiaCTKPath       *string       `json:"nvidiaCTKPath,omitempty"`
	NvidiaCDIHookPath   *string       `json:"nvidiaCDIHookPath,omitempty"`
	ContainerDriverRoot *string       `json:"containerDriverRoot,omitempty"`
	KubeletSocket       *string       `json:"kubeletSocket,omitempty"`
	CDIFeatureFlags     *StringOrList `json:"cdiFeatureFlags,omitempty"`
}

// NVIDIAGFDFlags are `flags.gfd` (GPU feature discovery; no effect on a device plugin).
type NVIDIAGFDFlags struct {
	Oneshot         *bool   `json:"oneshot,omitempty"`
	NoTimestamp     *bool   `json:"noTimestamp,omitempty"`
	SleepInterval   *string `json:"sleepInterval,omitempty"`
	OutputFile      *string `json:"outputFile,omitempty"`
	MachineTypeFile *string `json:"machineTypeFile,omitempty"`
}

// NVIDIAResources are `resources`.
type NVIDIAResources struct {
	GPUs []ResourcePattern `json:"gpus,omitempty"`
	MIGs []ResourcePattern `json:"mig,omitempty"`
}

// NVIDIASharing is `sharing`.
type NVIDIASharing struct {
	TimeSlicing *NVIDIAReplicated `json:"timeSlicing,omitempty"`
	MPS         *NVIDIAReplicated `json:"mps,omitempty"`
}

// NVIDIAReplicated is `sharing.timeSlicing` or `sharing.mps`.
type NVIDIAReplicated struct {
	RenameByDefault            bool                       `json:"renameByDefault,omitempty"`
	FailRequestsGreaterThanOne *bool                      `json:"failRequestsGreaterThanOne,omitempty"`
	Resources                  []NVIDIAReplicatedResource `json:"resources,omitempty"`
}

// NVIDIAReplicatedResource is one entry of `resources` under a sharing strategy.
type NVIDIAReplicatedResource struct {
	Name     string         `json:"name"`
	Rename   string         `json:"rename,omitempty"`
	Devices  *NVIDIADevices `json:"devices,omitempty"`
	Replicas int            `json:"replicas"`
}

// NVIDIAImex is `imex`.
type NVIDIAImex struct {
	ChannelIDs []int `json:"channelIDs,omitempty"`
	Required   bool  `json:"required,omitempty"`
}

// NVIDIAHealth is `health`.
type NVIDIAHealth struct {
	Disabled     bool       `json:"disabled,omitempty"`
	EventTypes   []string   `json:"eventTypes,omitempty"`
	IgnoredXIDs  []uint64   `json:"ignoredXIDs,omitempty"`
	CriticalXIDs *XIDsOrAll `json:"criticalXIDs,omitempty"`
}

// StringOrList is a string or a list of strings.
type StringOrList []string

// UnmarshalJSON accepts "a" or ["a", "b"].
func (s *StringOrList) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return fmt.Errorf("want a string or a list of strings, got %s", truncate(string(b), 40))
	}
	*s = many
	return nil
}

// XIDsOrAll is "all" or a list of XIDs.
type XIDsOrAll struct {
	All  bool
	XIDs []uint64
}

// UnmarshalJSON accepts "all" or a list of numbers.
func (x *XIDsOrAll) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if strings.EqualFold(s, "all") {
			x.All = true
			return nil
		}
		return fmt.Errorf("want \"all\" or a list of XIDs, got %q", truncate(s, 40))
	}
	if err := json.Unmarshal(b, &x.XIDs); err != nil {
		return fmt.Errorf("want \"all\" or a list of XIDs (whole numbers)")
	}
	return nil
}

// MarshalJSON writes "all" or the list.
func (x XIDsOrAll) MarshalJSON() ([]byte, error) {
	if x.All {
		return json.Marshal("all")
	}
	return json.Marshal(x.XIDs)
}

// NVIDIADevices is a resource's `devices`: "all", a count, or a list of GPU indices, UUIDs, MIG
// indices ("0:1") or MIG UUIDs.
type NVIDIADevices struct {
	All   bool
	Count int
	List  []string
}

// UnmarshalJSON accepts "all", a positive count, or a list of numbers and strings.
func (d *NVIDIADevices) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if s != "all" {
			return fmt.Errorf("the only string allowed is \"all\", got %q", truncate(s, 40))
		}
		d.All = true
		return nil
	}
	var n int
	if err := json.Unmarshal(b, &n); err == nil {
		if n <= 0 {
			return fmt.Errorf("a device count must be positive, got %d", n)
		}
		d.Count = n
		return nil
	}
	var list []json.RawMessage
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("want \"all\", a count or a list of devices")
	}
	for i, raw := range list {
		var u uint
		if err := json.Unmarshal(raw, &u); err == nil {
			d.List = append(d.List, strconv.FormatUint(uint64(u), 10))
			continue
		}
		var item string
		if err := json.Unmarshal(raw, &item); err != nil {
			return fmt.Errorf("entry %d is neither a GPU index nor a string", i)
		}
		d.List = append(d.List, item)
	}
	return nil
}

func (d *NVIDIADevices) fixHint() string {
	return "write devices: all, or a list of GPU indices and UUIDs such as [0, 1]"
}

func (s *StringOrList) fixHint() string { return "write one string or a list of strings" }

func (x *XIDsOrAll) fixHint() string { return "write \"all\" or a list such as [48, 79]" }

// MarshalJSON writes the union back.
func (d NVIDIADevices) MarshalJSON() ([]byte, error) {
	switch {
	case d.All:
		return json.Marshal("all")
	case d.Count > 0:
		return json.Marshal(d.Count)
	}
	return json.Marshal(d.List)
}

// ParseNVIDIAConfig strictly decodes an NVIDIA device-plugin config (YAML or JSON).
func ParseNVIDIAConfig(data []byte) (*NVIDIAConfig, ErrorList) {
	var c NVIDIAConfig
	if errs := decodeStrict(data, &c); errs != nil {
		return nil, errs
	}
	return &c, nil
}

const nvidiaPrefix = "nvidia.com/"

func nvidiaResourceName(n string) string {
	if n != "" && !strings.Contains(n, "/") {
		return nvidiaPrefix + n
	}
	return n
}

// ConvertNVIDIAConfig turns an NVIDIA config into a SharingProfile. Fields that have no effect in
// Tessera are accepted with a warning; fields Tessera cannot honour are refused. Unlike NVIDIA's
// plugin, `rename` and `devices` are honoured, and time-slicing and MPS may both be used on one
// node when their devices do not overlap. Paths in warnings and errors are the NVIDIA file's own.
func ConvertNVIDIAConfig(nc *NVIDIAConfig) (*SharingProfile, Warnings, ErrorList) {
	c := &collector{}
	if nc.Version != "" && nc.Version != "v1" {
		c.errf("version", "set version: v1", "unknown version %q; Tessera reads NVIDIA's config version v1", nc.Version)
		return nil, nil, c.errs
	}
	dp := &DevicePluginSettings{MIGStrategy: "none"}
	p := &SharingProfile{
		TypeMeta: metav1.TypeMeta{APIVersion: APIVersion, Kind: KindSharingProfile},
		Spec:     SharingProfileSpec{DevicePlugin: dp},
	}
	convertFlags(c, nc.Flags, dp)
	if r := nc.Resources; r != nil && (len(r.GPUs) > 0 || len(r.MIGs) > 0) {
		dp.Resources = &ResourceNaming{}
		for _, x := range r.GPUs {
			dp.Resources.GPUs = append(dp.Resources.GPUs, ResourcePattern{Pattern: x.Pattern, Name: nvidiaResourceName(x.Name)})
		}
		for _, x := range r.MIGs {
			dp.Resources.MIG = append(dp.Resources.MIG, ResourcePattern{Pattern: x.Pattern, Name: nvidiaResourceName(x.Name)})
		}
	}
	if im := nc.Imex; im != nil && (len(im.ChannelIDs) > 0 || im.Required) {
		c.warnf("imex", "accepted and ignored: Tessera does not inject IMEX channels yet")
	}
	convertHealth(c, nc.Health, p)

	var mig *Rule
	if dp.MIGStrategy == "mixed" || dp.MIGStrategy == "single" {
		mig = &Rule{Name: "nvidia-mig-enabled", Selector: GPUSelector{MigEnabled: ptr(true)},
			Sharing: Sharing{Owner: OwnerDevicePlugin, Mode: ModeMIGStatic, MIG: &MIGSettings{Layout: LayoutExisting}}}
	}
	var gpuRules []Rule
	var defaults *Sharing
	defaultsFrom := ""
	if sh := nc.Sharing; sh != nil {
		for _, st := range []struct {
			path string
			rr   *NVIDIAReplicated
			mode Mode
		}{{"sharing.timeSlicing", sh.TimeSlicing, ModeTimeSliced}, {"sharing.mps", sh.MPS, ModeMPS}} {
			if st.rr == nil {
				continue
			}
			if len(st.rr.Resources) == 0 {
				c.warnf(st.path+".resources", "no resources listed, so nothing is shared")
			}
			for i, r := range st.rr.Resources {
				rp := idx(st.path+".resources", i)
				name := nvidiaResourceName(r.Name)
				rename := nvidiaResourceName(r.Rename)
				if rename == "" && st.rr.RenameByDefault {
					rename = name + ".shared"
				}
				if r.Name == "" {
					c.errf(rp+".name", "name the resource to share, e.g. nvidia.com/gpu", "name is empty")
					continue
				}
				if st.mode == ModeTimeSliced && (r.Replicas < 2 || r.Replicas > MaxReplicas) {
					c.errf(rp+".replicas", fmt.Sprintf("use 2 to %d", MaxReplicas), "replicas is %d", r.Replicas)
					continue
				}
				if st.mode == ModeMPS && (r.Replicas < 2 || r.Replicas > MaxMPSClients) {
					c.errf(rp+".replicas", fmt.Sprintf("use 2 to %d", MaxMPSClients), "replicas is %d; MPS serves 2 to %d clients per GPU", r.Replicas, MaxMPSClients)
					continue
				}
				failGT1 := st.rr.FailRequestsGreaterThanOne
				if profile, ok := strings.CutPrefix(name, nvidiaPrefix+"mig-"); ok {
					if st.mode == ModeMPS {
						c.errf(rp+".name", "share whole GPUs with MPS, or time-slice the MIG devices", "MPS on MIG devices is not supported (NVIDIA's plugin refuses it too)")
						continue
					}
					if mig == nil || dp.MIGStrategy != "mixed" {
						c.errf(rp+".name", "set flags.migStrategy: mixed", "MIG resources such as %s exist only with migStrategy mixed", name)
						continue
					}
					if r.Devices != nil && !r.Devices.All {
						c.errf(rp+".devices", "remove devices (all MIG devices of the profile are replicated)", "selecting MIG devices of one profile is not supported; MIG devices are replicated per profile")
						continue
					}
					if slices.ContainsFunc(mig.MIG.TimeSlicing, func(x MIGReplicas) bool { return x.Profile == profile }) {
						c.errf(rp+".name", "list each resource once", "%s is listed twice", name)
						continue
					}
					mig.MIG.TimeSlicing = append(mig.MIG.TimeSlicing, MIGReplicas{Profile: profile, Replicas: r.Replicas, ResourceName: rename, FailRequestsGreaterThanOne: failGT1 != nil && *failGT1})
					continue
				}
				var productSel []string
				if name != nvidiaPrefix+"gpu" {
					pat := ""
					if dp.Resources != nil {
						for _, g := range dp.Resources.GPUs {
							if g.Name == name {
								pat = g.Pattern
							}
						}
					}
					if pat == "" {
						c.errf(rp+".name", "use nvidia.com/gpu, nvidia.com/mig-<profile>, or a name from resources.gpus", "no GPU resource is called %s", name)
						continue
					}
					productSel = []string{pat}
				} else if dp.MIGStrategy == "single" {
					c.errf(rp+".name", "write a SharingProfile with mig.timeSlicing to replicate MIG devices", "with migStrategy single, nvidia.com/gpu names MIG devices; replicating them this way is not supported by the converter")
					continue
				}
				sharing := Sharing{Owner: OwnerDevicePlugin, Mode: st.mode, ResourceName: rename}
				if st.mode == ModeTimeSliced {
					sharing.TimeSlicing = &TimeSlicingSettings{Replicas: r.Replicas, FailRequestsGreaterThanOne: failGT1 != nil && *failGT1}
				} else {
					sharing.MPS = &MPSSettings{Replicas: r.Replicas, FailRequestsGreaterThanOne: failGT1}
				}
				sels, ok := devicesSelectors(c, r.Devices, rp+".devices")
				if !ok {
					continue
				}
				if len(sels) == 0 && productSel == nil && mig == nil {
					if defaults != nil {
						c.errf(rp+".devices", "give each strategy its own GPUs with devices: [indices]", "this entry and %s both apply to every GPU; a GPU has exactly one mode", defaultsFrom)
						continue
					}
					defaults, defaultsFrom = &sharing, rp
					continue
				}
				if len(sels) == 0 {
					sels = []GPUSelector{{}}
				}
				for j, sel := range sels {
					sel.ProductNames = productSel
					if mig != nil {
						sel.MigEnabled = ptr(false)
					}
					name := fmt.Sprintf("nvidia-%s-%d", strings.TrimPrefix(st.path, "sharing."), i)
					if len(sels) > 1 {
						name += fmt.Sprintf("-%d", j)
					}
					gpuRules = append(gpuRules, Rule{Name: name, Selector: sel, Sharing: sharing})
				}
			}
		}
	}
	if defaults == nil {
		defaults = &Sharing{Owner: OwnerDevicePlugin, Mode: ModeWhole}
	}
	p.Spec.Defaults = defaults
	p.Spec.Rules = gpuRules
	if mig != nil {
		p.Spec.Rules = append(p.Spec.Rules, *mig)
	}
	if len(c.errs) > 0 {
		return nil, c.warns, c.errs
	}
	return p, c.warns, nil
}

func ptr[T any](v T) *T { return &v }

func devicesSelectors(c *collector, d *NVIDIADevices, path string) ([]GPUSelector, bool) {
	if d == nil || d.All {
		return nil, true
	}
	if d.Count > 0 {
		c.errf(path, "list the GPU indices to share, e.g. devices: [0, 1]", "a device count (%d) does not say which GPUs; NVIDIA's plugin ignores it, Tessera refuses it", d.Count)
		return nil, false
	}
	if len(d.List) == 0 {
		c.errf(path, "list GPU indices or UUIDs, or use \"all\"", "the device list is empty")
		return nil, false
	}
	var indices []int
	var uuids []string
	ok := true
	for i, item := range d.List {
		ip := idx(path, i)
		switch {
		case isUint(item):
			n, _ := strconv.Atoi(item)
			indices = append(indices, n)
		case strings.HasPrefix(item, "GPU-"):
			uuids = append(uuids, item)
		case strings.HasPrefix(item, "MIG-") || isMigIndex(item):
			c.errf(ip, "select the parent GPU, or time-slice all MIG devices of a profile with name nvidia.com/mig-<profile>", "%q is a MIG device; Tessera assigns sharing per GPU", item)
			ok = false
		default:
			c.errf(ip, "use a GPU index (0) or a GPU UUID (GPU-…)", "%q is not a GPU index or UUID", truncate(item, 60))
			ok = false
		}
	}
	if !ok {
		return nil, false
	}
	var out []GPUSelector
	if len(indices) > 0 {
		out = append(out, GPUSelector{Indices: indices})
	}
	if len(uuids) > 0 {
		out = append(out, GPUSelector{UUIDs: uuids})
	}
	return out, true
}

func isUint(s string) bool {
	if s == "" || len(s) > 4 {
		return false
	}
	_, err := strconv.ParseUint(s, 10, 16)
	return err == nil
}

func isMigIndex(s string) bool {
	a, b, ok := strings.Cut(s, ":")
	return ok && isUint(a) && isUint(b)
}

func convertFlags(c *collector, f *NVIDIAFlags, dp *DevicePluginSettings) {
	if f == nil {
		return
	}
	if f.MigStrategy != nil {
		if !slices.Contains(MIGStrategies, *f.MigStrategy) {
			c.errf("flags.migStrategy", "use none, single or mixed", "unknown MIG strategy %q", *f.MigStrategy)
		} else {
			dp.MIGStrategy = *f.MigStrategy
		}
	}
	dp.FailOnInitError = f.FailOnInitError
	if f.MpsRoot != nil {
		dp.MPSRoot = *f.MpsRoot
	}
	ignored := func(path, why string, set bool) {
		if set {
			c.warnf(path, "accepted and ignored: %s", why)
		}
	}
	ignored("flags.nvidiaDriverRoot", "Tessera takes the driver root from its DaemonSet (--driver-root), not from a per-node profile", f.NvidiaDriverRoot != nil)
	ignored("flags.nvidiaDevRoot", "Tessera takes the device root from its DaemonSet, not from a per-node profile", f.NvidiaDevRoot != nil)
	ignored("flags.gdrcopyEnabled", "GDRCopy devices are not injected by Tessera", f.GDRCopyEnabled != nil && *f.GDRCopyEnabled)
	ignored("flags.gdsEnabled", "GPUDirect Storage devices are not injected by Tessera", f.GDSEnabled != nil && *f.GDSEnabled)
	ignored("flags.mofedEnabled", "MOFED devices are not injected by Tessera", f.MOFEDEnabled != nil && *f.MOFEDEnabled)
	ignored("flags.useNodeFeatureAPI", "a GPU feature discovery setting", f.UseNodeFeatureAPI != nil)
	ignored("flags.restartOnDeviceUnhealthy", "Tessera marks devices healthy again when they recover, without a restart", f.RestartOnDeviceUnhealthy != nil)
	if f.DeviceDiscoveryStrategy != nil {
		switch *f.DeviceDiscoveryStrategy {
		case "", "auto", "nvml":
		case "tegra":
			c.errf("flags.deviceDiscoveryStrategy", "use auto or nvml; Tessera serves discrete GPUs through NVML", "tegra (integrated GPUs) is not supported")
		default:
			c.errf("flags.deviceDiscoveryStrategy", "use auto or nvml", "unknown strategy %q", *f.DeviceDiscoveryStrategy)
		}
	}
	if pf := f.Plugin; pf != nil {
		if pf.PassDeviceSpecs != nil {
			dp.PassDeviceSpecs = *pf.PassDeviceSpecs
		}
		if pf.DeviceListStrategy != nil {
			dp.DeviceListStrategy = []string(*pf.DeviceListStrategy)
			for i, s := range dp.DeviceListStrategy {
				if !slices.Contains(DeviceListStrategies, s) {
					c.errf(idx("flags.plugin.deviceListStrategy", i), "use envvar, volume-mounts, cdi-annotations or cdi-cri", "unknown device list strategy %q", s)
				}
			}
		}
		if pf.DeviceIDStrategy != nil {
			if !slices.Contains(DeviceIDStrategies, *pf.DeviceIDStrategy) {
				c.errf("flags.plugin.deviceIDStrategy", "use uuid or index", "unknown device ID strategy %q", *pf.DeviceIDStrategy)
			} else {
				dp.DeviceIDStrategy = *pf.DeviceIDStrategy
			}
		}
		if pf.CDIAnnotationPrefix != nil {
			dp.CDIAnnotationPrefix = *pf.CDIAnnotationPrefix
		}
		ignored("flags.plugin.nvidiaCTKPath", "Tessera writes CDI specs itself and needs no nvidia-ctk", pf.NvidiaCTKPath != nil)
		ignored("flags.plugin.nvidiaCDIHookPath", "Tessera writes CDI specs itself and needs no CDI hook", pf.NvidiaCDIHookPath != nil)
		ignored("flags.plugin.containerDriverRoot", "Tessera takes the driver root from its DaemonSet", pf.ContainerDriverRoot != nil)
		ignored("flags.plugin.kubeletSocket", "the kubelet socket is a flag of the Tessera device plugin, not a per-node profile setting", pf.KubeletSocket != nil)
		ignored("flags.plugin.cdiFeatureFlags", "nvidia-ctk feature flags do not apply to Tessera's CDI specs", pf.CDIFeatureFlags != nil)
	}
	if g := f.GFD; g != nil && (g.Oneshot != nil || g.NoTimestamp != nil || g.SleepInterval != nil || g.OutputFile != nil || g.MachineTypeFile != nil) {
		c.warnf("flags.gfd", "accepted and ignored: GPU feature discovery settings do not affect the device plugin")
	}
}

var nvidiaEventTypes = []string{"EventTypeXidCriticalError", "EventTypeDoubleBitEccError", "EventTypeSingleBitEccError"}

func convertHealth(c *collector, h *NVIDIAHealth, p *SharingProfile) {
	if h == nil {
		return
	}
	hs := &HealthSettings{Disabled: h.Disabled}
	for i, x := range h.IgnoredXIDs {
		if slices.Contains(ResetXIDs, x) {
			// NVIDIA's plugin lets this through and serves a GPU that needs a reset; a drop-in must
			// accept the file, so the entry is dropped with a warning rather than refused.
			c.warnf(idx("health.ignoredXIDs", i), "XID %d is not ignored: the GPU must be reset before it can be used again", x)
			continue
		}
		hs.IgnoredXIDs = append(hs.IgnoredXIDs, x)
	}
	if h.CriticalXIDs != nil && !h.CriticalXIDs.All {
		hs.CriticalXIDs = h.CriticalXIDs.XIDs
	}
	for i, e := range h.EventTypes {
		if !slices.Contains(nvidiaEventTypes, e) {
			c.errf(idx("health.eventTypes", i), "use "+strings.Join(nvidiaEventTypes, ", "), "unknown event type %q", e)
		}
	}
	if len(h.EventTypes) > 0 && len(h.EventTypes) < len(nvidiaEventTypes) {
		c.warnf("health.eventTypes", "accepted and ignored: Tessera always watches XID and ECC events; tune what counts with ignoredXIDs and criticalXIDs")
	}
	for i, x := range hs.CriticalXIDs {
		if slices.Contains(hs.IgnoredXIDs, x) {
			c.errf(idx("health.criticalXIDs", i), "list the XID in one of the two lists", "XID %d is both ignored and critical", x)
		}
	}
	p.Spec.Health = hs
}
