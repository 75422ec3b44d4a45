package inventory_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

func openNode(t *testing.T, node, dir string) (nvmlib.Interface, *sim.Node) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	lib, n, err := backend.Options{NVML: "sim:" + node, SimStateDir: dir}.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	return lib, n
}

func TestSnapshotH100(t *testing.T) {
	lib, _ := openNode(t, "dgx-h100", "")
	s, err := inventory.New(lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s.System.DriverVersion != "570.133.20" || s.System.CUDADriverVersion != "12.8" {
		t.Errorf("system %+v", s.System)
	}
	if len(s.GPUs) != 8 {
		t.Fatalf("%d GPUs, want 8", len(s.GPUs))
	}
	for i, g := range s.GPUs {
		if g.Index != i || g.Minor != i || g.ProductName != "NVIDIA H100 80GB HBM3" || g.MemoryMiB != 81559 ||
			g.Architecture != "hopper" || g.ComputeCapability != "9.0" || !g.MigCapable || g.MigEnabled ||
			len(g.NVLinkPeers) != 7 || g.Error != "" || g.PCIDeviceID != 0x233010DE {
			t.Errorf("GPU %d: %+v", i, g)
		}
		if want := i / 4; g.NUMANode != want {
			t.Errorf("GPU %d NUMA node %d, want %d", i, g.NUMANode, want)
		}
	}
}

func TestSnapshotMixedAndMIG(t *testing.T) {
	lib, node := openNode(t, "mixed", "")
	if _, err := lib.SetMigMode(0, true); err != nil {
		t.Fatal(err)
	}
	ps, err := lib.MigProfiles(0)
	if err != nil {
		t.Fatal(err)
	}
	var p3 nvmlib.MigProfile
	for _, p := range ps {
		if p.Name == "3g.20gb" {
			p3 = p
		}
	}
	gi, err := lib.CreateGpuInstance(0, p3.ID, nvmlib.Placement{Start: 0, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lib.CreateComputeInstance(0, gi, 3); err != nil {
		t.Fatal(err)
	}
	inv := inventory.New(lib)
	s, err := inv.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, g := range s.GPUs {
		got = append(got, g.ProductName)
	}
	if strings.Join(got, ",") != "NVIDIA A100-SXM4-40GB,NVIDIA A100-SXM4-40GB,NVIDIA A30,NVIDIA A30,NVIDIA L4,NVIDIA L4" {
		t.Fatalf("products %v", got)
	}
	if s.GPUs[4].MigCapable || s.GPUs[2].MigCapable != true {
		t.Errorf("MIG capability wrong: L4 %v, A30 %v", s.GPUs[4].MigCapable, s.GPUs[2].MigCapable)
	}
	if p := s.GPUs[0].NVLinkPeers; len(p) != 1 || p[0] != 1 {
		t.Errorf("GPU 0 NVLink peers %v, want [1]", p)
	}
	if p := s.GPUs[4].NVLinkPeers; len(p) != 0 {
		t.Errorf("L4 NVLink peers %v, want none", p)
	}
	m := s.GPUs[0].MigDevices
	if len(m) != 1 || m[0].Profile != "3g.20gb" || m[0].GI != 1 || m[0].CI != 0 || m[0].MemoryMiB != 19968 ||
		m[0].ParentUUID != s.GPUs[0].UUID || m[0].Placement != (nvmlib.Placement{Start: 0, Size: 4}) {
		t.Fatalf("MIG devices %+v", m)
	}

	// A lost GPU is reported with its error and what was known; the others are unaffected.
	if err := node.InjectGPULost(1); err != nil {
		t.Fatal(err)
	}
	s2, err := inv.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(s2.GPUs[1].Error, "ERROR_GPU_IS_LOST") || s2.GPUs[1].UUID != s.GPUs[1].UUID {
		t.Errorf("lost GPU reported as %+v", s2.GPUs[1])
	}
	if s2.GPUs[0].Error != "" || len(s2.GPUs[0].MigDevices) != 1 {
		t.Errorf("GPU 0 affected by GPU 1's loss: %+v", s2.GPUs[0])
	}
	// A new inventory, reading the topology while GPU 1 is lost: GPU 0 has no NVLink peer and no error.
	s3, err := inventory.New(lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if s3.GPUs[0].Error != "" || len(s3.GPUs[0].NVLinkPeers) != 0 || s3.GPUs[1].Error == "" {
		t.Errorf("topology read with a lost peer: GPU 0 %+v, GPU 1 error %q", s3.GPUs[0], s3.GPUs[1].Error)
	}
}

func TestRenderFormats(t *testing.T) {
	lib, _ := openNode(t, "dgx-a100", "")
	s, err := inventory.New(lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var js, ys, tb bytes.Buffer
	if err := inventory.Render(&js, s, "json"); err != nil {
		t.Fatal(err)
	}
	var back inventory.Snapshot
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.GPUs) != 8 || back.GPUs[7].UUID != s.GPUs[7].UUID {
		t.Fatalf("JSON round trip: %v %+v", err, back.GPUs)
	}
	if err := inventory.Render(&ys, s, "yaml"); err != nil {
		t.Fatal(err)
	}
	var yback inventory.Snapshot
	if err := yaml.Unmarshal(ys.Bytes(), &yback); err != nil || yback.GPUs[3].PCIBusID != s.GPUs[3].PCIBusID {
		t.Fatalf("YAML round trip: %v", err)
	}
	if err := inventory.Render(&tb, s, "table"); err != nil {
		t.Fatal(err)
	}
	if lines := strings.Split(strings.TrimSpace(tb.String()), "\n"); len(lines) != 11 || !strings.Contains(lines[3], "NVIDIA A100-SXM4-40GB") {
		t.Fatalf("table:\n%s", tb.String())
	}
	if err := inventory.Render(&tb, s, "xml"); err == nil || !strings.Contains(err.Error(), "table, json, yaml") {
		t.Fatalf("unknown format: %v", err)
	}
}

// TestStableAcrossProcesses: the same node in two state directories gives the same identities.
func TestStableAcrossProcesses(t *testing.T) {
	out := func() string {
		lib, _ := openNode(t, "dgx-h100", "")
		s, err := inventory.New(lib).Snapshot(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		if err := inventory.Render(&b, s, "json"); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	if a, b := out(), out(); a != b {
		t.Fatalf("two fresh dgx-h100 nodes differ:\n%s\n---\n%s", a, b)
	}
}
