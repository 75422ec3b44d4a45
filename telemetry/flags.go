package telemetry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Flags are the telemetry flags both daemons take.
type Flags struct {
	Interval        time.Duration
	IdleWindow      time.Duration
	IdleUtilization int
	IdlePowerWatts  float64
	ProcRoot        string
}

// AddFlags registers the flags.
func (f *Flags) AddFlags(fs *pflag.FlagSet) {
	fs.DurationVar(&f.Interval, "telemetry-interval", 15*time.Second, "how often GPU readings and processes are sampled for /metrics (0: no GPU telemetry)")
	fs.DurationVar(&f.IdleWindow, "idle-window", 30*time.Minute, "how long a device's holder must stay idle to be reported (metric tessera_device_idle and an Event on the pod; negative: off)")
	fs.IntVar(&f.IdleUtilization, "idle-utilization-percent", 5, "GPU utilization at or below which a held GPU counts as idle")
	fs.Float64Var(&f.IdlePowerWatts, "idle-power-watts", 0, "when positive, a held GPU counts as idle only at or below this power draw too")
	fs.StringVar(&f.ProcRoot, "telemetry-proc-root", "/proc", "host procfs, to attribute GPU processes to pods through their cgroups")
}

// Validate names the bad flag.
func (f *Flags) Validate() error {
	switch {
	case f.Interval < 0:
		return errors.New("--telemetry-interval: must not be negative (0 turns GPU telemetry off)")
	case f.IdleUtilization < 0 || f.IdleUtilization > 100:
		return fmt.Errorf("--idle-utilization-percent %d: a percentage is 0 to 100", f.IdleUtilization)
	case f.IdlePowerWatts < 0:
		return fmt.Errorf("--idle-power-watts %v: must not be negative", f.IdlePowerWatts)
	}
	return nil
}

// Start builds and runs a Sampler for a daemon until ctx ends; client may be nil (no pod names, no
// Events); more set further options (LastXIDs, OnIdleChange). It returns nil when telemetry is off.
func (f *Flags) Start(ctx context.Context, lib nvmlib.Interface, component string, src Source, client kubernetes.Interface, nodeName string, more ...func(*Options)) (*Sampler, error) {
	if f.Interval == 0 {
		return nil, nil
	}
	o := Options{Lib: lib, Component: component, Source: src, ProcRoot: f.ProcRoot, Interval: f.Interval,
		IdleWindow: f.IdleWindow, IdleUtilizationPercent: f.IdleUtilization, IdlePowerWatts: f.IdlePowerWatts}
	for _, m := range more {
		m(&o)
	}
	if client != nil && nodeName != "" {
		pods, err := WatchNodePods(ctx, client, nodeName, 30*time.Second)
		if err != nil {
			klog.ErrorS(err, "Telemetry: pods of this node not listed; processes are attributed by pod UID only")
		} else {
			o.Pods = pods
		}
		ev := NewPodEvents(client, nodeName, "tessera-"+component)
		go func() { <-ctx.Done(); ev.Shutdown() }()
		o.Events = ev
	}
	s, err := New(o)
	if err != nil {
		return nil, err
	}
	go s.Run(ctx)
	return s, nil
}
