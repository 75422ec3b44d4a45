package telemetry_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/telemetry"
)

// A replica holder on a shared GPU whose process cannot be named (no pod lister, or the pod is not
// known yet) may be the busy one: the whole GPU's utilization decides, never a false idle report.
func TestSharedHolderWithUnnamedProcessIsBusy(t *testing.T) {
	for _, tc := range []struct {
		name      string
		gpuUtil   int
		smPercent int
		wantIdle  bool
	}{
		{"busy process, busy GPU", 90, 90, false},
		{"idle process, idle GPU", 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 10*time.Minute)
			ctx := context.Background()
			writeCgroup(t, e.proc, 500, "12:memory:/kubepods/besteffort/pod"+uidA+"/c1\n")
			if err := e.node.AddProcess(2, 500, 4096, -1, -1); err != nil {
				t.Fatal(err)
			}
			if err := e.node.SetProcessUtilization(2, 500, tc.smPercent); err != nil {
				t.Fatal(err)
			}
			e.set(t, 2, tc.gpuUtil, 300)
			src := &fakeSource{owned: []int{2}, holdings: []telemetry.Holding{{GPU: 2, Device: "GPU-2::0", Resource: "nvidia.com/gpu.shared",
				Kind: telemetry.KindReplica, GI: -1, Healthy: true, Namespace: "ml", Pod: "trainer"}}}
			var changes []bool
			s, err := telemetry.New(telemetry.Options{Lib: e.lib, Component: "device-plugin", Source: src, ProcRoot: e.proc,
				IdleWindow: 10 * time.Minute, IdleUtilizationPercent: 5, Clock: e.clock,
				OnIdleChange: func(_ telemetry.Holding, idle bool, _ string) { changes = append(changes, idle) }})
			if err != nil {
				t.Fatal(err)
			}
			s.Sample(ctx)
			e.clock.Add(11 * time.Minute)
			s.Sample(ctx)
			idle := s.IdleFor("GPU-2::0", "ml", "trainer", "") == 11*time.Minute
			if idle != tc.wantIdle || slices.Equal(changes, []bool{true}) != tc.wantIdle {
				t.Errorf("idle for %s, changes %v; want idle %v", s.IdleFor("GPU-2::0", "ml", "trainer", ""), changes, tc.wantIdle)
			}
		})
	}
}

// A claim reported idle keeps its report when its pod becomes known, and is told it is no longer
// idle when the claim goes away, so its Idle condition does not outlive it.
func TestIdleReportClearedWhenHolderGoes(t *testing.T) {
	e := newEnv(t, time.Minute)
	ctx := context.Background()
	e.set(t, 0, 0, 50)
	src := &fakeSource{owned: []int{0}, holdings: []telemetry.Holding{{GPU: 0, Device: "gpu-0", Resource: "gpu.tessera.dev",
		Kind: telemetry.KindGPU, GI: -1, Exclusive: true, Healthy: true, Namespace: "ml", Claim: "ml/c"}}}
	var changes []string
	s, err := telemetry.New(telemetry.Options{Lib: e.lib, Component: "dra", Source: src, ProcRoot: e.proc,
		IdleWindow: time.Minute, IdleUtilizationPercent: 5, Clock: e.clock,
		OnIdleChange: func(h telemetry.Holding, idle bool, _ string) {
			changes = append(changes, fmt.Sprint(h.Claim, " ", idle))
		}})
	if err != nil {
		t.Fatal(err)
	}
	s.Sample(ctx)
	e.clock.Add(2 * time.Minute)
	s.Sample(ctx)
	src.holdings[0].Pod = "trainer"
	e.clock.Add(time.Minute)
	s.Sample(ctx)
	if d := s.IdleFor("gpu-0", "ml", "trainer", "ml/c"); d != 3*time.Minute {
		t.Errorf("idle for %s after the pod became known, want 3m (the same idle period)", d)
	}
	src.holdings = nil
	s.Sample(ctx)
	if want := []string{"ml/c true", "ml/c false"}; !slices.Equal(changes, want) {
		t.Errorf("idle changes %q, want %q", changes, want)
	}
}

// NVML gives no utilization for a GPU in MIG mode (the simulator answers NOT_SUPPORTED as hardware
// does): the GPU's other readings are still exported, its utilization is not, and a MIG holder with
// no process on its instance is reported idle.
func TestMIGGPUWithoutUtilization(t *testing.T) {
	e := newEnv(t, time.Minute)
	ctx := context.Background()
	e.src.holdings = []telemetry.Holding{{GPU: 1, Device: "free-one", Resource: "nvidia.com/mig-3g.40gb", Kind: telemetry.KindMIG,
		GI: 99, Healthy: true, Namespace: "ml", Pod: "server"}}
	var err error
	e.s, err = telemetry.New(telemetry.Options{Lib: e.lib, Component: "device-plugin", Source: e.src, Pods: e.pods, Events: e.events,
		ProcRoot: e.proc, IdleWindow: time.Minute, IdleUtilizationPercent: 5, Clock: e.clock})
	if err != nil {
		t.Fatal(err)
	}
	e.reg = prometheus.NewPedanticRegistry()
	e.reg.MustRegister(e.s)
	mw := 90_000
	if err := e.node.Set(1, sim.Settings{PowerMilliwatts: &mw}); err != nil {
		t.Fatal(err)
	}
	e.s.Sample(ctx)
	e.clock.Add(2 * time.Minute)
	e.s.Sample(ctx)
	got := e.scrape(t)
	if v := find(t, got, "tessera_gpu_readable", "gpu=1"); v != 1 {
		t.Errorf("MIG GPU readable %v, want 1", v)
	}
	if v := find(t, got, "tessera_gpu_power_watts", "gpu=1"); v != 90 {
		t.Errorf("MIG GPU power %v W, want 90", v)
	}
	for k := range got {
		if strings.HasPrefix(k, "tessera_gpu_utilization_percent{") && strings.Contains(k, "gpu=1,") {
			t.Errorf("utilization exported for a GPU in MIG mode: %s", k)
		}
	}
	if find(t, got, "tessera_gpu_utilization_percent", "gpu=0") < 0 {
		t.Error("GPU 0 lost its utilization")
	}
	if d := e.s.IdleFor("free-one", "ml", "server", ""); d != 2*time.Minute {
		t.Errorf("MIG holder with no process idle for %s, want 2m", d)
	}
	if evs := e.events.list(); len(evs) != 1 || !strings.Contains(evs[0], "no process on it") {
		t.Errorf("events: %v", evs)
	}
}
