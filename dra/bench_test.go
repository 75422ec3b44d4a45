package dra

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
)

// BenchmarkPrepareUnprepare measures the driver's own Prepare+Unprepare of one whole-GPU claim on a
// simulated node (no API server: the helper's claim GET is not included), with real fsyncs.
func BenchmarkPrepareUnprepare(b *testing.B) {
	quiet(b)
	e := mixedEnv(b)
	c := e.claim("bench", []alloc{{"gpu", "gpu-0", false}})
	b.ResetTimer()
	for b.Loop() {
		e.mustPrepare(c)
		if err := e.unprepare(c); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPrepareParallel runs Prepare+Unprepare from 8 callers, each on its own GPU.
func BenchmarkPrepareParallel(b *testing.B) {
	quiet(b)
	lib, node := openSim(b, "dgx-h100")
	e := newEnv(b, lib, node, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: dra, mode: whole}\n")
	var claims []*resourceapi.ResourceClaim
	for _, d := range e.d.Inventory().Devices {
		claims = append(claims, e.claim(fmt.Sprintf("b%d", len(claims)), []alloc{{"gpu", d.Name, false}}))
	}
	b.ResetTimer()
	var wg sync.WaitGroup
	per := (b.N + len(claims) - 1) / len(claims)
	for _, c := range claims {
		wg.Go(func() {
			for range per {
				r, err := e.d.PrepareResourceClaims(context.Background(), []*resourceapi.ResourceClaim{c})
				if err != nil || r[c.UID].Err != nil {
					b.Error(err, r[c.UID].Err)
					return
				}
				if err := e.unprepare(c); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// BenchmarkPrepareLatency is what the kubelet waits for, as the kubeletplugin helper serves it: the
// claim GET and the driver's Prepare, then Unprepare, of one whole-GPU claim per caller on a
// simulated dgx-h100, with 1 and with 8 parallel callers (each on its own GPU), fsyncs included.
// The baseline, timed just before each Prepare by the same caller, is the bare claim GET. Here the
// GET is served by a fake clientset (in memory, no API server): the ratio is to that, far cheaper
// than the real API server's GET; tests/e2e/dra_bench_test.go measures against the real one.
// claims/s counts Prepare+Unprepare cycles over the wall time of the run (baseline GETs included).
func BenchmarkPrepareLatency(b *testing.B) {
	for _, callers := range []int{1, 8} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			quiet(b)
			lib, node := openSim(b, "dgx-h100")
			e := newEnv(b, lib, node, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: dra, mode: whole}\n")
			devs := e.d.Inventory().Devices
			if len(devs) < callers {
				b.Fatalf("%d devices for %d callers", len(devs), callers)
			}
			claims := make([]*resourceapi.ResourceClaim, callers)
			for i := range callers {
				claims[i] = e.claim(fmt.Sprintf("lat%d", i), []alloc{{"gpu", devs[i].Name, false}})
			}
			per := (b.N + callers - 1) / callers
			var mu sync.Mutex
			var get, prep, unprep []time.Duration
			ctx := context.Background()
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for _, c := range claims {
				wg.Go(func() {
					var g, p, u []time.Duration
					api := e.client.ResourceV1().ResourceClaims(c.Namespace)
					for range per {
						t0 := time.Now()
						if _, err := api.Get(ctx, c.Name, metav1.GetOptions{}); err != nil {
							b.Error(err)
							return
						}
						t1 := time.Now()
						got, err := api.Get(ctx, c.Name, metav1.GetOptions{})
						if err != nil {
							b.Error(err)
							return
						}
						r, err := e.d.PrepareResourceClaims(ctx, []*resourceapi.ResourceClaim{got})
						if err != nil || r[c.UID].Err != nil {
							b.Error(err, r[c.UID].Err)
							return
						}
						t2 := time.Now()
						if err := e.unprepare(c); err != nil {
							b.Error(err)
							return
						}
						t3 := time.Now()
						g, p, u = append(g, t1.Sub(t0)), append(p, t2.Sub(t1)), append(u, t3.Sub(t2))
					}
					mu.Lock()
					get, prep, unprep = append(get, g...), append(prep, p...), append(unprep, u...)
					mu.Unlock()
				})
			}
			wg.Wait()
			wall := time.Since(start)
			b.StopTimer()
			if b.Failed() || len(prep) == 0 {
				return
			}
			us := func(d []time.Duration, q float64) float64 {
				slices.Sort(d)
				return float64(d[min(len(d)-1, int(q*float64(len(d))))].Nanoseconds()) / 1e3
			}
			b.ReportMetric(us(prep, 0.50), "prepare-p50-µs")
			b.ReportMetric(us(prep, 0.99), "prepare-p99-µs")
			b.ReportMetric(us(unprep, 0.50), "unprepare-p50-µs")
			b.ReportMetric(us(unprep, 0.99), "unprepare-p99-µs")
			b.ReportMetric(us(get, 0.50), "get-p50-µs")
			b.ReportMetric(us(get, 0.99), "get-p99-µs")
			b.ReportMetric(us(prep, 0.99)/us(get, 0.99), "p99-x-get")
			b.ReportMetric(float64(len(prep))/wall.Seconds(), "claims/s")
		})
	}
}

// quiet keeps the driver's log out of the benchmark's output.
func quiet(b *testing.B) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	b.Cleanup(func() { klog.LogToStderr(true) })
}

// BenchmarkStartupReconcile56 is a driver restart on a node with 56 prepared claims: every GPU of a
// simulated dgx-h100 cut all-1g (7 × 1g.10gb, mig-static), one claim per MIG device, prepared with
// fsynced checkpoints and CDI specs. Each iteration is dra.New over that state directory (start-up
// reconciliation: locking every GPU, reading and checking each checkpoint and its CDI spec, stale
// spec cleanup) and Stop. The baseline, timed in the same iterations, is reading the 56 checkpoint
// files and nothing else.
func BenchmarkStartupReconcile56(b *testing.B) {
	quiet(b)
	lib, node := openSim(b, "dgx-h100")
	for g := range 8 {
		applyMIG(b, lib, g, map[string]int{"1g.10gb": 7})
	}
	e := newEnv(b, lib, node, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: dra, mode: mig-static, mig: {layout: existing}}\n")
	var claims []*resourceapi.ResourceClaim
	for _, d := range e.d.Inventory().Devices {
		if d.MIG != nil {
			claims = append(claims, e.claim(fmt.Sprintf("r%d", len(claims)), []alloc{{"gpu", d.Name, false}}))
		}
	}
	if len(claims) != 56 {
		b.Fatalf("%d MIG devices, want 56", len(claims))
	}
	for _, c := range claims {
		e.mustPrepare(c)
	}
	e.stop()
	opts := []Option{WithNodeName(testNode), WithStateDir(e.stateDir), WithCDI(e.gen), WithBootID(e.node.BootID),
		WithTimeSlicer(e.slicer), WithKubeClient(e.client), WithResyncInterval(0), WithSysfsRoot(e.node.Host().SysRoot())}
	ckpts := &checkpoints{dir: filepath.Join(e.stateDir, "checkpoints")}
	ctx := context.Background()
	var newT, readT []time.Duration
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		uids, err := ckpts.list()
		if err != nil || len(uids) != 56 {
			b.Fatalf("%d checkpoints: %v", len(uids), err)
		}
		for _, uid := range uids {
			if _, err := ckpts.read(uid); err != nil {
				b.Fatal(err)
			}
		}
		t1 := time.Now()
		d, err := New(ctx, lib, opts...)
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		d.Stop()
		if n := len(d.index); n != 56 {
			b.Fatalf("%d claims prepared after the restart, want 56", n)
		}
		readT, newT = append(readT, t1.Sub(t0)), append(newT, t2.Sub(t1))
	}
	b.StopTimer()
	ms := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Nanoseconds()) / 1e6
	}
	n, r := ms(newT), ms(readT)
	b.ReportMetric(n, "ms-reconcile")
	b.ReportMetric(r, "ms-read-checkpoints")
	b.ReportMetric(n/r, "x-read")
}
