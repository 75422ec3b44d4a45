package dra

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"time"
)

// latencyBuckets are the upper bounds (seconds) of the Prepare/Unprepare latency histograms.
var latencyBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

type histogram struct {
	counts []uint64 // per bucket, then +Inf
	sum    float64
	n      uint64
}

func (h *histogram) observe(d time.Duration) {
	if h.counts == nil {
		h.counts = make([]uint64, len(latencyBuckets)+1)
	}
	s := d.Seconds()
	i := sort.SearchFloat64s(latencyBuckets, s)
	h.counts[i]++
	h.sum += s
	h.n++
}

// Metrics are the driver's counters, served in the Prometheus text format.
type Metrics struct {
	mu               sync.Mutex
	prepares         map[string]uint64 // by result: ok, error
	unprepares       map[string]uint64
	prepareLatency   histogram
	unprepareLatency histogram
	published        int
}

func newMetrics() *Metrics {
	return &Metrics{prepares: map[string]uint64{}, unprepares: map[string]uint64{}}
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

func (m *Metrics) observePrepare(d time.Duration, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.prepares[result(err)]++
	m.prepareLatency.observe(d)
}

func (m *Metrics) observeUnprepare(d time.Duration, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unprepares[result(err)]++
	m.unprepareLatency.observe(d)
}

func (m *Metrics) setPublished(n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.published = n
}

// Prepared returns how many prepares succeeded and failed.
func (m *Metrics) Prepared() (ok, failed uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.prepares["ok"], m.prepares["error"]
}

// ServeHTTP writes the metrics in the Prometheus text exposition format.
func (m *Metrics) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	m.WriteText(w)
}

// WriteText writes the metrics in the Prometheus text exposition format.
func (m *Metrics) WriteText(w io.Writer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	counter := func(name, help string, v map[string]uint64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n", name, help, name)
		for _, r := range []string{"error", "ok"} {
			fmt.Fprintf(w, "%s{result=%q} %d\n", name, r, v[r])
		}
	}
	hist := func(name, help string, h histogram) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name)
		var cum uint64
		for i, b := range latencyBuckets {
			if h.counts != nil {
				cum += h.counts[i]
			}
			fmt.Fprintf(w, "%s_bucket{le=\"%g\"} %d\n", name, b, cum)
		}
		fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %g\n%s_count %d\n", name, h.n, name, h.sum, name, h.n)
	}
	counter("tessera_dra_prepares_total", "Claims prepared, by result.", m.prepares)
	counter("tessera_dra_unprepares_total", "Claims unprepared, by result.", m.unprepares)
	hist("tessera_dra_prepare_seconds", "Time to prepare one claim.", m.prepareLatency)
	hist("tessera_dra_unprepare_seconds", "Time to unprepare one claim.", m.unprepareLatency)
	fmt.Fprintf(w, "# HELP tessera_dra_published_devices Devices in the node's ResourceSlices.\n# TYPE tessera_dra_published_devices gauge\ntessera_dra_published_devices %d\n", m.published)
}
