package profile

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/backend"
)

// The example per-GPU profile resolves on a simulated DGX H100 with MIG profiles read from NVML.
func TestGPUsFromNVMLOnSimulatedNode(t *testing.T) {
	lib, _, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: t.TempDir()}.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Shutdown()
	gpus, err := GPUsFromNVML(context.Background(), lib)
	if err != nil {
		t.Fatal(err)
	}
	if len(gpus) != 8 || !slices.Contains(gpus[0].MigProfiles, "1g.10gb") || gpus[0].MemoryMiB == 0 {
		t.Fatalf("%+v", gpus[0])
	}
	data, err := os.ReadFile(filepath.Join("..", "deployments", "examples", "sharing-profiles", "per-gpu-modes.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := api.ParseProfile(data)
	if err != nil {
		t.Fatal(err)
	}
	res, err := api.Resolve(p.Profile, gpus)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(res.Owned(api.OwnerDRA)); got != 2 {
		t.Errorf("DRA owns %d GPUs", got)
	}
	// A layout naming a profile the H100 does not offer is refused.
	bad := "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec: {defaults: {owner: dra, mode: mig-static, mig: {layout: all-1g.5gb}}}\n"
	p2, err := api.ParseProfile([]byte(bad))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.Resolve(p2.Profile, gpus); err == nil {
		t.Error("1g.5gb accepted on an H100")
	}
}
