package health_test

import (
	"context"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

func setup(t *testing.T) (*health.Monitor, *sim.Node, *clocktesting.FakeClock, nvmlib.Interface) {
	t.Helper()
	lib, node, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: t.TempDir()}.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	clk := clocktesting.NewFakeClock(time.Unix(1_700_000_000, 0))
	return health.NewMonitor(lib, health.DefaultPolicy(), health.WithClock(clk)), node, clk, lib
}

func xid(gpu int, code uint64) nvmlib.Event {
	return nvmlib.Event{Type: nvmlib.EventXID, XID: code, GPUIndex: gpu, GI: -1, CI: -1}
}

func TestClassify(t *testing.T) {
	p := health.DefaultPolicy()
	cases := []struct {
		e    nvmlib.Event
		want health.Action
	}{
		{xid(0, 13), health.Ignore},
		{xid(0, 43), health.Ignore},
		{xid(0, 109), health.Ignore},
		{xid(0, 48), health.UntilReset},
		{xid(0, 79), health.UntilReset},
		{xid(0, 95), health.UntilReset},
		{xid(0, 94), health.UntilQuiet},
		{xid(0, 74), health.UntilQuiet},
		{nvmlib.Event{Type: nvmlib.EventECCSBE}, health.Ignore},
		{nvmlib.Event{Type: nvmlib.EventECCDBE}, health.UntilReset},
		{nvmlib.Event{Type: nvmlib.EventGPULost}, health.UntilReset},
	}
	for _, tc := range cases {
		if got := p.Classify(tc.e); got != tc.want {
			t.Errorf("%s %d: %s, want %s", tc.e.Type, tc.e.XID, got, tc.want)
		}
	}
	p2, err := p.WithIgnored(94)
	if err != nil || p2.Classify(xid(0, 94)) != health.Ignore || p.Classify(xid(0, 94)) != health.UntilQuiet {
		t.Errorf("WithIgnored(94): %v", err)
	}
	if _, err := p.WithIgnored(79); err == nil {
		t.Error("XID 79 could be ignored")
	}
}

func TestQuietRecovery(t *testing.T) {
	m, _, clk, _ := setup(t)
	m.Handle(xid(2, 94))
	if m.GPUHealthy(2) || m.DeviceHealthy(2, 1, 0) || !m.GPUHealthy(1) {
		t.Fatal("XID 94 on GPU 2 should make GPU 2 and its MIG devices unhealthy, and nothing else")
	}
	clk.Step(health.DefaultQuietPeriod / 2)
	if r := m.ProbeOnce(); len(r) != 0 {
		t.Fatalf("recovered before the quiet period: %+v", r)
	}
	m.Handle(xid(2, 94)) // a repeat restarts the quiet period
	clk.Step(health.DefaultQuietPeriod - time.Second)
	if r := m.ProbeOnce(); len(r) != 0 {
		t.Fatalf("recovered although the fault repeated: %+v", r)
	}
	clk.Step(2 * time.Second)
	if r := m.ProbeOnce(); len(r) != 1 || !r[0].Healthy || !m.GPUHealthy(2) {
		t.Fatalf("no recovery after a quiet period: %+v", r)
	}
}

func TestResetRecovery(t *testing.T) {
	m, node, clk, _ := setup(t)
	// An XID 48 from the simulator raises the GPU's uncorrected ECC count.
	if err := node.InjectXID(5, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	m.Handle(xid(5, 48))
	clk.Step(time.Hour)
	if r := m.ProbeOnce(); len(r) != 0 || m.GPUHealthy(5) {
		t.Fatalf("XID 48 recovered without a reset: %+v", r)
	}
	if err := node.ResetGPU(5); err != nil {
		t.Fatal(err)
	}
	if r := m.ProbeOnce(); len(r) != 1 || !m.GPUHealthy(5) {
		t.Fatalf("no recovery after the GPU reset: %+v", r)
	}

	// A lost GPU recovers only once it answers again.
	if err := node.InjectGPULost(6); err != nil {
		t.Fatal(err)
	}
	m.Handle(nvmlib.Event{Type: nvmlib.EventGPULost, XID: 79, GPUIndex: 6, GI: -1, CI: -1})
	if r := m.ProbeOnce(); len(r) != 0 {
		t.Fatalf("a lost GPU recovered: %+v", r)
	}
	if err := node.ResetGPU(6); err != nil {
		t.Fatal(err)
	}
	if r := m.ProbeOnce(); len(r) != 1 {
		t.Fatalf("lost GPU did not recover after reset: %+v", r)
	}
}

func TestMIGScopedEvent(t *testing.T) {
	m, _, _, _ := setup(t)
	m.Handle(nvmlib.Event{Type: nvmlib.EventXID, XID: 94, GPUIndex: 3, GI: 7, CI: 0})
	if !m.GPUHealthy(3) || m.DeviceHealthy(3, 7, 0) || !m.DeviceHealthy(3, 8, 0) {
		t.Fatal("a MIG-scoped XID should mark only that MIG device")
	}
}

// TestRunDeliversInjectedEvents: an XID injected into the simulated node reaches subscribers through
// NVML's event path within a second.
func TestRunDeliversInjectedEvents(t *testing.T) {
	lib, node, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: t.TempDir()}.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Shutdown()
	m := health.NewMonitor(lib, health.DefaultPolicy(), health.WithProbeInterval(50*time.Millisecond))
	ch, cancelSub := m.Subscribe()
	defer cancelSub()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	if err := node.InjectGPULost(4); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-ch:
		if s.GPU != 4 || s.Healthy {
			t.Fatalf("change %+v", s)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("unhealthy after %v, want within 1s", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no health change")
	}
	if err := node.ResetGPU(4); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-ch:
		if s.GPU != 4 || !s.Healthy {
			t.Fatalf("change %+v", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no recovery after reset")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// criticalXIDs limits what counts (the reset class always counts); SetPolicy applies to later events.
func TestCriticalXIDsAndSetPolicy(t *testing.T) {
	p := health.DefaultPolicy().WithCritical(94)
	for _, tc := range []struct {
		xid  uint64
		want health.Action
	}{{94, health.UntilQuiet}, {74, health.Ignore}, {79, health.UntilReset}, {13, health.Ignore}} {
		if got := p.Classify(xid(0, tc.xid)); got != tc.want {
			t.Errorf("critical [94]: XID %d is %s, want %s", tc.xid, got, tc.want)
		}
	}
	if health.DefaultPolicy().WithCritical().Classify(xid(0, 74)) != health.UntilQuiet {
		t.Error("no critical list should leave XID 74 critical")
	}
	m, _, _, _ := setup(t)
	m.SetPolicy(p)
	m.Handle(xid(1, 74))
	if !m.GPUHealthy(1) {
		t.Error("XID 74 counted after SetPolicy(critical [94])")
	}
	m.Handle(xid(1, 94))
	if m.GPUHealthy(1) {
		t.Error("XID 94 ignored after SetPolicy(critical [94])")
	}
}

// The last XID of each GPU is kept, whether the policy ignores it (13, an application's fault) or
// not, and stays after the GPU recovers.
func TestLastXIDs(t *testing.T) {
	m, _, clk, _ := setup(t)
	if got := m.LastXIDs(); len(got) != 0 {
		t.Fatalf("last XIDs before any event: %v", got)
	}
	m.Handle(xid(1, 13))
	m.Handle(xid(2, 94))
	m.Handle(xid(2, 31))
	clk.Step(health.DefaultQuietPeriod + time.Second)
	m.ProbeOnce()
	got := m.LastXIDs()
	if len(got) != 2 || got[1] != 13 || got[2] != 31 {
		t.Errorf("last XIDs %v, want GPU 1: 13, GPU 2: 31", got)
	}
	if !m.GPUHealthy(1) {
		t.Error("an ignored XID made GPU 1 unhealthy")
	}
}
