// Package codecheck_test checks the chart's values and test data against Tessera's own code: the
// MIG layouts with the MIG manager's parser and planner, the simulated preset's sharing profile
// resolved on a simulated node, the node labels the chart's policies allow against the labels the
// code writes.
//
// These tests live apart from deployments/helm's because they link go-nvml, and a binary that links
// the Helm library cannot: Helm pulls in kustomize, which imports Go's plugin package, so the linker
// asks for immediate binding of every C symbol, and go-nvml leaves NVML's symbols to be resolved
// when the library is loaded. Nothing here imports deployments/helm; the chart tests check that
// the chart renders these values verbatim.
package codecheck_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/migmanager"
	"github.com/tessera-gpu/tessera/plugin"
	"github.com/tessera-gpu/tessera/profile"
)

var chartDir = filepath.Join("..", "tessera")

type values struct {
	NVML            string `json:"nvml"`
	SharingProfiles struct {
		Profiles map[string]string `json:"profiles"`
	} `json:"sharingProfiles"`
	MIGManager struct {
		Layouts       string `json:"layouts"`
		DefaultConfig string `json:"defaultConfig"`
	} `json:"migManager"`
}

func readValues(t *testing.T, file string) values {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(chartDir, file))
	if err != nil {
		t.Fatal(err)
	}
	var v values
	if err := yaml.Unmarshal(data, &v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return v
}

// simNode opens a fresh simulated node in a temporary state directory.
func simNode(t *testing.T, nvml string) (context.Context, backend.Options) {
	t.Helper()
	return context.Background(), backend.Options{NVML: nvml, SimStateDir: t.TempDir()}
}

// The chart's node policies are tested (in deployments/helm) on testdata/node-labels.yaml; that
// file must name what the code writes.
func TestNodeLabelsFileMatchesCode(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "testdata", "node-labels.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		DevicePlugin     []string `json:"devicePlugin"`
		MIGManager       []string `json:"migManager"`
		MIGManagerConfig string   `json:"migManagerConfig"`
		MIGLayoutsKey    string   `json:"migLayoutsKey"`
	}
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		t.Fatal(err)
	}
	if got, want := slices.Sorted(slices.Values(f.DevicePlugin)), slices.Sorted(slices.Values(plugin.OwnedLabels)); !slices.Equal(got, want) {
		t.Errorf("devicePlugin: %v, but the device plugin sets %v (plugin.OwnedLabels): update testdata/node-labels.yaml and the device plugin's node policy", got, want)
	}
	if !slices.Equal(f.MIGManager, []string{migmanager.LabelState}) {
		t.Errorf("migManager: %v, but the MIG manager sets [%s]", f.MIGManager, migmanager.LabelState)
	}
	if f.MIGManagerConfig != migmanager.LabelConfig {
		t.Errorf("migManagerConfig: %q, but the MIG manager reads %q", f.MIGManagerConfig, migmanager.LabelConfig)
	}
	if f.MIGLayoutsKey != migmanager.LayoutsKey {
		t.Errorf("migLayoutsKey: %q, but the MIG manager reads %q", f.MIGLayoutsKey, migmanager.LayoutsKey)
	}
}

// The default MIG layouts parse with the MIG manager's parser, and each one applies on a simulated
// DGX H100 (the simulated preset's node), one after the other as an admin would switch them.
func TestMIGLayoutsApply(t *testing.T) {
	for _, file := range []string{"values.yaml", "values-sim.yaml"} {
		v := readValues(t, file)
		if file == "values-sim.yaml" && v.MIGManager.Layouts == "" {
			continue // the preset keeps the default layouts
		}
		cfg, err := mig.ParseConfig([]byte(v.MIGManager.Layouts), file+": migManager.layouts")
		if err != nil {
			t.Fatal(err)
		}
		names := cfg.Names()
		if len(names) == 0 {
			t.Fatalf("%s: no layouts", file)
		}
		if d := v.MIGManager.DefaultConfig; d != "" && !slices.Contains(names, d) {
			t.Errorf("%s: migManager.defaultConfig %q is not a layout (%v)", file, d, names)
		}
		ctx, opts := simNode(t, "sim:dgx-h100")
		lib, _, err := opts.Open()
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range names {
			rep, err := mig.Apply(ctx, lib, cfg, name, mig.Options{})
			if err != nil {
				t.Errorf("%s: layout %s: %v", file, name, err)
				continue
			}
			if !rep.OK() {
				t.Errorf("%s: layout %s does not apply on a DGX H100: %+v", file, name, rep.GPUs)
			}
		}
		lib.Shutdown()
	}
}

// Every sharing profile of both presets resolves on the simulated DGX H100, and the simulated
// preset's splits the node as its comment says.
func TestSharingProfilesResolve(t *testing.T) {
	def := readValues(t, "values.yaml")
	sim := readValues(t, "values-sim.yaml")
	if sim.NVML != "sim:dgx-h100" {
		t.Fatalf("values-sim.yaml: nvml %q", sim.NVML)
	}
	ctx, opts := simNode(t, sim.NVML)
	lib, _, err := opts.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Shutdown()
	gpus, err := profile.GPUsFromNVML(ctx, lib)
	if err != nil {
		t.Fatal(err)
	}
	if len(gpus) != 8 {
		t.Fatalf("%d GPUs on %s, want 8", len(gpus), sim.NVML)
	}
	resolve := func(file, key, doc string) *api.Resolution {
		t.Helper()
		p, err := api.ParseProfile([]byte(doc))
		if err != nil {
			t.Fatalf("%s: profile %s: %v", file, key, err)
		}
		res, err := api.Resolve(p.Profile, gpus)
		if err != nil {
			t.Fatalf("%s: profile %s does not resolve on %s: %v", file, key, sim.NVML, err)
		}
		if len(res.Warnings) > 0 {
			t.Errorf("%s: profile %s: %v", file, key, res.Warnings)
		}
		return res
	}
	for k, doc := range def.SharingProfiles.Profiles {
		res := resolve("values.yaml", k, doc)
		for _, a := range res.Assignments {
			if a.Owner != api.OwnerDevicePlugin || a.Mode != api.ModeWhole {
				t.Errorf("values.yaml: GPU %d: %s %s, want every GPU whole to the device plugin", a.GPU.Index, a.Owner, a.Mode)
			}
		}
	}
	if _, ok := sim.SharingProfiles.Profiles["default"]; !ok {
		t.Fatal("values-sim.yaml has no default profile")
	}
	res := resolve("values-sim.yaml", "default", sim.SharingProfiles.Profiles["default"])
	if len(res.Assignments) != 8 {
		t.Fatalf("%d assignments, want 8", len(res.Assignments))
	}
	for _, a := range res.Assignments {
		wantOwner, wantMode := api.OwnerDRA, api.ModeWhole
		switch a.GPU.Index {
		case 0, 1:
			wantOwner = api.OwnerDevicePlugin
		case 2, 3:
			wantOwner, wantMode = api.OwnerDevicePlugin, api.ModeTimeSliced
		}
		if a.Owner != wantOwner || a.Mode != wantMode {
			t.Errorf("values-sim.yaml: GPU %d: %s %s, want %s %s", a.GPU.Index, a.Owner, a.Mode, wantOwner, wantMode)
		}
	}
}
