package cdi

import (
	"testing"

	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

func TestRootsOnSimulatedHost(t *testing.T) {
	h, err := host.Ensure(t.TempDir(), host.Spec{DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{0}})
	if err != nil {
		t.Fatal(err)
	}
	got := DefaultRoots().OnSimulatedHost(h)
	want := Roots{Driver: h.DriverRoot(), Dev: h.DevRoot(), Proc: h.ProcRoot(), Hook: h.ToolPath(host.ToolCDIHook)}
	if got != want {
		t.Fatalf("defaults on a simulated host: %+v, want %+v", got, want)
	}
	set := DefaultRoots()
	set.Dev, set.Hook = "/custom/dev", "/custom/nvidia-cdi-hook"
	got = set.OnSimulatedHost(h)
	if got.Dev != "/custom/dev" || got.Hook != "/custom/nvidia-cdi-hook" || got.Driver != h.DriverRoot() {
		t.Fatalf("roots the user set were replaced: %+v", got)
	}
}
