package api

import (
	"os"
	"path/filepath"
	"testing"
)

func seedFiles(f *testing.F, globs ...string) {
	for _, g := range globs {
		files, _ := filepath.Glob(g)
		for _, file := range files {
			if data, err := os.ReadFile(file); err == nil {
				f.Add(data)
			}
		}
	}
}

// FuzzParseProfile: no input makes the parser (or the resolver after it) panic, and every error is
// a list of field errors.
func FuzzParseProfile(f *testing.F) {
	seedFiles(f, filepath.Join(examplesDir(), "*.yaml"), filepath.Join("testdata", "nvidia", "*.yaml"))
	f.Add([]byte(head + "spec:\n  rules:\n  - {selector: {indices: [0]}, owner: dra, mode: mig-static, mig: {layout: all-1g.10gb}}\n"))
	f.Add([]byte("version: v1\nsharing: {timeSlicing: {resources: [{name: gpu, devices: [0, \"GPU-1\", \"1:0\"], replicas: 3}]}}\n"))
	f.Add([]byte("a: &a [*a, *a]\n"))
	f.Add([]byte("{\"spec\": null}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParseProfile(data)
		if err != nil {
			if _, ok := err.(ErrorList); !ok {
				t.Fatalf("error is %T: %v", err, err)
			}
			return
		}
		if _, err := Resolve(p.Profile, h100Node()); err != nil {
			if _, ok := err.(ErrorList); !ok {
				t.Fatalf("resolve error is %T", err)
			}
		}
		if _, err := MarshalProfile(p.Profile); err != nil {
			t.Fatalf("marshal: %v", err)
		}
	})
}

// FuzzParseNVIDIAConfig: NVIDIA configs decode and convert without panics.
func FuzzParseNVIDIAConfig(f *testing.F) {
	seedFiles(f, filepath.Join("testdata", "nvidia", "*.yaml"))
	f.Add([]byte("version: v1\nhealth: {criticalXIDs: [1, 2], ignoredXIDs: [3]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		nc, errs := ParseNVIDIAConfig(data)
		if errs != nil {
			return
		}
		p, _, errs := ConvertNVIDIAConfig(nc)
		if errs == nil {
			_, _ = Validate(p)
		}
	})
}

// FuzzParseGPUConfig: claim parameters never panic the webhook's parser.
func FuzzParseGPUConfig(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":50,"defaultPinnedDeviceMemoryLimit":"10Gi","defaultPerDevicePinnedMemoryLimit":{"0":"1Gi"}}}}`))
	f.Add([]byte(`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"TimeSlicing","timeSlicing":{"interval":"Short"}}}`))
	f.Add([]byte(`{"sharing":{"mps":{"defaultPerDevicePinnedMemoryLimit":{"x":1e400}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseGPUConfig(data)
		if err == nil && cfg.Validate() != nil {
			t.Fatal("parsed config does not validate")
		}
	})
}
