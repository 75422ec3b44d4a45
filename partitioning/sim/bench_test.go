package sim_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

// ratio times fn and baseline alternately over the benchmark's iterations and reports fn's cost as a
// multiple of the baseline measured in the same run (machines here are noisy; absolute times are not).
func ratio(b *testing.B, unit string, baseline, fn func()) {
	b.Helper()
	var tb, tf time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		baseline()
		t1 := time.Now()
		fn()
		tf += time.Since(t1)
		tb += t1.Sub(t0)
	}
	b.ReportMetric(float64(tf)/float64(tb), "x-"+unit)
	b.ReportMetric(float64(tf.Nanoseconds())/float64(b.N), "ns/call")
}

// BenchmarkGPUInfo: one GPU's identity and modes through the adapter (about 12 NVML calls, each a
// state check) against one os.Stat of the GPU's state file, the least a current read can cost.
func BenchmarkGPUInfo(b *testing.B) {
	lib, node := openB(b, "dgx-h100")
	state := filepath.Join(node.Dir(), "gpu3.json")
	ratio(b, "stat", func() { os.Stat(state) }, func() {
		if _, err := lib.GPU(3); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkSnapshotMIG: a whole-node snapshot of a DGX H100 with 7 MIG devices per GPU, against
// reading the eight state files.
func BenchmarkSnapshotMIG(b *testing.B) {
	lib, node := openB(b, "dgx-h100")
	for g := range 8 {
		if _, err := lib.SetMigMode(g, true); err != nil {
			b.Fatal(err)
		}
		ps, _ := lib.MigProfiles(g)
		for _, pl := range ps[0].Placements {
			gi, err := lib.CreateGpuInstance(g, ps[0].ID, pl)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := lib.CreateComputeInstance(g, gi, 1); err != nil {
				b.Fatal(err)
			}
		}
	}
	inv := inventory.New(lib)
	ctx := context.Background()
	ratio(b, "read-state", func() {
		for g := range 8 {
			os.ReadFile(filepath.Join(node.Dir(), fmt.Sprintf("gpu%d.json", g)))
		}
	}, func() {
		s, err := inv.Snapshot(ctx)
		if err != nil || len(s.GPUs[7].MigDevices) != 7 {
			b.Fatal(err)
		}
	})
}

// BenchmarkCreateDestroyGI: a MIG change (create + destroy a GPU instance: two locked, atomic state
// writes) against writing and renaming a small file.
func BenchmarkCreateDestroyGI(b *testing.B) {
	lib, node := openB(b, "dgx-a100")
	if _, err := lib.SetMigMode(0, true); err != nil {
		b.Fatal(err)
	}
	ps, _ := lib.MigProfiles(0)
	p := ps[0]
	tmp := filepath.Join(node.Dir(), "bench.tmp")
	ratio(b, "write-rename", func() {
		os.WriteFile(tmp, []byte("{}"), 0o644)
		os.Rename(tmp, tmp+".2")
	}, func() {
		gi, err := lib.CreateGpuInstance(0, p.ID, p.Placements[0])
		if err != nil {
			b.Fatal(err)
		}
		if err := lib.DestroyGpuInstance(0, gi); err != nil {
			b.Fatal(err)
		}
	})
}

func openB(b *testing.B, node string) (nvmlib.Interface, interface{ Dir() string }) {
	b.Helper()
	spec, err := sim.BuiltinNode(node)
	if err != nil {
		b.Fatal(err)
	}
	n, err := sim.Open(spec, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	lib, err := nvmlib.Wrap(n.NVML())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { lib.Shutdown() })
	return lib, n
}
