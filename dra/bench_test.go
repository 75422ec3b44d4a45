package dra

import (
	"context"
	"fmt"
	"io"
	"sync"
	"testing"

	resourceapi "k8s.io/api/resource/v1"
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

// quiet keeps the driver's log out of the benchmark's output.
func quiet(b *testing.B) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	b.Cleanup(func() { klog.LogToStderr(true) })
}
