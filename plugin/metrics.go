package plugin

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// MetricsHandler serves the plugin's metrics in Prometheus' text format: devices per resource and
// health, devices in use (from the kubelet's PodResources API), allocations, allocation errors,
// preferred allocations and registrations per resource, and GPUs whose change waits.
func (p *Plugin) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = w.Write(p.metrics(ctx))
	})
}

// MetricsText is the plugin's own metrics in Prometheus' text format (MetricsHandler serves them).
func (p *Plugin) MetricsText(ctx context.Context) []byte { return p.metrics(ctx) }

func (p *Plugin) metrics(ctx context.Context) []byte {
	var b bytes.Buffer
	servers := *p.live.Load()
	var inUse map[string]map[string]bool
	inUseOK := false
	if p.cfg.inUse != nil {
		if m, err := p.cfg.inUse.InUse(ctx); err == nil {
			inUse, inUseOK = m, true
		}
	}
	header := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	header("tessera_device_plugin_devices", "gauge", "Devices advertised to the kubelet, by resource and health.")
	for _, s := range servers {
		healthy, unhealthy := 0, 0
		for _, d := range s.table.Load().devices {
			if d.Healthy() {
				healthy++
			} else {
				unhealthy++
			}
		}
		fmt.Fprintf(&b, "tessera_device_plugin_devices{resource=%q,health=\"healthy\"} %d\n", s.name, healthy)
		fmt.Fprintf(&b, "tessera_device_plugin_devices{resource=%q,health=\"unhealthy\"} %d\n", s.name, unhealthy)
	}
	if inUseOK {
		header("tessera_device_plugin_devices_in_use", "gauge", "Devices containers hold, as the kubelet's PodResources API reports them.")
		for _, s := range servers {
			n := 0
			for _, d := range s.table.Load().devices {
				if inUse[s.name][d.ID] {
					n++
				}
			}
			fmt.Fprintf(&b, "tessera_device_plugin_devices_in_use{resource=%q} %d\n", s.name, n)
		}
	}
	counter := func(name, help string, get func(*resourceStats) int64) {
		header(name, "counter", help)
		for _, s := range servers {
			fmt.Fprintf(&b, "%s{resource=%q} %s\n", name, s.name, strconv.FormatInt(get(s.stats), 10))
		}
	}
	counter("tessera_device_plugin_allocations_total", "Allocate calls answered.", func(s *resourceStats) int64 { return s.allocations.Load() })
	counter("tessera_device_plugin_allocate_errors_total", "Allocate calls refused.", func(s *resourceStats) int64 { return s.allocateErrors.Load() })
	counter("tessera_device_plugin_preferred_allocations_total", "GetPreferredAllocation calls answered.", func(s *resourceStats) int64 { return s.preferred.Load() })
	counter("tessera_device_plugin_registrations_total", "Registrations with the kubelet.", func(s *resourceStats) int64 { return s.registrations.Load() })
	header("tessera_device_plugin_allocate_seconds", "histogram", "Time to answer one Allocate call, by resource (no NVML or API call is made in it).")
	for _, s := range servers {
		s.stats.allocateLatency.write(&b, "tessera_device_plugin_allocate_seconds", fmt.Sprintf("resource=%q", s.name))
	}
	header("tessera_device_plugin_pending_gpus", "gauge", "GPUs whose profile change waits for devices in use.")
	fmt.Fprintf(&b, "tessera_device_plugin_pending_gpus %d\n", p.pendingN.Load())
	return b.Bytes()
}

// latencyBounds are the upper bounds (seconds) of the Allocate latency histogram.
var latencyBounds = []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1}

// latencyHist is a histogram updated with atomics only, so the RPC path takes no lock.
type latencyHist struct {
	buckets  [11]atomic.Uint64 // one per bound, then +Inf
	sumNanos atomic.Int64
}

func (h *latencyHist) since(start time.Time) {
	d := time.Since(start)
	s := d.Seconds()
	i := 0
	for i < len(latencyBounds) && s > latencyBounds[i] {
		i++
	}
	h.buckets[i].Add(1)
	h.sumNanos.Add(int64(d))
}

func (h *latencyHist) write(b *bytes.Buffer, name, labels string) {
	var cum uint64
	for i, ub := range latencyBounds {
		cum += h.buckets[i].Load()
		fmt.Fprintf(b, "%s_bucket{%s,le=\"%g\"} %d\n", name, labels, ub, cum)
	}
	cum += h.buckets[len(latencyBounds)].Load()
	fmt.Fprintf(b, "%s_bucket{%s,le=\"+Inf\"} %d\n", name, labels, cum)
	fmt.Fprintf(b, "%s_sum{%s} %g\n%s_count{%s} %d\n", name, labels, float64(h.sumNanos.Load())/1e9, name, labels, cum)
}
