package api

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// h100Node is an 8-GPU H100 node as the simulator describes it.
func h100Node() []GPUInfo {
	var out []GPUInfo
	for i := range 8 {
		out = append(out, GPUInfo{Index: i, UUID: fmt.Sprintf("GPU-0000000%d-0000-0000-0000-000000000000", i), ProductName: "NVIDIA H100 80GB HBM3",
			MigCapable: true, MemoryMiB: 81559, MigProfiles: []string{"1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"}})
	}
	return out
}

func mixedNode() []GPUInfo {
	return []GPUInfo{
		{Index: 0, UUID: "GPU-a0", ProductName: "NVIDIA A100-SXM4-40GB", MigCapable: true, MemoryMiB: 40960, MigProfiles: []string{"1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"}},
		{Index: 1, UUID: "GPU-a1", ProductName: "NVIDIA A100-SXM4-40GB", MigCapable: true, MemoryMiB: 40960, MigProfiles: []string{"1g.5gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"}},
		{Index: 2, UUID: "GPU-a2", ProductName: "NVIDIA A30", MigCapable: true, MemoryMiB: 24576},
		{Index: 3, UUID: "GPU-a3", ProductName: "NVIDIA A30", MigCapable: true, MemoryMiB: 24576},
		{Index: 4, UUID: "GPU-a4", ProductName: "NVIDIA L4", MemoryMiB: 23034},
		{Index: 5, UUID: "GPU-a5", ProductName: "NVIDIA L4", MemoryMiB: 23034},
	}
}

func mustParse(t *testing.T, doc string) *Parsed {
	t.Helper()
	p, err := ParseProfile([]byte(doc))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	return p
}

func mustResolve(t *testing.T, p *SharingProfile, gpus []GPUInfo) *Resolution {
	t.Helper()
	r, err := Resolve(p, gpus)
	if err != nil {
		t.Fatalf("resolve: %v", err)
	}
	return r
}

func examplesDir() string { return filepath.Join("..", "deployments", "examples", "sharing-profiles") }

func TestExamplesParse(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(examplesDir(), "*.yaml"))
	if len(files) < 5 {
		t.Fatalf("found %d examples", len(files))
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		name := filepath.Base(f)
		switch {
		case IsConfigMap(data):
			_, parsed, _, err := ParseConfigMap(data)
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			for k, p := range parsed {
				if _, err := Resolve(p.Profile, h100Node()); err != nil {
					t.Errorf("%s[%s]: resolve: %v", name, k, err)
				}
			}
		case strings.HasPrefix(name, "gpuconfig"):
			continue // a claim template; the webhook tests read it
		default:
			p, err := ParseProfile(data)
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			gpus := h100Node()
			if strings.Contains(name, "mixed") {
				gpus = mixedNode()
			}
			if _, err := Resolve(p.Profile, gpus); err != nil {
				t.Errorf("%s: resolve: %v", name, err)
			}
		}
	}
}

// Per-GPU modes on one node: NVIDIA's plugin allows one mode per node.
func TestPerGPUModes(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(examplesDir(), "per-gpu-modes.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	p := mustParse(t, string(data))
	r := mustResolve(t, p.Profile, h100Node())
	want := []struct {
		owner Owner
		mode  Mode
	}{
		{OwnerDevicePlugin, ModeTimeSliced}, {OwnerDevicePlugin, ModeTimeSliced}, {OwnerDevicePlugin, ModeTimeSliced}, {OwnerDevicePlugin, ModeTimeSliced},
		{OwnerDevicePlugin, ModeMPS}, {OwnerDevicePlugin, ModeMPS}, {OwnerDRA, ModeMIGStatic}, {OwnerDRA, ModeMIGStatic},
	}
	if len(r.Assignments) != 8 {
		t.Fatalf("got %d assignments", len(r.Assignments))
	}
	for i, w := range want {
		a := r.Assignments[i]
		if a.Owner != w.owner || a.Mode != w.mode {
			t.Errorf("GPU %d: got %s/%s, want %s/%s", i, a.Owner, a.Mode, w.owner, w.mode)
		}
	}
	ts := r.Assignments[0]
	if ts.Replicas != 4 || ts.Interval != IntervalMedium || ts.ComputeMode != "Default" || ts.ResourceName != "nvidia.com/gpu.shared" {
		t.Errorf("time-sliced GPU: %+v", ts)
	}
	mps := r.Assignments[4]
	if mps.ComputeMode != "ExclusiveProcess" || len(mps.MPSClients) != 3 || !mps.FailRequestsGreaterThanOne {
		t.Errorf("MPS GPU: %+v", mps)
	}
	if mps.MPSClients[0] != (MPSClient{ActiveThreadPercentage: 50, PinnedMemoryMiB: 40960}) || mps.MPSClients[2] != (MPSClient{ActiveThreadPercentage: 25, PinnedMemoryMiB: 16384}) {
		t.Errorf("MPS clients: %+v", mps.MPSClients)
	}
	mig := r.Assignments[7]
	if !mig.MIGEnabled || mig.MIG == nil || mig.MIG.Devices["1g.10gb"] != 2 || mig.ResourceName != "" {
		t.Errorf("MIG GPU: %+v", mig)
	}
	if got := len(r.Owned(OwnerDRA)); got != 2 {
		t.Errorf("DRA owns %d GPUs", got)
	}
	if a, ok := r.ForGPU(h100Node()[5].UUID); !ok || a.Mode != ModeMPS {
		t.Errorf("ForGPU: %+v %v", a, ok)
	}
	if r.DevicePlugin.MIGStrategy != "none" || r.DevicePlugin.DeviceListStrategy[0] != "cdi-cri" || !*r.DevicePlugin.FailOnInitError {
		t.Errorf("device plugin defaults: %+v", r.DevicePlugin)
	}
}

func TestRoundTrip(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(examplesDir(), "*.yaml"))
	nv, _ := filepath.Glob(filepath.Join("testdata", "nvidia", "*.yaml"))
	for _, f := range append(files, nv...) {
		data, _ := os.ReadFile(f)
		if IsConfigMap(data) || strings.Contains(f, "gpuconfig") {
			continue
		}
		p1, err := ParseProfile(data)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		out, err := MarshalProfile(p1.Profile)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := ParseProfile(out)
		if err != nil {
			t.Errorf("%s: reparse: %v\n%s", f, err, out)
			continue
		}
		if !reflect.DeepEqual(p1.Profile, p2.Profile) {
			t.Errorf("%s: round trip differs:\n%s", f, out)
		}
		if p2.Format != FormatSharingProfile {
			t.Errorf("%s: reparsed as %s", f, p2.Format)
		}
	}
}

func nvidia(t *testing.T, name string) *Parsed {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "nvidia", name))
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseProfile(data)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if p.Format != FormatNVIDIA {
		t.Fatalf("%s: read as %s", name, p.Format)
	}
	return p
}

func TestNVIDIAExamples(t *testing.T) {
	t.Run("time-slicing", func(t *testing.T) {
		p := nvidia(t, "ts-basic.yaml")
		r := mustResolve(t, p.Profile, h100Node())
		for _, a := range r.Assignments {
			if a.Mode != ModeTimeSliced || a.Replicas != 10 || a.ResourceName != "nvidia.com/gpu" || a.FailRequestsGreaterThanOne {
				t.Fatalf("GPU %d: %+v", a.GPU.Index, a)
			}
		}
	})
	t.Run("time-slicing with MIG, rename by default", func(t *testing.T) {
		p := nvidia(t, "ts-full.yaml")
		gpus := h100Node()
		gpus[6].MigEnabled, gpus[7].MigEnabled = true, true
		r := mustResolve(t, p.Profile, gpus)
		a := r.Assignments[0]
		if a.Mode != ModeTimeSliced || a.ResourceName != "nvidia.com/gpu.shared" || a.Replicas != 2 || !a.FailRequestsGreaterThanOne {
			t.Errorf("GPU 0: %+v", a)
		}
		m := r.Assignments[6]
		if m.Mode != ModeMIGStatic || !m.MIG.Existing || len(m.MIG.Replicas) != 2 {
			t.Fatalf("GPU 6: %+v", m)
		}
		if got := r.MIGResourceName(m, "1g.10gb"); got != "nvidia.com/mig-1g.10gb.shared" {
			t.Errorf("MIG resource: %s", got)
		}
		if got := r.MIGResourceName(m, "3g.40gb"); got != "nvidia.com/mig-3g.40gb" {
			t.Errorf("MIG resource: %s", got)
		}
		if got := r.MIGResourceName(m, "1g.10gb+me"); got != "nvidia.com/mig-1g.10gb.me" {
			t.Errorf("MIG resource of a +me profile: %s", got)
		}
		if r.DevicePlugin.MIGStrategy != "mixed" {
			t.Errorf("strategy %s", r.DevicePlugin.MIGStrategy)
		}
	})
	t.Run("mps", func(t *testing.T) {
		p := nvidia(t, "mps-basic.yaml")
		r := mustResolve(t, p.Profile, h100Node())
		a := r.Assignments[3]
		if a.Mode != ModeMPS || len(a.MPSClients) != 10 || a.MPSClients[0].ActiveThreadPercentage != 10 || a.MPSClients[0].PinnedMemoryMiB != 8155 || !a.FailRequestsGreaterThanOne {
			t.Errorf("GPU 3: %+v", a)
		}
	})
	t.Run("flags", func(t *testing.T) {
		p := nvidia(t, "flags-full.yaml")
		if len(p.Warnings) != 1 || !strings.Contains(p.Warnings[0].Path, "nvidiaDriverRoot") {
			t.Errorf("warnings: %v", p.Warnings)
		}
		r := mustResolve(t, p.Profile, h100Node())
		if r.DevicePlugin.DeviceListStrategy[0] != "envvar" || r.DevicePlugin.DeviceIDStrategy != "uuid" || r.Assignments[0].Mode != ModeWhole {
			t.Errorf("%+v", r.DevicePlugin)
		}
	})
	t.Run("flags list, single strategy", func(t *testing.T) {
		p := nvidia(t, "flags-list.yaml")
		if len(p.Warnings) != 1 || p.Warnings[0].Path != "flags.gfd" {
			t.Errorf("warnings: %v", p.Warnings)
		}
		dp := p.Profile.Spec.DevicePlugin
		if !reflect.DeepEqual(dp.DeviceListStrategy, []string{"cdi-annotations", "envvar"}) || dp.DeviceIDStrategy != "index" || !dp.PassDeviceSpecs || *dp.FailOnInitError {
			t.Errorf("%+v", dp)
		}
		// No GPU in MIG mode: single serves whole GPUs, as NVIDIA's plugin does.
		mustResolve(t, p.Profile, h100Node())
		// All in MIG mode with one profile: fine.
		gpus := h100Node()
		for i := range gpus {
			gpus[i].MigEnabled, gpus[i].MigDevices = true, []string{"1g.10gb", "1g.10gb"}
		}
		r := mustResolve(t, p.Profile, gpus)
		if got := r.MIGResourceName(r.Assignments[0], "1g.10gb"); got != "nvidia.com/gpu" {
			t.Errorf("single names MIG devices %s", got)
		}
		// One GPU with another profile: refused.
		gpus[3].MigDevices = []string{"3g.40gb"}
		if _, err := Resolve(p.Profile, gpus); err == nil || !strings.Contains(err.Error(), "spec.devicePlugin.migStrategy") {
			t.Errorf("want single-strategy error, got %v", err)
		}
		// Some GPUs in MIG mode, some not: refused.
		gpus = h100Node()
		gpus[0].MigEnabled = true
		if _, err := Resolve(p.Profile, gpus); err == nil || !strings.Contains(err.Error(), "single needs every device-plugin GPU in MIG mode") {
			t.Errorf("want single-strategy error, got %v", err)
		}
	})
	t.Run("mixed strategy", func(t *testing.T) {
		p := nvidia(t, "mig-mixed.yaml")
		gpus := h100Node()
		gpus[2].MigEnabled = true
		r := mustResolve(t, p.Profile, gpus)
		if r.Assignments[2].Mode != ModeMIGStatic || r.Assignments[1].Mode != ModeWhole {
			t.Errorf("%+v", r.Assignments)
		}
	})
	t.Run("devices honoured, both strategies on one node", func(t *testing.T) {
		p := nvidia(t, "devices-list.yaml")
		r := mustResolve(t, p.Profile, h100Node())
		modes := []Mode{ModeTimeSliced, ModeTimeSliced, ModeTimeSliced, ModeMPS, ModeWhole}
		for i, m := range modes {
			if r.Assignments[i].Mode != m {
				t.Errorf("GPU %d: %s, want %s", i, r.Assignments[i].Mode, m)
			}
		}
		if r.Assignments[0].ResourceName != "nvidia.com/gpu.ts" || r.Assignments[3].ResourceName != "nvidia.com/gpu" {
			t.Errorf("names: %s %s", r.Assignments[0].ResourceName, r.Assignments[3].ResourceName)
		}
	})
	t.Run("gpu operator example", func(t *testing.T) {
		p := nvidia(t, "operator-any.yaml")
		r := mustResolve(t, p.Profile, h100Node())
		if r.Assignments[0].Replicas != 8 || r.Assignments[0].ResourceName != "nvidia.com/gpu" {
			t.Errorf("%+v", r.Assignments[0])
		}
	})
	t.Run("health and imex", func(t *testing.T) {
		p := nvidia(t, "health-imex.yaml")
		// XID 48 needs a GPU reset: it is dropped from ignoredXIDs with a warning, not ignored.
		if len(p.Warnings) != 2 || p.Warnings[0].Path != "imex" || p.Warnings[1].Path != "health.ignoredXIDs[0]" {
			t.Errorf("warnings %v", p.Warnings)
		}
		h := p.Profile.Spec.Health
		if h == nil || !reflect.DeepEqual(h.IgnoredXIDs, []uint64{63}) || h.CriticalXIDs != nil {
			t.Errorf("health %+v", h)
		}
	})
}

func TestOverlapIsAnError(t *testing.T) {
	doc := `
apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  rules:
  - name: by-product
    selector: {productNames: ["*H100*"]}
    owner: device-plugin
    mode: whole
  - name: by-index
    selector: {indices: [3]}
    owner: dra
    mode: whole
`
	p := mustParse(t, doc)
	_, err := Resolve(p.Profile, h100Node())
	if err == nil {
		t.Fatal("overlap accepted")
	}
	msg := err.Error()
	for _, want := range []string{"spec.rules[1].selector", "GPU 3", "spec.rules[0] (by-product)", "spec.rules[1] (by-index)", "fix:"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
}

func TestDefaultsAndUnmatchedRule(t *testing.T) {
	doc := `
apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: none}
  rules:
  - selector: {indices: [0]}
    owner: dra
    mode: mig-dynamic
    migDynamic: {profiles: [1g.10gb, 3g.40gb]}
  - selector: {uuids: [GPU-nope]}
    owner: dra
    mode: whole
`
	p := mustParse(t, doc)
	gpus := h100Node()
	gpus[1].MigEnabled = true
	r := mustResolve(t, p.Profile, gpus)
	if r.Assignments[0].Mode != ModeMIGDynamic || r.Assignments[1].Owner != OwnerNone || !r.Assignments[1].MIGEnabled {
		t.Errorf("%+v", r.Assignments[:2])
	}
	if len(r.Warnings) != 1 || r.Warnings[0].Path != "spec.rules[1].selector" {
		t.Errorf("warnings %v", r.Warnings)
	}
}

func TestMIGModeWarning(t *testing.T) {
	p := mustParse(t, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec: {}\n")
	gpus := h100Node()
	gpus[2].MigEnabled = true
	r := mustResolve(t, p.Profile, gpus)
	if len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0].Message, "GPU 2") {
		t.Errorf("warnings %v", r.Warnings)
	}
	if r.Assignments[2].Source != "built-in default" {
		t.Errorf("source %s", r.Assignments[2].Source)
	}
}

// Mode shared gets its defaults filled by Resolve: a 1Gi step, no reserve, one step per claim by
// default, and a compute default that does not hand a claim the whole GPU.
func TestSharedDefaults(t *testing.T) {
	p := mustParse(t, head+`spec:
  rules:
    - {selector: {indices: [0]}, owner: dra, mode: shared}
    - {selector: {indices: [1]}, owner: dra, mode: shared, shared: {isolation: mps, maxClients: 4}}
    - {selector: {indices: [2]}, owner: dra, mode: shared, shared: {maxClients: 3, memoryStep: 512Mi, memoryReserve: 2Gi, defaultMemory: 4Gi, defaultComputePercent: 25}}
    - {selector: {indices: [3]}, owner: dra, mode: shared, shared: {maxClients: 300}}
  defaults: {owner: none}
`)
	res, err := Resolve(p.Profile, h100Node())
	if err != nil {
		t.Fatal(err)
	}
	type want struct {
		iso                   Mode
		step, reserve, defMem string
		pct                   int
		computeMode           string
	}
	for i, w := range []want{
		{ModeTimeSliced, "1Gi", "0", "1Gi", 10, "Default"},
		{ModeMPS, "1Gi", "0", "1Gi", 25, "ExclusiveProcess"},
		{ModeTimeSliced, "512Mi", "2Gi", "4Gi", 25, "Default"},
		{ModeTimeSliced, "1Gi", "0", "1Gi", 1, "Default"},
	} {
		a := res.Assignments[i]
		sh := a.Shared
		if sh == nil {
			t.Fatalf("GPU %d: no shared settings", i)
		}
		got := want{sh.Isolation, sh.MemoryStep.String(), sh.MemoryReserve.String(), sh.DefaultMemory.String(), sh.DefaultComputePercent, a.ComputeMode}
		if got != w {
			t.Errorf("GPU %d: got %+v, want %+v", i, got, w)
		}
	}
	// Filling defaults does not write into the parsed profile.
	if p.Profile.Spec.Rules[0].Shared != nil || p.Profile.Spec.Rules[1].Shared.MemoryStep != nil {
		t.Error("Resolve changed the profile")
	}
}
