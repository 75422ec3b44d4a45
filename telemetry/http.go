package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"k8s.io/klog/v2"
)

// Handler serves a daemon's metrics in Prometheus' text format: its own hand-written families
// first (own, may be nil), then everything gathered from g.
func Handler(own func(ctx context.Context) []byte, g prometheus.Gatherer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		format := expfmt.NewFormat(expfmt.TypeTextPlain)
		w.Header().Set("Content-Type", string(format))
		if own != nil {
			_, _ = w.Write(own(ctx))
		}
		if g == nil {
			return
		}
		fams, err := g.Gather()
		if err != nil {
			klog.ErrorS(err, "Gathering metrics")
		}
		enc := expfmt.NewEncoder(w, format)
		for _, f := range fams {
			if err := enc.Encode(f); err != nil {
				klog.ErrorS(err, "Encoding metrics")
				return
			}
		}
	})
}

var descReloads = prometheus.NewDesc("tessera_profile_reloads_total", "Sharing-profile changes accepted (the first load included) or refused (the last good profile kept serving).", []string{"component", "result"}, nil)

// ProfileReloads exports a profile watcher's counts (profile.Watcher.Reloads) as
// tessera_profile_reloads_total{result="success"|"failure"}.
func ProfileReloads(component string, reloads func() (accepted, refused uint64)) prometheus.Collector {
	return reloadCollector{component, reloads}
}

type reloadCollector struct {
	component string
	reloads   func() (uint64, uint64)
}

func (r reloadCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descReloads }

func (r reloadCollector) Collect(ch chan<- prometheus.Metric) {
	ok, bad := r.reloads()
	ch <- prometheus.MustNewConstMetric(descReloads, prometheus.CounterValue, float64(ok), r.component, "success")
	ch <- prometheus.MustNewConstMetric(descReloads, prometheus.CounterValue, float64(bad), r.component, "failure")
}

// Serve serves metrics at /metrics and "ok" at /healthz on addr until ctx ends, and returns the
// address it listens on.
func Serve(ctx context.Context, addr string, metrics http.Handler) (string, error) {
	return ServeWaiting(ctx, addr, metrics, 0)
}

// ServeWaiting is Serve that, when addr is in use and wait is positive, keeps trying every wait
// in the background instead of failing (returning ""): in a rolling update the new instance of a
// daemon on the host network starts while the one it replaces still holds the port.
func ServeWaiting(ctx context.Context, addr string, metrics http.Handler, wait time.Duration) (string, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	serve := func(ln net.Listener) {
		go func() { _ = srv.Serve(ln) }()
		go func() {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
		klog.InfoS("Serving metrics", "address", ln.Addr().String(), "paths", "/metrics,/healthz")
	}
	ln, err := net.Listen("tcp", addr)
	if err == nil {
		serve(ln)
		return ln.Addr().String(), nil
	}
	if wait <= 0 || !errors.Is(err, syscall.EADDRINUSE) {
		return "", fmt.Errorf("--metrics-address: %w", err)
	}
	klog.InfoS("Metrics address in use (by the instance this one replaces?); trying again until it is free", "address", addr, "every", wait)
	go func() {
		t := time.NewTicker(wait)
		defer t.Stop()
		since := time.Now()
		warned := since
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			ln, err := net.Listen("tcp", addr)
			if err == nil {
				serve(ln)
				return
			}
			// Something else may hold it for good (another exporter on the host network): say so.
			if time.Since(warned) >= 30*time.Second {
				warned = time.Now()
				klog.InfoS("Metrics address still in use: /metrics and /healthz are not served; if no instance of this daemon is being replaced, another process holds the port (choose another --metrics-address)",
					"address", addr, "waiting", time.Since(since).Round(time.Second), "err", err)
			}
		}
	}()
	return "", nil
}
