package plugin_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
)

func readTestdata(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "api", "testdata", "nvidia", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// NVIDIA's documented configs give the resources NVIDIA's plugin advertises for them, with its
// device IDs (<uuid>, <uuid>::<replica>, MIG UUIDs; indices with deviceIDStrategy index).
func TestNVIDIAConfigExamples(t *testing.T) {
	const ts4 = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
	cases := []struct {
		name   string
		node   string
		mig    map[int]map[string]int
		config string
		want   map[string]int
		check  func(t *testing.T, e *env)
	}{
		{name: "no config", node: "dgx-h100", config: "version: v1\n", want: map[string]int{"nvidia.com/gpu": 8},
			check: func(t *testing.T, e *env) {
				s, _ := e.kubelet.Resource("nvidia.com/gpu")
				if !slices.Equal(sorted(s.IDs()), sorted(e.uuids())) {
					t.Errorf("IDs %v, want the GPU UUIDs", s.IDs())
				}
			}},
		{name: "time-slicing 4 replicas", node: "dgx-h100", config: ts4, want: map[string]int{"nvidia.com/gpu": 32},
			check: func(t *testing.T, e *env) {
				s, _ := e.kubelet.Resource("nvidia.com/gpu")
				if !slices.Equal(sorted(s.IDs()), sorted(replicaIDs(e.uuids(), 4))) {
					t.Errorf("IDs %v, want <uuid>::0..3", s.IDs())
				}
			}},
		{name: "ts-basic", node: "dgx-h100", config: readTestdata(t, "ts-basic.yaml"), want: map[string]int{"nvidia.com/gpu": 80}},
		{name: "operator-any", node: "dgx-h100", config: readTestdata(t, "operator-any.yaml"), want: map[string]int{"nvidia.com/gpu": 64}},
		{name: "renameByDefault", node: "dgx-h100", config: strings.Replace(ts4, "timeSlicing:\n", "timeSlicing:\n    renameByDefault: true\n", 1),
			want: map[string]int{"nvidia.com/gpu.shared": 32}},
		{name: "mps-basic", node: "dgx-h100", config: readTestdata(t, "mps-basic.yaml"), want: map[string]int{"nvidia.com/gpu": 80}},
		{name: "mig-mixed", node: "dgx-h100", mig: map[int]map[string]int{0: {"1g.10gb": 7}, 1: {"3g.40gb": 2}, 2: {"1g.10gb+me": 1, "2g.20gb": 2}},
			config: readTestdata(t, "mig-mixed.yaml"),
			want: map[string]int{"nvidia.com/gpu": 5, "nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-3g.40gb": 2,
				"nvidia.com/mig-1g.10gb.me": 1, "nvidia.com/mig-2g.20gb": 2},
			check: func(t *testing.T, e *env) {
				s, _ := e.kubelet.Resource("nvidia.com/mig-1g.10gb")
				devs, _ := e.lib.MigDevices(0)
				var want []string
				for _, d := range devs {
					want = append(want, d.UUID)
				}
				if !slices.Equal(sorted(s.IDs()), sorted(want)) {
					t.Errorf("MIG IDs %v, want the MIG UUIDs %v", s.IDs(), want)
				}
			}},
		{name: "ts-full", node: "dgx-h100", mig: map[int]map[string]int{0: {"1g.10gb": 7}, 1: {"2g.20gb": 3}},
			config: readTestdata(t, "ts-full.yaml"),
			want:   map[string]int{"nvidia.com/gpu.shared": 12, "nvidia.com/mig-1g.10gb.shared": 21, "nvidia.com/mig-2g.20gb.shared": 12},
			check: func(t *testing.T, e *env) {
				s, _ := e.kubelet.Resource("nvidia.com/gpu.shared")
				ids := s.IDs()
				if _, err := e.kubelet.Allocate(context.Background(), "nvidia.com/gpu.shared", ids[0], ids[5]); err == nil || !strings.Contains(err.Error(), "failRequestsGreaterThanOne") {
					t.Errorf("two replicas with failRequestsGreaterThanOne: %v", err)
				}
				if _, err := e.kubelet.Allocate(context.Background(), "nvidia.com/gpu.shared", ids[0]); err != nil {
					t.Errorf("one replica: %v", err)
				}
			}},
		{name: "flags-list single", node: "dgx-h100", mig: allMIG(8, "1g.10gb", 7), config: readTestdata(t, "flags-list.yaml"),
			want: map[string]int{"nvidia.com/gpu": 56},
			check: func(t *testing.T, e *env) {
				s, _ := e.kubelet.Resource("nvidia.com/gpu")
				if !slices.Contains(s.IDs(), "0:0") || !slices.Contains(s.IDs(), "7:6") {
					t.Errorf("index IDs: %v", s.IDs())
				}
				car, err := e.kubelet.Allocate(context.Background(), "nvidia.com/gpu", "3:2")
				if err != nil {
					t.Fatal(err)
				}
				if car.Envs["NVIDIA_VISIBLE_DEVICES"] != "3:2" {
					t.Errorf("envvar: %v", car.Envs)
				}
				if len(car.Annotations) != 1 {
					t.Fatalf("cdi-annotations: %v", car.Annotations)
				}
				for k, v := range car.Annotations {
					devs, _ := e.lib.MigDevices(3)
					if !strings.HasPrefix(k, "cdi.k8s.io/") || v != e.cdi.QualifiedName(devs[2].UUID) {
						t.Errorf("annotation %s=%s", k, v)
					}
				}
				if len(car.Devices) == 0 {
					t.Errorf("passDeviceSpecs: no device specs")
				}
			}},
		{name: "devices-list", node: "dgx-h100", config: readTestdata(t, "devices-list.yaml"),
			want: map[string]int{"nvidia.com/gpu.ts": 12, "nvidia.com/gpu": 4 + 2}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.node)
			if tc.mig != nil {
				e.migLayout(tc.mig)
			}
			e.start(tc.config)
			e.waitResources(tc.want)
			for r, n := range tc.want {
				s := e.waitCount(r, n)
				if !s.Options.GetPreferredAllocationAvailable {
					t.Errorf("%s: GetPreferredAllocationAvailable not set", r)
				}
			}
			if tc.check != nil {
				tc.check(t, e)
			}
		})
	}
}

func allMIG(n int, profile string, count int) map[int]map[string]int {
	out := map[int]map[string]int{}
	for i := range n {
		out[i] = map[string]int{profile: count}
	}
	return out
}

// Per-GPU rules: time-slicing, an unequal MPS split (one resource per size) and DRA GPUs on one
// node; the answers carry CDI names that resolve to the right device in the written spec.
func TestPerGPURules(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	doc, err := os.ReadFile(filepath.Join("..", "deployments", "examples", "sharing-profiles", "per-gpu-modes.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	e.start(string(doc))
	e.waitResources(map[string]int{"nvidia.com/gpu.shared": 16, "nvidia.com/gpu.mps-40gb": 2, "nvidia.com/gpu.mps-16gb": 4})
	ctx := ctxT(t, 10*time.Second)
	uuids := e.uuids()

	car, err := e.kubelet.Allocate(ctx, "nvidia.com/gpu.shared", uuids[2]+"::3")
	if err != nil {
		t.Fatal(err)
	}
	if len(car.CdiDevices) != 1 || car.CdiDevices[0].Name != "tessera.dev/gpu="+uuids[2]+"::3" {
		t.Errorf("time-sliced CDI devices: %v", car.CdiDevices)
	}
	s, _ := e.kubelet.Resource("nvidia.com/gpu.mps-16gb")
	car, err = e.kubelet.Allocate(ctx, "nvidia.com/gpu.mps-16gb", s.IDs()[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(car.CdiDevices) != 1 || !strings.Contains(car.CdiDevices[0].Name, "::mps-") {
		t.Fatalf("MPS CDI devices: %v", car.CdiDevices)
	}
	l, err := cdi.List(e.cdi.SpecDir(), "")
	if err != nil || len(l.Errors) > 0 {
		t.Fatalf("CDI spec: %v %v", err, l.Errors)
	}
	found := false
	for _, d := range l.Devices {
		found = found || d.Name == car.CdiDevices[0].Name
	}
	if !found {
		t.Errorf("%s is not in the CDI spec", car.CdiDevices[0].Name)
	}
	// The daemon holds every client to the largest share (server-side); the 16 GiB client's own
	// limits are in its CDI device.
	sts, err := e.mps.List()
	if err != nil || len(sts) != 2 {
		t.Fatalf("MPS daemons: %+v %v", sts, err)
	}
	for _, st := range sts {
		if st.Limits.ActiveThreadPercentage != 50 || st.Limits.PinnedMemoryMiB != 40<<10 {
			t.Errorf("GPU %d daemon limits %+v, want the ceiling 50%% / 40 GiB", st.GPUIndex, st.Limits)
		}
	}
	spec, err := os.ReadFile(filepath.Join(e.cdi.SpecDir(), "tessera.dev-gpu.json"))
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		Devices []struct {
			Name           string
			ContainerEdits struct{ Env []string }
		}
	}
	if err := json.Unmarshal(spec, &parsed); err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(car.CdiDevices[0].Name, "tessera.dev/gpu=")
	if !slices.ContainsFunc(parsed.Devices, func(d struct {
		Name           string
		ContainerEdits struct{ Env []string }
	}) bool {
		return d.Name == name
	}) {
		t.Fatalf("%s is not in the spec file", name)
	}
	for _, d := range parsed.Devices {
		if d.Name == name && (!slices.Contains(d.ContainerEdits.Env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=16384M") ||
			!slices.Contains(d.ContainerEdits.Env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25")) {
			t.Errorf("%s: env %v", name, d.ContainerEdits.Env)
		}
	}
	// The DRA GPUs are not served.
	snap, _ := inventory.New(e.lib).Snapshot(ctx)
	for _, r := range e.kubelet.Resources() {
		rs, _ := e.kubelet.Resource(r)
		for _, id := range rs.IDs() {
			if strings.HasPrefix(id, snap.GPUs[6].UUID) || strings.HasPrefix(id, snap.GPUs[7].UUID) {
				t.Errorf("%s serves %s of a DRA GPU", r, id)
			}
		}
	}
}

// Envvar and volume-mounts answers name the GPUs as NVIDIA's container runtime reads them; an MPS
// client without CDI gets its pipe directory and limits in the answer.
func TestListStrategies(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.start("version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, volume-mounts]\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	e.waitCount("nvidia.com/gpu", 32)
	uuids := e.uuids()
	car, err := e.kubelet.Allocate(ctxT(t, 10*time.Second), "nvidia.com/gpu", uuids[1]+"::2")
	if err != nil {
		t.Fatal(err)
	}
	if car.Envs["NVIDIA_VISIBLE_DEVICES"] != "/var/run/nvidia-container-devices" {
		t.Errorf("volume-mounts must win over envvar as the later strategy: %v", car.Envs)
	}
	mounts := map[string]*pluginapi.Mount{}
	for _, m := range car.Mounts {
		mounts[m.ContainerPath] = m
	}
	if m := mounts["/var/run/nvidia-container-devices/"+uuids[1]]; m == nil || m.HostPath != "/dev/null" {
		t.Errorf("volume-mounts mount: %v", car.Mounts)
	}
	if m := mounts["/tmp/nvidia-mps"]; m == nil || !m.ReadOnly || m.HostPath != e.mps.PathsFor(uuids[1]).Pipe {
		t.Errorf("MPS pipe mount: %v", car.Mounts)
	}
	if car.Envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] != "25" || car.Envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "" {
		t.Errorf("MPS limits: %v", car.Envs)
	}
	if len(car.CdiDevices) != 0 {
		t.Errorf("CDI devices without a CDI strategy: %v", car.CdiDevices)
	}
}

// An unknown device ID is refused with the resource and the ID named.
func TestAllocateUnknownDevice(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.start("version: v1\n")
	e.waitCount("nvidia.com/gpu", 8)
	if _, err := e.kubelet.Allocate(ctxT(t, 10*time.Second), "nvidia.com/gpu", "GPU-nope"); err == nil || !strings.Contains(err.Error(), "GPU-nope") {
		t.Errorf("unknown device: %v", err)
	}
}
