package telemetry_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tessera-gpu/tessera/partitioning/inventory"
)

// BenchmarkSample: one telemetry sample of a simulated dgx-h100's two owned GPUs with their
// processes, and one scrape, beside the same-run baseline of an inventory snapshot of the node
// (what the front ends already read on every profile change). Reported as ratios.
func BenchmarkSample(b *testing.B) {
	e := newEnv(b, time.Minute)
	ctx := context.Background()
	inv := inventory.New(e.lib)
	base := func() time.Duration {
		t0 := time.Now()
		if _, err := inv.Snapshot(ctx); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	var sample, scrape, snap time.Duration
	reg := prometheus.NewRegistry()
	reg.MustRegister(e.s)
	e.src.owned = []int{0, 1, 2, 3, 4, 5, 6, 7} // every GPU of the node
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		e.s.Sample(ctx)
		sample += time.Since(t0)
		t0 = time.Now()
		if _, err := reg.Gather(); err != nil {
			b.Fatal(err)
		}
		scrape += time.Since(t0)
		snap += base()
	}
	n := float64(b.N)
	b.ReportMetric(float64(sample.Microseconds())/n, "sample-µs")
	b.ReportMetric(float64(scrape.Microseconds())/n, "scrape-µs")
	b.ReportMetric(float64(snap.Microseconds())/n, "snapshot-µs")
	b.ReportMetric(float64(sample)/float64(snap), "sample/snapshot")
}
