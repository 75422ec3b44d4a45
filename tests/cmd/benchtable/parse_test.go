package main

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/telemetry/startup"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// Output as `go test -bench` prints it (trimmed), with one Allocate size over its target, a GPU
// preferred-allocation size making NVML calls and the packing over its bound.
const sample = `goos: linux
goarch: amd64
pkg: github.com/tessera-gpu/tessera/plugin
cpu: Some CPU
BenchmarkAllocate/devices=8-2         	    2000	     52000 ns/op	        22.00 empty-p50-µs	       210.0 empty-p99-µs	         1.07 p50-x-empty	         1.01 p99-x-empty	        24.00 p50-µs	       212.0 p99-µs
BenchmarkAllocate/devices=80-2        	    2000	     52000 ns/op	        22.00 empty-p50-µs	       100.0 empty-p99-µs	         1.07 p50-x-empty	         3.50 p99-x-empty	        24.00 p50-µs	       350.0 p99-µs
BenchmarkAllocate/devices=800-2       	    2000	     52000 ns/op	        22.00 empty-p50-µs	       210.0 empty-p99-µs	         1.08 p50-x-empty	         2.90 p99-x-empty	        24.00 p50-µs	       609.0 p99-µs
BenchmarkGetPreferredAllocation/devices=8-2   	2000	 60000 ns/op	 22.00 empty-p50-µs	 210.0 empty-p99-µs	 0 nvml-calls/op	 1.2 p50-x-empty	 1.1 p99-x-empty	 29.00 p50-µs	 276.0 p99-µs
BenchmarkGetPreferredAllocation/devices=80-2  	2000	 60000 ns/op	 22.00 empty-p50-µs	 210.0 empty-p99-µs	 0.5 nvml-calls/op	 1.5 p50-x-empty	 2.1 p99-x-empty	 35.00 p50-µs	 582.0 p99-µs
BenchmarkGetPreferredAllocation/devices=800-2 	2000	 60000 ns/op	 22.00 empty-p50-µs	 700.0 empty-p99-µs	 0 nvml-calls/op	 5.4 p50-x-empty	 2.9 p99-x-empty	 233.0 p50-µs	 2030 p99-µs
BenchmarkListAndWatchBytes/devices=8-2 	2000	 1.0 ns/op	 58.00 bytes/device
PASS
ok  	github.com/tessera-gpu/tessera/plugin	30.1s
BenchmarkPrepareLatency/callers=1-2         	     200	   7135062 ns/op	       140.2 claims/s	        18.98 get-p50-µs	       301.2 get-p99-µs	        67.96 p99-x-get	      3586 prepare-p50-µs	     20467 prepare-p99-µs	       793.5 unprepare-p50-µs	      7647 unprepare-p99-µs
BenchmarkPrepareLatency/callers=8-2         	     200	   4206076 ns/op	       637.8 claims/s	        17.45 get-p50-µs	     38161 get-p99-µs	         1.352 p99-x-get	     24064 prepare-p50-µs	     51592 prepare-p99-µs	      4560 unprepare-p50-µs	     20599 unprepare-p99-µs
BenchmarkApplyAll1gDGXH100-2   	       3	 262497068 ns/op	         0.5421 ms-inspect	       252.0 ms-plan+apply	       464.9 x-inspect
BenchmarkStartupReconcile56-2   	      20	  13780063 ns/op	         2.772 ms-read-checkpoints	        10.43 ms-reconcile	         3.762 x-read
BenchmarkPacking-2   	    5889	    187160 ns/op	        57.00 gpus-bound	        80.00 gpus-mig	        62.00 gpus-shared	       200.0 gpus-whole	         1.404 mig-x-bound	       200.0 pods	         1.088 shared-x-bound	         3.509 whole-x-bound
`

func TestParse(t *testing.T) {
	r, err := Parse(sample)
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 12 {
		t.Errorf("%d benchmarks, want 12: %v", len(r), r)
	}
	if v, ok := r.get("BenchmarkAllocate/devices=800", "p99-µs"); !ok || v != 609 {
		t.Errorf("Allocate 800 p99 = %v, %v", v, ok)
	}
	if v, ok := r.get("BenchmarkPacking", "gpus-shared"); !ok || v != 62 {
		t.Errorf("packing shared = %v, %v", v, ok)
	}
	if _, err := Parse("BenchmarkX-2 10 5 ns/op 3\n"); err == nil {
		t.Error("a line with a value and no unit parsed")
	}
	if _, err := Parse("BenchmarkX-2 10 abc ns/op\n"); err == nil {
		t.Error("a non-numeric value parsed")
	}
	if r, err := Parse("BenchmarkX-2 --- FAIL: something\nBenchmarkY\n"); err != nil || len(r) != 0 {
		t.Errorf("non-result lines: %v %v", r, err)
	}
}

func rowsOf(t *testing.T, out string, ex Extra) map[string]Row {
	t.Helper()
	r, err := Parse(out)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]Row{}
	for _, row := range BuildRows(r, ex, recorded) {
		if _, dup := m[row.Figure]; dup {
			t.Fatalf("two rows %q", row.Figure)
		}
		m[row.Figure] = row
	}
	return m
}

func find(t *testing.T, rows map[string]Row, prefix string) Row {
	t.Helper()
	var got []Row
	for f, r := range rows {
		if strings.HasPrefix(f, prefix) {
			got = append(got, r)
		}
	}
	if len(got) != 1 {
		t.Fatalf("%d rows start with %q", len(got), prefix)
	}
	return got[0]
}

func TestRowsAndVerdicts(t *testing.T) {
	rows := rowsOf(t, sample, Extra{RSSMB: 41.5, AnonMB: 8, FileMB: 33.5, StartMs: 120})
	for _, c := range []struct{ prefix, verdict, measured string }{
		{"Allocate p50 / p99, 8 devices", Pass, "24 µs / 212 µs"},
		{"Allocate p50 / p99, 80 devices", Miss, "24 µs / 350 µs"},
		{"Allocate p50 / p99, 800 devices", Pass, ""},
		{"GetPreferredAllocation p50 / p99, NVML calls per request, 8 devices", Pass, ""},
		{"GetPreferredAllocation p50 / p99, NVML calls per request, 80 devices", Miss, "35 µs / 582 µs, 0.5 calls"},
		{"GetPreferredAllocation p50 / p99, NVML calls per request, 800 devices", Pass, "233 µs / 2.03 ms, 0 calls"},
		{"RSS of tessera-device-plugin", Miss, "41.5 MB (anon 8 + file 33.5)"},
		{"RSS of tessera-kubelet-plugin", NotMeasured, ""},
		{"claims/s (Prepare + Unprepare), serial", NoTarget, "140"},
		{"claims/s (Prepare + Unprepare), 8 parallel", "pass without API server (see the recorded row)", "638"},
		{"claims/s, 8 callers, real API server", Miss + " (recorded)", num(recorded.ClaimsPerSec)},
		{"Prepare p99, 8 callers, real API server", Pass + " (recorded)", num(recorded.PrepareP99ms) + " ms"},
		{"plan + apply all-1g", NoTarget, "252 ms"},
		{"start-up reconcile with 56 prepared claims", NoTarget, "10.4 ms"},
		{"pods/s, DRA dynamic MIG, 100 nodes", Miss + " (recorded)", "19.3"},
		{"pods/s, DRA whole, 500 nodes", NoTarget, "33.4"},
		{"H100 80GB GPUs used, 200 pods asking 5–40 GiB, memory shares", Pass, "62"},
		{"H100 80GB GPUs used, 200 pods asking 5–40 GiB, MIG", NoTarget, "80"},
	} {
		r := find(t, rows, c.prefix)
		if r.Verdict != c.verdict {
			t.Errorf("%s: verdict %q, want %q", c.prefix, r.Verdict, c.verdict)
		}
		if c.measured != "" && r.Measured != c.measured {
			t.Errorf("%s: measured %q, want %q", c.prefix, r.Measured, c.measured)
		}
	}
	if r := find(t, rows, "start-up reconcile"); r.Baseline != "reading the 56 checkpoint files 2.77 ms" || r.Ratio != "3.76×" {
		t.Errorf("reconcile row: %+v", r)
	}
	if r := find(t, rows, "H100 80GB GPUs used, 200 pods asking 5–40 GiB, memory"); r.Ratio != "1.09×" {
		t.Errorf("packing ratio %q", r.Ratio)
	}

	// Over the bound by more than 10 %, and a benchmark missing altogether: both are misses.
	over := strings.Replace(sample, "1.088 shared-x-bound", "1.11 shared-x-bound", 1)
	over = strings.Replace(over, "BenchmarkGetPreferredAllocation/devices=800-2", "BenchmarkOther-2", 1)
	rows = rowsOf(t, over, Extra{RSSMB: math.NaN(), StartMs: math.NaN(), RSSNote: "skipped"})
	if r := find(t, rows, "H100 80GB GPUs used, 200 pods asking 5–40 GiB, memory"); r.Verdict != Miss {
		t.Errorf("packing at 1.105× the bound: %q", r.Verdict)
	}
	if r := find(t, rows, "GetPreferredAllocation p50 / p99, NVML calls per request, 800"); r.Verdict != Miss || !strings.Contains(r.Measured, "?") {
		t.Errorf("missing benchmark: %+v", r)
	}
	if r := find(t, rows, "RSS of tessera-device-plugin"); r.Verdict != NotMeasured {
		t.Errorf("RSS not measured: %+v", r)
	}
	if r := find(t, rows, "RSS of tessera-kubelet-plugin"); r.Verdict != NotMeasured || !strings.Contains(r.Measured, "local cluster") {
		t.Errorf("DRA RSS not measured: %+v", r)
	}
	// The DRA plugin measured on the local cluster.
	rows = rowsOf(t, sample, Extra{RSSMB: math.NaN(), StartMs: math.NaN(), DRARSSMB: 52.5, DRAAnonMB: 14, DRAFileMB: 38.5, DRASliceMs: 850})
	if r := find(t, rows, "RSS of tessera-kubelet-plugin"); r.Verdict != Miss || r.Measured != "52.5 MB (anon 14 + file 38.5)" {
		t.Errorf("DRA RSS row: %+v", r)
	}
	if r := find(t, rows, "start to ResourceSlices"); r.Measured != "850 ms" || r.Verdict != Pass || r.Ratio != "0.85×" {
		t.Errorf("DRA start row: %+v", r)
	}
	rows = rowsOf(t, sample, Extra{RSSMB: math.NaN(), StartMs: math.NaN(), DRARSSMB: 30, DRASliceMs: 1150, DRAMainMs: 100,
		DRAPhases: []startup.Phase{{Name: "nvml", Took: 40 * time.Millisecond}, {Name: "first-publish", Took: 1000 * time.Millisecond},
			{Name: "kubelet-plugin", Took: 5 * time.Millisecond}}})
	if r := find(t, rows, "start to ResourceSlices"); r.Verdict != Miss {
		t.Errorf("1150 ms is past the helper's floor + 100 ms: %+v", r)
	}
	if r := find(t, rows, "where start to ResourceSlices goes"); r.Measured != "start → main 100 · nvml 40 · first-publish 1000 · seen by the 10 ms poll 10 (ms); then kubelet-plugin 5" {
		t.Errorf("breakdown row: %q", r.Measured)
	}
	// The DRA driver's figures on the real API server, run by this command.
	live := &harness.DRABenchFigures{Callers: 8, GetSerial: harness.Percentiles{P50ms: 1, P99ms: 2}, GetParallel: harness.Percentiles{P50ms: 3, P99ms: 8},
		PrepareSerial: harness.Percentiles{P50ms: 3, P99ms: 6}, PrepareParallel: harness.Percentiles{P50ms: 20, P99ms: 90},
		ClaimsPerSecSerial: 200, ClaimsPerSecParallel: 520, FirstSliceMs: 45,
		CPUOrder: []string{"plugin", "containerd"}, CPUPerClaim: map[string]float64{"plugin": 2, "containerd": 1.5}, BusyCores: 1.9}
	rows = rowsOf(t, sample, Extra{RSSMB: math.NaN(), StartMs: math.NaN(), DRACluster: live})
	if r := find(t, rows, "GET + Prepare p50 / p99 (Unprepare p50 / p99), 8 parallel callers, kubelet-like"); r.Verdict != Miss || r.Ratio != "p99 11.2×" {
		t.Errorf("Prepare p99 at 11.25× the GET: %+v", r)
	}
	if r := find(t, rows, "claims/s (Prepare + Unprepare), 8 parallel callers, kubelet-like"); r.Verdict != Pass || r.Measured != "520" {
		t.Errorf("520 claims/s: %+v", r)
	}
	if r := find(t, rows, "where a claim's CPU goes"); r.Measured != "plugin 2 · containerd 1.5; together 3.5 ms, 1.9 cores busy" {
		t.Errorf("CPU row: %q", r.Measured)
	}
	if r := find(t, rows, "start to first ResourceSlice, warm restart"); r.Verdict != Pass || strings.Contains(r.Figure, "recorded") {
		t.Errorf("first slice row: %+v", r)
	}
	for _, r := range rows {
		if strings.Contains(r.Figure, "real API server [recorded") {
			t.Errorf("a recorded DRA row beside the live ones: %s", r.Figure)
		}
	}
	rows = rowsOf(t, sample, Extra{RSSMB: math.NaN(), StartMs: math.NaN(), DRAClusterNote: "a local cluster is running"})
	if r := find(t, rows, "claims/s, 8 callers, real API server [recorded"); !strings.Contains(r.Figure, "a local cluster is running") {
		t.Errorf("the recorded row does not say why: %+v", r)
	}
	if md := Markdown(BuildRows(Results{}, Extra{RSSMB: 1, StartMs: 1}, recorded)); strings.Count(md, "\n") != len(BuildRows(Results{}, Extra{}, recorded))+2 {
		t.Errorf("table lines:\n%s", md)
	}
}

func TestStartedLine(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 21, 0, 0, 0, time.UTC)
	logs := "I1205 21:00:00.100000 1 run.go:10] \"Serving the kubelet\" driver=\"gpu.tessera.dev\"\n" +
		"I1205 21:00:00.130000 1 run.go:20] \"Started\" mainStarted=\"2026-12-05T21:00:00.0425Z\" total=\"80ms\" phases=\"nvml=12.500ms first-publish=30.000ms\"\n"
	mainMs, phases, err := startedLine(logs, t0)
	if err != nil {
		t.Fatal(err)
	}
	if mainMs != 42.5 || len(phases) != 2 || phases[0] != (startup.Phase{Name: "nvml", Took: 12500 * time.Microsecond}) || phases[1].Name != "first-publish" {
		t.Errorf("startedLine = %v, %v", mainMs, phases)
	}
	if _, _, err := startedLine("I1205 \"Serving the kubelet\"\n", t0); err == nil {
		t.Error("a log without the Started line parsed")
	}
}

func TestParseVmRSS(t *testing.T) {
	const status = "Name:\tx\nVmPeak:\t  999 kB\nVmRSS:\t   18432 kB\nRssAnon:\t    6980 kB\nRssFile:\t   11452 kB\nThreads: 9\n"
	for key, want := range map[string]int64{"VmRSS": 18432, "RssAnon": 6980, "RssFile": 11452} {
		if kb, err := parseStatusKB(status, key); err != nil || kb != want {
			t.Errorf("%s: %d %v", key, kb, err)
		}
	}
	if _, err := parseStatusKB("Name: x\n", "VmRSS"); err == nil {
		t.Error("no VmRSS line parsed")
	}
}
