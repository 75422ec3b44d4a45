package telemetry

import (
	"context"
	"net/http"
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
