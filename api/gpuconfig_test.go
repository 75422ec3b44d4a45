package api

import (
	"strings"
	"testing"
)

func TestGPUConfig(t *testing.T) {
	good := []string{
		`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig"}`,
		`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"TimeSlicing","timeSlicing":{"interval":"Long"}}}`,
		`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"TimeSlicing"}}`,
		"apiVersion: gpu.tessera.dev/v1alpha1\nkind: GPUConfig\nsharing:\n  strategy: MPS\n  mps:\n    defaultActiveThreadPercentage: 50\n    defaultPinnedDeviceMemoryLimit: 10Gi\n    defaultPerDevicePinnedMemoryLimit: {\"0\": 5Gi, GPU-0000-1111: 2Gi}\n",
	}
	for _, g := range good {
		if _, err := ParseGPUConfig([]byte(g)); err != nil {
			t.Errorf("%s: %v", g, err)
		}
	}
	const h = `"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig"`
	bad := []struct{ doc, path, msg string }{
		{`{"apiVersion":"gpu.tessera.dev/v1","kind":"GPUConfig"}`, "apiVersion", "want"},
		{`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GpuConfig"}`, "kind", "want"},
		{`{` + h + `,"sharing":{}}`, "sharing.strategy", "required"},
		{`{` + h + `,"sharing":{"strategy":"Exclusive"}}`, "sharing.strategy", "unknown strategy"},
		{`{` + h + `,"sharing":{"strategy":"TimeSlicing","timeSlicing":{"interval":"Forever"}}}`, "sharing.timeSlicing.interval", "unknown interval"},
		{`{` + h + `,"sharing":{"strategy":"TimeSlicing","mps":{}}}`, "sharing.mps", "EXCLUSIVE_PROCESS"},
		{`{` + h + `,"sharing":{"strategy":"MPS","timeSlicing":{}}}`, "sharing.timeSlicing", "EXCLUSIVE_PROCESS"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":0}}}`, "sharing.mps.defaultActiveThreadPercentage", "is 0"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"defaultPinnedDeviceMemoryLimit":"-1Gi"}}}`, "sharing.mps.defaultPinnedDeviceMemoryLimit", "positive"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"defaultPerDevicePinnedMemoryLimit":{"first":"1Gi"}}}}`, "sharing.mps.defaultPerDevicePinnedMemoryLimit[first]", "neither"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"defaultPerDevicePinnedMemoryLimit":{"0":"0"}}}}`, "sharing.mps.defaultPerDevicePinnedMemoryLimit[0]", "positive"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"threads":5}}}`, "sharing.mps.threads", "unknown field"},
		{`{` + h + `,"sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":"50"}}}`, "sharing.mps.defaultActiveThreadPercentage", "whole number"},
		{`[1,2]`, "", "not a mapping"},
	}
	for _, b := range bad {
		_, err := ParseGPUConfig([]byte(b.doc))
		if err == nil {
			t.Errorf("%s accepted", b.doc)
			continue
		}
		found := false
		for _, e := range AsErrorList(err) {
			if e.Path == b.path && strings.Contains(e.Error(), b.msg) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: want %s …%s…, got %v", b.doc, b.path, b.msg, err)
		}
	}
}
