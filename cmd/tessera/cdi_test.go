package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `tessera cdi generate` on sim:dgx-a100 with every GPU cut into seven 1g.5gb instances writes a spec
// that the CDI library loads without error, with every GPU and MIG device under both its names;
// `tessera cdi list` shows them.
func TestCdiGenerateAll1g(t *testing.T) {
	state, out := t.TempDir(), filepath.Join(t.TempDir(), "cdi")
	sim := []string{"--nvml=sim:dgx-a100", "--sim-state-dir", state}
	layouts, err := filepath.Abs("../../deployments/examples/mig/layouts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if o, err := run(t, append(sim, "mig", "apply", "-f", layouts, "-c", "all-1g")...); err != nil {
		t.Fatalf("mig apply: %v\n%s", err, o)
	}

	// A missing hook binary is an error naming it, unless waived.
	_, err = run(t, append(sim, "cdi", "generate", "--output-dir", out, "--hook-path", "/nonexistent/nvidia-cdi-hook")...)
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/nvidia-cdi-hook") || !strings.Contains(err.Error(), "--no-hooks") {
		t.Fatalf("generate without a hook binary: %v", err)
	}

	// The simulated host's stand-in hook makes a complete spec, hooks included.
	o, err := run(t, append(sim, "cdi", "generate", "--output-dir", out)...)
	if err != nil {
		t.Fatalf("generate: %v\n%s", err, o)
	}
	if data, _ := os.ReadFile(filepath.Join(out, "tessera.dev-gpu.json")); !strings.Contains(string(data), filepath.Join(state, "host", "driver", "usr", "bin", "nvidia-cdi-hook")) {
		t.Error("the spec does not run the simulated host's nvidia-cdi-hook")
	}
	if !strings.Contains(o, "128 devices") {
		t.Errorf("output %q", o)
	}
	data, err := os.ReadFile(filepath.Join(out, "tessera.dev-gpu.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), filepath.Join(state, "host", "dev", "nvidia7")) {
		t.Error("the spec does not point at the simulated host's device nodes")
	}

	o, err = run(t, "cdi", "list", "--spec-dir", out, "-o", "json")
	if err != nil {
		t.Fatalf("list: %v\n%s", err, o)
	}
	var l struct {
		Devices []struct{ Name, Spec string }
		Errors  map[string][]string
	}
	if err := json.Unmarshal([]byte(o), &l); err != nil {
		t.Fatal(err)
	}
	if len(l.Devices) != 128 || len(l.Errors) != 0 {
		t.Fatalf("listed %d devices, errors %v", len(l.Devices), l.Errors)
	}
	names := map[string]bool{}
	for _, d := range l.Devices {
		names[d.Name] = true
	}
	for _, n := range []string{"tessera.dev/gpu=0", "tessera.dev/gpu=7", "tessera.dev/gpu=7:13:0"} {
		if !names[n] {
			t.Errorf("%s not listed", n)
		}
	}

	// With replicas, and the table output.
	if o, err := run(t, append(sim, "cdi", "generate", "--output-dir", out, "--no-hooks", "--replicas", "2")...); err != nil ||
		!strings.Contains(o, "256 devices") {
		t.Fatalf("generate --replicas 2: %v %q", err, o)
	}
	if o, err := run(t, "cdi", "list", "--spec-dir", out); err != nil || !strings.Contains(o, "::1 ") {
		t.Fatalf("list: %v %q", err, o)
	}
}
