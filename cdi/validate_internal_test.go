package cdi

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

// baseSpec is shaped like a claim spec the generator writes: common edits with a hook, a mount and
// environment, devices with device nodes and environment.
func baseSpec() *specs.Spec {
	return &specs.Spec{
		Version: "0.6.0",
		Kind:    "tessera.dev/gpu",
		ContainerEdits: specs.ContainerEdits{
			Env:   []string{"NVIDIA_VISIBLE_DEVICES=void"},
			Hooks: []*specs.Hook{{HookName: "createContainer", Path: "/usr/bin/nvidia-cdi-hook", Args: []string{"nvidia-cdi-hook", "update-ldcache"}}},
			Mounts: []*specs.Mount{{HostPath: "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15", ContainerPath: "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
				Options: []string{"ro", "nosuid", "nodev", "bind"}}},
			DeviceNodes: []*specs.DeviceNode{{Path: "/dev/nvidiactl"}},
		},
		Devices: []specs.Device{
			{Name: "uid-1_GPU-0001", ContainerEdits: specs.ContainerEdits{DeviceNodes: []*specs.DeviceNode{{Path: "/dev/nvidia0"}}}},
			{Name: "uid-1_MIG-0002", ContainerEdits: specs.ContainerEdits{Env: []string{"TESSERA_MEMORY_LIMIT_MIB=10240"},
				DeviceNodes: []*specs.DeviceNode{{Path: "/dev/nvidia1"}, {Path: "/dev/nvidia-caps/nvidia-cap12"}}}},
		},
	}
}

// The in-memory validation gives the same verdict as the CDI library reading the spec from a file,
// on a good spec and on each way of breaking one.
func TestValidateAgreesWithReadSpec(t *testing.T) {
	cases := map[string]func(s *specs.Spec){
		"good":                   func(*specs.Spec) {},
		"unknown version":        func(s *specs.Spec) { s.Version = "9.9.9" },
		"no version":             func(s *specs.Spec) { s.Version = "" },
		"kind without class":     func(s *specs.Spec) { s.Kind = "tessera.dev" },
		"bad vendor":             func(s *specs.Spec) { s.Kind = "-tessera.dev/gpu" },
		"bad class":              func(s *specs.Spec) { s.Kind = "tessera.dev/gpu!" },
		"no devices":             func(s *specs.Spec) { s.Devices = nil },
		"device twice":           func(s *specs.Spec) { s.Devices = append(s.Devices, s.Devices[0]) },
		"bad device name":        func(s *specs.Spec) { s.Devices[0].Name = "uid/1" },
		"empty device name":      func(s *specs.Spec) { s.Devices[0].Name = "" },
		"empty device edits":     func(s *specs.Spec) { s.Devices[0].ContainerEdits = specs.ContainerEdits{} },
		"env without =":          func(s *specs.Spec) { s.Devices[1].ContainerEdits.Env = []string{"TESSERA_MEMORY_LIMIT_MIB"} },
		"common env without =":   func(s *specs.Spec) { s.ContainerEdits.Env = []string{"=x"} },
		"node without path":      func(s *specs.Spec) { s.Devices[0].ContainerEdits.DeviceNodes[0].Path = "" },
		"bad node type":          func(s *specs.Spec) { s.Devices[0].ContainerEdits.DeviceNodes[0].Type = "x" },
		"mount without target":   func(s *specs.Spec) { s.ContainerEdits.Mounts[0].ContainerPath = "" },
		"hook with unknown name": func(s *specs.Spec) { s.ContainerEdits.Hooks[0].HookName = "beforeAnything" },
		"hook without path":      func(s *specs.Spec) { s.ContainerEdits.Hooks[0].Path = "" },
		"only env on a device":   func(s *specs.Spec) { s.Devices[0].ContainerEdits = specs.ContainerEdits{Env: []string{"A=1"}} },
	}
	dir := t.TempDir()
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			s := baseSpec()
			mutate(s)
			data, err := json.Marshal(s)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "tessera.dev-gpu_case.json")
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, rerr := cdiapi.ReadSpec(path, 0)
			verr := validate(s)
			if (rerr == nil) != (verr == nil) {
				t.Errorf("ReadSpec: %v; validate: %v", rerr, verr)
			}
			if wantOK := name == "good" || name == "only env on a device"; wantOK != (verr == nil) {
				t.Errorf("validate: %v, want ok=%v", verr, wantOK)
			}
		})
	}
	// Annotations: the library checks them internally; the generator writes none, so validate
	// refuses any (stricter, never looser).
	s := baseSpec()
	s.Annotations = map[string]string{"a": "b"}
	if validate(s) == nil {
		t.Error("a spec with annotations is accepted")
	}
}
