package plugin_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/plugin/kubelettest"
)

// Benchmarks over the plugin's real unix socket, as the kubelet calls it, on a simulated dgx-h100
// with 8 whole GPUs, 80 time-sliced replicas (10 per GPU) or 800 (100 per GPU). Each reports p50
// and p99 latency and their ratio to an empty gRPC call (GetDevicePluginOptions, which returns a
// constant) over the same socket, measured in the same run, so figures compare across machines.
// `make bench` (tests/cmd/benchtable) turns these metrics into docs/performance.md.
//
//	go test -run '^$' -bench . -benchtime 2000x ./plugin/

func benchEnv(b *testing.B, replicas int) (*env, kubelettest.Snapshot, pluginapi.DevicePluginClient) {
	e := newEnv(b, "dgx-h100")
	doc := "version: v1\n"
	n := 8
	if replicas > 1 {
		doc = fmt.Sprintf("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: %d\n", replicas)
		n = 8 * replicas
	}
	e.start(doc)
	s := e.waitCount("nvidia.com/gpu", n)
	c, err := e.kubelet.Client("nvidia.com/gpu")
	if err != nil {
		b.Fatal(err)
	}
	return e, s, c
}

var sizes = []struct {
	devices, replicas int
}{{8, 1}, {80, 10}, {800, 100}}

// measure runs call b.N times, and the empty call b.N times, and reports percentiles and ratios.
// after, if any, runs after each measured call, outside the measurement.
func measure(b *testing.B, c pluginapi.DevicePluginClient, call func(ctx context.Context) error, after ...func(ctx context.Context) error) {
	ctx := context.Background()
	for range 50 { // warm the connection
		if _, err := c.GetDevicePluginOptions(ctx, &pluginapi.Empty{}); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([]time.Duration, 0, b.N)
	base := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := c.GetDevicePluginOptions(ctx, &pluginapi.Empty{}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := call(ctx); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t1))
		base = append(base, t1.Sub(t0))
		for _, f := range after {
			if err := f(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	p := func(d []time.Duration, q float64) float64 {
		slices.Sort(d)
		return float64(d[min(len(d)-1, int(q*float64(len(d))))].Nanoseconds())
	}
	p50, p99, b50, b99 := p(lat, 0.50), p(lat, 0.99), p(base, 0.50), p(base, 0.99)
	b.ReportMetric(p50/1e3, "p50-µs")
	b.ReportMetric(p99/1e3, "p99-µs")
	b.ReportMetric(b50/1e3, "empty-p50-µs")
	b.ReportMetric(b99/1e3, "empty-p99-µs")
	b.ReportMetric(p50/b50, "p50-x-empty")
	b.ReportMetric(p99/b99, "p99-x-empty")
}

func BenchmarkAllocate(b *testing.B) {
	for _, sz := range sizes {
		b.Run(fmt.Sprintf("devices=%d", sz.devices), func(b *testing.B) {
			_, s, c := benchEnv(b, sz.replicas)
			ids := s.IDs()
			i := 0
			measure(b, c, func(ctx context.Context) error {
				i++
				_, err := c.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{ids[i%len(ids)]}}}})
				return err
			})
		})
	}
}

func BenchmarkGetPreferredAllocation(b *testing.B) {
	for _, sz := range sizes {
		b.Run(fmt.Sprintf("devices=%d", sz.devices), func(b *testing.B) {
			e, s, c := benchEnv(b, sz.replicas)
			size := int32(1)
			if sz.replicas == 1 {
				size = 2 // whole GPUs: the NVLink-aware path
			}
			req := &pluginapi.PreferredAllocationRequest{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
				AvailableDeviceIDs: s.IDs(), AllocationSize: size}}}
			// Diagnostic, not the baseline: a no-op handler (PreStartContainer answers a constant)
			// receiving the same IDs, decoded by gRPC's protobuf codec, on the same connection: what
			// carrying the kubelet's request costs before any work of ours.
			noop := &pluginapi.PreStartContainerRequest{DevicesIds: s.IDs()}
			var noopLat []time.Duration
			calls, _ := e.lib.Calls()
			var extra []func(context.Context) error
			if sz.devices == 800 {
				extra = append(extra, func(ctx context.Context) error {
					t0 := time.Now()
					_, err := c.PreStartContainer(ctx, noop)
					noopLat = append(noopLat, time.Since(t0))
					return err
				})
			}
			measure(b, c, func(ctx context.Context) error {
				_, err := c.GetPreferredAllocation(ctx, req)
				return err
			}, extra...)
			if len(noopLat) > 0 {
				slices.Sort(noopLat)
				b.ReportMetric(float64(noopLat[len(noopLat)/2].Nanoseconds())/1e3, "noop-ids-p50-µs")
				b.ReportMetric(float64(noopLat[min(len(noopLat)-1, len(noopLat)*99/100)].Nanoseconds())/1e3, "noop-ids-p99-µs")
			}
			// Every NVML call the plugin made while measuring, background work included (an upper
			// bound on the calls per request).
			after, _ := e.lib.Calls()
			b.ReportMetric(float64(after-calls)/float64(b.N), "nvml-calls/op")
		})
	}
}

// BenchmarkListAndWatchBytes reports the encoded size of the device list per device.
func BenchmarkListAndWatchBytes(b *testing.B) {
	for _, sz := range sizes {
		b.Run(fmt.Sprintf("devices=%d", sz.devices), func(b *testing.B) {
			_, s, _ := benchEnv(b, sz.replicas)
			for range b.N {
			}
			b.ReportMetric(float64(s.LastListBytes)/float64(len(s.Devices)), "bytes/device")
		})
	}
}

// BenchmarkHealthPropagation measures an XID injected into the simulated node until the kubelet
// stand-in sees every replica of the GPU unhealthy (the issue asks for under a second).
func BenchmarkHealthPropagation(b *testing.B) {
	e := newEnv(b, "dgx-h100")
	e.withMonitor()
	e.start("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	e.waitCount("nvidia.com/gpu", 32)
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		gpu := i % 8
		t0 := time.Now()
		if err := e.node.InjectXID(gpu, 79, -1, -1); err != nil {
			b.Fatal(err)
		}
		if _, err := e.kubelet.WaitForResource(ctxT(b, 10*time.Second), "nvidia.com/gpu", func(s kubelettest.Snapshot) bool {
			return len(s.Healthy()) == 28
		}); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
		b.StopTimer()
		if err := e.node.ResetGPU(gpu); err != nil {
			b.Fatal(err)
		}
		e.monitor.ProbeOnce()
		e.waitCount("nvidia.com/gpu", 32)
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1e3, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1e3, "max-ms")
}
