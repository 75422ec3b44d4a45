package plugin_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/plugin/kubelettest"
)

// withMonitor gives the env a health monitor on a fake clock, watching the simulated node's events.
func (e *env) withMonitor() *clocktesting.FakeClock {
	clk := clocktesting.NewFakeClock(time.Unix(1_800_000_000, 0))
	// Probes run only when a test calls ProbeOnce: the fake clock never reaches the interval.
	e.monitor = health.NewMonitor(e.lib, health.DefaultPolicy(), health.WithClock(clk), health.WithProbeInterval(1000*time.Hour))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = e.monitor.Run(ctx) }()
	e.t.Cleanup(func() { cancel(); <-done })
	// NVML delivers only events after the event set exists: prime the monitor with events on GPU 7
	// (quiet class, a new XID each try) until the last one shows, so that every earlier one was
	// handled (events arrive in order) and the test's own events are all seen.
	xid := uint64(200)
	if err := waitFor(ctxT(e.t, 10*time.Second), func() bool {
		xid++
		if err := e.node.InjectXID(7, xid, -1, -1); err != nil {
			e.t.Fatal(err)
		}
		return waitFor(ctxT(e.t, 300*time.Millisecond), func() bool {
			u := e.monitor.Unhealthy()
			return len(u) == 1 && strings.HasPrefix(u[0].Reason, fmt.Sprintf("XID %d ", xid))
		}) == nil
	}); err != nil {
		e.t.Fatal("the health monitor does not see events")
	}
	clk.Step(health.DefaultQuietPeriod + time.Second)
	if r := e.monitor.ProbeOnce(); len(r) != 1 || !e.monitor.GPUHealthy(7) {
		e.t.Fatalf("priming event did not clear: %+v", r)
	}
	return clk
}

// unhealthyOf waits until the resource's unhealthy devices are exactly want.
func (e *env) waitUnhealthy(resource string, want []string) {
	e.t.Helper()
	want = sorted(want)
	var got []string
	_, err := e.kubelet.WaitForResource(ctxT(e.t, 10*time.Second), resource, func(s kubelettest.Snapshot) bool {
		got = nil
		for _, d := range s.Devices {
			if d.Health != "Healthy" {
				got = append(got, d.ID)
			}
		}
		return slices.Equal(sorted(got), want)
	})
	if err != nil {
		e.t.Fatalf("%s: unhealthy %v, want %v", resource, got, want)
	}
}

// An XID that takes a GPU off the bus makes every replica of that GPU unhealthy (NVIDIA's plugin
// marks one of N, #1929), the other GPUs keep serving and allocating, and the GPU is healthy again
// only once a probe observes a reset (XID 79 is of the until-reset class).
func TestXIDMarksEveryReplicaAndRecoversAfterReset(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.withMonitor()
	e.start("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	e.waitCount("nvidia.com/gpu", 32)
	uuids := e.uuids()

	if err := e.node.InjectXID(3, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	e.waitUnhealthy("nvidia.com/gpu", replicaIDs(uuids[3:4], 4))

	// The rest of the node still allocates and prefers, with GPU 3 lost to NVML.
	ctx := ctxT(t, 10*time.Second)
	s, _ := e.kubelet.Resource("nvidia.com/gpu")
	pref, err := e.kubelet.Preferred(ctx, "nvidia.com/gpu", s.Healthy(), nil, 3)
	if err != nil || len(pref) != 3 {
		t.Fatalf("preferred allocation with a lost GPU: %v %v", pref, err)
	}
	for _, id := range pref {
		if strings.HasPrefix(id, uuids[3]) {
			t.Errorf("preferred allocation offered %s of the lost GPU", id)
		}
	}
	if _, err := e.kubelet.Allocate(ctx, "nvidia.com/gpu", pref[0]); err != nil {
		t.Errorf("allocate with a lost GPU: %v", err)
	}

	// Until the GPU is reset a probe does not recover it.
	if r := e.monitor.ProbeOnce(); len(r) != 0 {
		t.Fatalf("recovered without a reset: %+v", r)
	}
	if err := e.node.ResetGPU(3); err != nil {
		t.Fatal(err)
	}
	if r := e.monitor.ProbeOnce(); len(r) != 1 {
		t.Fatalf("no recovery after the reset: %+v", r)
	}
	e.waitUnhealthy("nvidia.com/gpu", nil)
}

// The published table: application XIDs are ignored, other XIDs make the GPU unhealthy until a
// quiet period passes (recovery found by a probe), and the profile's ignoredXIDs are honoured.
func TestXIDTable(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	clk := e.withMonitor()
	e.start("version: v1\nhealth:\n  ignoredXIDs: [94]\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n")
	e.waitCount("nvidia.com/gpu", 16)
	uuids := e.uuids()

	// Events are handled in order: once GPU 2's XID 74 shows, the XIDs 13 and 94 before it were
	// seen and ignored.
	for _, ev := range []struct {
		gpu int
		xid uint64
	}{{0, 13}, {1, 94}, {2, 74}} {
		if err := e.node.InjectXID(ev.gpu, ev.xid, -1, -1); err != nil {
			t.Fatal(err)
		}
	}
	e.waitUnhealthy("nvidia.com/gpu", replicaIDs(uuids[2:3], 2))

	clk.Step(health.DefaultQuietPeriod / 2)
	if r := e.monitor.ProbeOnce(); len(r) != 0 {
		t.Fatalf("recovered before the quiet period: %+v", r)
	}
	clk.Step(health.DefaultQuietPeriod)
	if r := e.monitor.ProbeOnce(); len(r) != 1 {
		t.Fatalf("no recovery after the quiet period: %+v", r)
	}
	e.waitUnhealthy("nvidia.com/gpu", nil)
}

// A GPU-wide fault marks every MIG device (and replica) of the GPU; a fault scoped to one MIG
// device marks only that device.
func TestXIDOnMIGDevices(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.withMonitor()
	e.migLayout(map[int]map[string]int{0: {"1g.10gb": 7}, 1: {"1g.10gb": 7}})
	e.start("version: v1\nflags: {migStrategy: mixed}\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/mig-1g.10gb\n      replicas: 2\n")
	e.waitCount("nvidia.com/mig-1g.10gb", 28)
	devs0, _ := e.lib.MigDevices(0)
	devs1, _ := e.lib.MigDevices(1)

	m := devs1[4]
	if err := e.node.InjectXID(1, 94, m.GI, m.CI); err != nil {
		t.Fatal(err)
	}
	e.waitUnhealthy("nvidia.com/mig-1g.10gb", []string{m.UUID + "::0", m.UUID + "::1"})

	if err := e.node.InjectXID(0, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, d := range devs0 {
		want = append(want, d.UUID+"::0", d.UUID+"::1")
	}
	e.waitUnhealthy("nvidia.com/mig-1g.10gb", append(want, m.UUID+"::0", m.UUID+"::1"))
}

// A recreated kubelet.sock (a kubelet restart, which also removes the plugin's sockets) makes the
// plugin serve and register again with the same devices, without reading NVML.
func TestKubeletRestartReregistersWithoutNVML(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.migLayout(map[int]map[string]int{7: {"3g.40gb": 2}})
	e.start("version: v1\nflags: {migStrategy: mixed}\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	e.waitResources(map[string]int{"nvidia.com/gpu": 28, "nvidia.com/mig-3g.40gb": 2})
	before := map[string][]string{}
	for _, r := range e.kubelet.Resources() {
		s, _ := e.kubelet.Resource(r)
		before[r] = s.IDs()
	}
	calls, _ := e.lib.Calls()

	for round := 2; round <= 3; round++ {
		if err := e.kubelet.Restart(); err != nil {
			t.Fatal(err)
		}
		err := e.kubelet.WaitFor(ctxT(t, 10*time.Second), func(k *kubelettest.Kubelet) bool {
			for r := range before {
				s, ok := k.Resource(r)
				if !ok || !s.Connected || s.Registrations != round || len(s.Healthy()) != len(before[r]) {
					return false
				}
			}
			return true
		})
		if err != nil {
			t.Fatalf("restart %d: not registered again: %v", round-1, err)
		}
		for r, ids := range before {
			s, _ := e.kubelet.Resource(r)
			if !slices.Equal(s.IDs(), ids) {
				t.Errorf("%s: IDs changed across a kubelet restart", r)
			}
		}
	}
	if after, names := e.lib.Calls(); after != calls {
		t.Errorf("kubelet restarts made %d NVML calls: %s", after-calls, names)
	}
}

// health.disabled turns health checks off (the GPU stays advertised healthy); enabling them again
// advertises what the monitor knows. A reset-class XID in ignoredXIDs is not ignored.
func TestHealthDisabledAndResetClassNotIgnored(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.withMonitor()
	const ts = "version: v1\nhealth: {%s}\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n"
	p := e.start(strings.Replace(ts, "%s", "disabled: true", 1))
	e.waitCount("nvidia.com/gpu", 16)
	u := e.uuids()
	if err := e.node.InjectXID(1, 74, -1, -1); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctxT(t, 10*time.Second), func() bool { return !e.monitor.GPUHealthy(1) }); err != nil {
		t.Fatal("the monitor did not see the XID")
	}
	if s, _ := e.kubelet.Resource("nvidia.com/gpu"); len(s.Healthy()) != 16 {
		t.Errorf("health disabled, yet %d of 16 healthy", len(s.Healthy()))
	}
	if err := p.Update(ctxT(t, 10*time.Second), e.resolve(strings.Replace(ts, "%s", "ignoredXIDs: [48]", 1))); err != nil {
		t.Fatal(err)
	}
	e.waitUnhealthy("nvidia.com/gpu", replicaIDs(u[1:2], 2))
	if err := e.node.InjectXID(5, 48, -1, -1); err != nil {
		t.Fatal(err)
	}
	e.waitUnhealthy("nvidia.com/gpu", append(replicaIDs(u[1:2], 2), replicaIDs(u[5:6], 2)...))
}

func waitFor(ctx context.Context, cond func() bool) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// A GPU reset clears MIG devices: when a MIG GPU recovers from an until-reset fault, the plugin
// partitions it again and advertises its new MIG devices, healthy.
func TestMIGGPURecoversWithNewDevices(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.withMonitor()
	e.start(sp + "spec:\n  rules:\n  - {selector: {indices: [0]}, owner: device-plugin, mode: mig-static, mig: {layout: all-1g.10gb}}\n")
	before := e.waitCount("nvidia.com/mig-1g.10gb", 7)
	if err := e.node.InjectXID(0, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	e.waitUnhealthy("nvidia.com/mig-1g.10gb", before.IDs())
	if err := e.node.ResetGPU(0); err != nil {
		t.Fatal(err)
	}
	if devs, _ := e.lib.MigDevices(0); len(devs) != 0 {
		t.Fatalf("the reset left MIG devices: %v", devs)
	}
	e.monitor.ProbeOnce()
	after, err := e.kubelet.WaitForResource(ctxT(t, 10*time.Second), "nvidia.com/mig-1g.10gb", func(s kubelettest.Snapshot) bool {
		return len(s.Healthy()) == 7 && !slices.Equal(sorted(s.IDs()), sorted(before.IDs()))
	})
	if err != nil {
		t.Fatal(err)
	}
	devs, _ := e.lib.MigDevices(0)
	var want []string
	for _, d := range devs {
		want = append(want, d.UUID)
	}
	if !slices.Equal(sorted(after.IDs()), sorted(want)) {
		t.Errorf("advertised %v, the GPU has %v", after.IDs(), want)
	}
}

// A GPU lost when the plugin starts is not served (its UUID cannot even be read); once a reset
// brings it back, a probe finds it and its devices are advertised.
func TestGPULostAtStartIsServedOnceBack(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.withMonitor()
	u := e.uuids()
	if err := e.node.InjectGPULost(6); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctxT(t, 10*time.Second), func() bool { return !e.monitor.GPUHealthy(6) }); err != nil {
		t.Fatal(err)
	}
	p := e.start("")
	err := p.Update(ctxT(t, 10*time.Second), e.resolve("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n"))
	if err == nil || !strings.Contains(err.Error(), "GPU 6") {
		t.Errorf("update with a lost GPU: %v", err)
	}
	s := e.waitCount("nvidia.com/gpu", 14)
	for _, id := range s.IDs() {
		if strings.HasPrefix(id, u[6]) {
			t.Fatalf("lost GPU 6 is served: %s", id)
		}
	}
	if err := e.node.ResetGPU(6); err != nil {
		t.Fatal(err)
	}
	e.monitor.ProbeOnce()
	e.waitCount("nvidia.com/gpu", 16)
}
