package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const examples = "../../deployments/examples/sharing-profiles"

func TestProfileValidateTable(t *testing.T) {
	out, err := run(t, "profile", "validate", "-f", filepath.Join(examples, "per-gpu-modes.yaml"), "--node-inventory", "sim:dgx-h100", "--sim-state-dir", t.TempDir())
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"valid SharingProfile", "time-sliced", "mps", "mig-static", "spec.rules[2] (mig)", "nvidia.com/gpu.shared replicas=4 interval=Medium"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestProfileValidateErrorsExit1(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1}]}}\n"), 0o644)
	out, err := run(t, "profile", "validate", "-f", bad)
	if err != errInvalid {
		t.Fatalf("err %v", err)
	}
	if !strings.Contains(out, "sharing.timeSlicing.resources[0].replicas: replicas is 1 (fix: use 2 to 256)") {
		t.Errorf("output:\n%s", out)
	}
}

func TestProfileValidateInventoryFileAndJSON(t *testing.T) {
	dir := t.TempDir()
	inv, err := run(t, "--nvml=sim:mixed", "--sim-state-dir", dir, "inspect", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	invFile := filepath.Join(dir, "inv.json")
	os.WriteFile(invFile, []byte(inv), 0o644)
	out, err := run(t, "profile", "validate", "-f", filepath.Join(examples, "mixed-node.yaml"), "--node-inventory", invFile, "-o", "json")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var res []validateResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(res) != 1 || !res[0].Valid || len(res[0].Assignments) != 6 || res[0].Assignments[4].Mode != "time-sliced" || res[0].Assignments[2].Owner != "dra" {
		t.Errorf("%+v", res)
	}
}

func TestProfileValidateConfigMap(t *testing.T) {
	out, err := run(t, "profile", "validate", "-f", filepath.Join(examples, "configmap.yaml"))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if strings.Count(out, ": valid") != 3 {
		t.Errorf("output:\n%s", out)
	}
	out, err = run(t, "profile", "validate", "-f", filepath.Join(examples, "configmap.yaml"), "--profile", "nvidia-mps")
	if err != nil || !strings.Contains(out, "[nvidia-mps]: valid NVIDIA") || strings.Contains(out, "[default]") {
		t.Errorf("%v\n%s", err, out)
	}
}

func TestProfileConvert(t *testing.T) {
	out, err := run(t, "profile", "convert", "-f", filepath.Join(examples, "nvidia-time-slicing.yaml"))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"apiVersion: tessera.dev/v1alpha1", "kind: SharingProfile", "resourceName: nvidia.com/gpu.shared", "replicas: 4"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
