package packing

import (
	"testing"
)

// The issue's workload: 200 inference pods asking 5–40 GiB, on H100 80GB GPUs.
func issueWorkload() []int64 { return Workload(200, 5, 40, 13) }

// BenchmarkPacking reports the GPUs each placement needs and their ratio to the lower bound
// ⌈Σ memory ⁄ usable GPU memory⌉ (the baseline); the placement is deterministic, so b.N only
// repeats it.
func BenchmarkPacking(b *testing.B) {
	reqs := issueWorkload()
	var r Result
	for b.Loop() {
		var err error
		if r, err = Place("h100-sxm5-80gb", reqs); err != nil {
			b.Fatal(err)
		}
	}
	lb := float64(r.LowerBound)
	b.ReportMetric(float64(r.Pods), "pods")
	b.ReportMetric(lb, "gpus-bound")
	b.ReportMetric(float64(r.Whole), "gpus-whole")
	b.ReportMetric(float64(r.MIG), "gpus-mig")
	b.ReportMetric(float64(r.Shared), "gpus-shared")
	b.ReportMetric(float64(r.Whole)/lb, "whole-x-bound")
	b.ReportMetric(float64(r.MIG)/lb, "mig-x-bound")
	b.ReportMetric(float64(r.Shared)/lb, "shared-x-bound")
}

func TestWorkloadDeterministic(t *testing.T) {
	a, b := issueWorkload(), issueWorkload()
	var lo, hi int64 = 1 << 62, 0
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("request %d differs between runs: %d, %d", i, a[i], b[i])
		}
		lo, hi = min(lo, a[i]), max(hi, a[i])
	}
	if lo < 5*gib || hi > 40*gib || len(a) != 200 {
		t.Fatalf("%d requests in [%d, %d] GiB, want 200 in [5, 40]", len(a), lo/gib, hi/gib)
	}
}

func TestPlaceSmall(t *testing.T) {
	// 7 × 9 GiB: seven 1g.10gb on one GPU, seven shares on one GPU.
	var reqs []int64
	for range 7 {
		reqs = append(reqs, 9*gib)
	}
	r, err := Place("h100-sxm5-80gb", reqs)
	if err != nil {
		t.Fatal(err)
	}
	if r.MIG != 1 || r.MIGProfiles["1g.10gb"] != 7 || r.Shared != 1 || r.Whole != 7 || r.LowerBound != 1 {
		t.Errorf("got %+v", r)
	}
	// 10 GiB does not fit 1g.10gb (9.75 GiB): 1g.20gb, at most 4 on a GPU, then a second GPU.
	reqs = []int64{10 * gib, 10 * gib, 10 * gib, 10 * gib, 10 * gib}
	if r, err = Place("h100-sxm5-80gb", reqs); err != nil {
		t.Fatal(err)
	}
	if r.MIG != 2 || r.MIGProfiles["1g.20gb"] != 5 || r.Shared != 1 {
		t.Errorf("got %+v", r)
	}
	// 40 GiB is more than 3g.40gb's 39.5 GiB: a 7g.80gb each. Two shares of 40 GiB exceed the
	// 79.6 GiB an H100 reports.
	if r, err = Place("h100-sxm5-80gb", []int64{40 * gib, 40 * gib}); err != nil {
		t.Fatal(err)
	}
	if r.MIG != 2 || r.MIGProfiles["7g.80gb"] != 2 || r.Shared != 2 || r.LowerBound != 2 {
		t.Errorf("got %+v", r)
	}
	// Shares also stop at the default compute share: 11 × 1 GiB at 10 % each need two GPUs.
	reqs = nil
	for range 11 {
		reqs = append(reqs, gib)
	}
	if r, err = Place("h100-sxm5-80gb", reqs); err != nil {
		t.Fatal(err)
	}
	if r.Shared != 2 || r.LowerBound != 1 {
		t.Errorf("got %+v", r)
	}
	if _, err := Place("h100-sxm5-80gb", []int64{100 * gib}); err == nil {
		t.Error("a 100 GiB request placed on an 80 GB GPU")
	}
}
