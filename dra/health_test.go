package dra

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/telemetry/startup"
)

func xidEvent(gpu int, code uint64) nvmlib.Event {
	return nvmlib.Event{Type: nvmlib.EventXID, XID: code, GPUIndex: gpu, GI: -1, CI: -1}
}

// taintsOf returns the taints of the last published slices, by device.
func taintsOf(p *memPublisher) map[string][]resourceapi.DeviceTaint {
	out := map[string][]resourceapi.DeviceTaint{}
	for _, pool := range p.last().Pools {
		for _, s := range pool.Slices {
			for _, d := range s.Devices {
				if len(d.Taints) > 0 {
					out[d.Name] = d.Taints
				}
			}
		}
	}
	return out
}

// reports collects what WatchHealthStatus sends.
type reports struct {
	mu   sync.Mutex
	last map[string]kubeletplugin.DeviceHealth
	n    int
}

func watchHealth(t *testing.T, d *Driver) *reports {
	r := &reports{last: map[string]kubeletplugin.DeviceHealth{}}
	ch := make(chan kubeletplugin.DeviceHealthReport)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.WatchHealthStatus(ctx, ch) }()
	go func() {
		for rep := range ch {
			r.mu.Lock()
			r.n++
			for _, h := range rep.Devices {
				r.last[h.DeviceName] = h
			}
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("WatchHealthStatus: %v", err)
		}
		close(ch)
	})
	return r
}

func (r *reports) health(dev string) kubeletplugin.HealthStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last[dev].Health
}

// An XID makes the device unhealthy: the kubelet hears it over WatchHealthStatus, the device gets a
// NoSchedule taint in its slice and the scheduler's allocator passes it over. When the GPU recovers
// (a reset for XID 79; a quiet period for XID 94 on one MIG device) the taint goes again.
func TestXIDTaintAndRecovery(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	applyMIG(t, lib, 2, map[string]int{"1g.10gb": 7})
	clk := clocktesting.NewFakeClock(time.Now())
	m := health.NewMonitor(lib, health.DefaultPolicy(), health.WithClock(clk), health.WithProbeInterval(time.Second))
	e := newEnv(t, lib, node, mixedProfile, WithHealth(m), WithHealthResend(20*time.Millisecond))
	r := watchHealth(t, e.d)
	poll(t, "a first health report", func() (bool, error) { return r.health("gpu-0") == kubeletplugin.HealthStatusHealthy, nil })

	// GPU 0 falls off the bus.
	if err := node.InjectXID(0, 79, -1, -1); err != nil {
		t.Fatal(err)
	}
	poll(t, "gpu-0 tainted", func() (bool, error) { return len(taintsOf(e.pub)["gpu-0"]) == 1, nil })
	taint := taintsOf(e.pub)["gpu-0"][0]
	if taint.Key != TaintKey || taint.Effect != resourceapi.DeviceTaintEffectNoSchedule || !strings.Contains(taint.Value, "xid-79") {
		t.Errorf("taint %+v", taint)
	}
	if len(taintsOf(e.pub)) != 1 {
		t.Errorf("other devices tainted too: %v", taintsOf(e.pub))
	}
	poll(t, "gpu-0 unhealthy for the kubelet", func() (bool, error) { return r.health("gpu-0") == kubeletplugin.HealthStatusUnhealthy, nil })
	if r.health("gpu-1") != kubeletplugin.HealthStatusHealthy {
		t.Error("gpu-1 reported unhealthy")
	}
	c := newCluster(t, toSlices(e.pub.last(), 1))
	if cl := c.allocate(request("gpu.tessera.dev", 2)); cl != nil {
		t.Fatalf("two whole GPUs allocated while gpu-0 is tainted: %v", devicesOf(cl))
	}

	// XID 94 on one MIG device of GPU 2: only that device.
	mig := e.d.Inventory().Devices[2] // GPU 2's first MIG device
	if err := node.InjectXID(2, 94, mig.MIG.GI, mig.MIG.CI); err != nil {
		t.Fatal(err)
	}
	poll(t, mig.Name+" tainted", func() (bool, error) { return len(taintsOf(e.pub)[mig.Name]) == 1, nil })
	if n := len(taintsOf(e.pub)); n != 2 {
		t.Errorf("%d devices tainted, want gpu-0 and %s: %v", n, mig.Name, taintsOf(e.pub))
	}

	// Probing before the reset changes nothing: XID 79 needs a reset.
	m.ProbeOnce()
	if len(taintsOf(e.pub)["gpu-0"]) != 1 {
		t.Fatal("gpu-0 untainted without a reset")
	}
	if err := node.ResetGPU(0); err != nil {
		t.Fatal(err)
	}
	m.ProbeOnce()
	poll(t, "gpu-0 untainted after the reset", func() (bool, error) { return len(taintsOf(e.pub)["gpu-0"]) == 0, nil })
	poll(t, "gpu-0 healthy for the kubelet", func() (bool, error) { return r.health("gpu-0") == kubeletplugin.HealthStatusHealthy, nil })
	if len(taintsOf(e.pub)[mig.Name]) != 1 {
		t.Fatal("the MIG device recovered before its quiet period")
	}
	clk.Step(health.DefaultQuietPeriod + time.Second)
	m.ProbeOnce()
	poll(t, "all taints gone", func() (bool, error) { return len(taintsOf(e.pub)) == 0, nil })
	c = newCluster(t, toSlices(e.pub.last(), 2))
	if cl := c.allocate(request("gpu.tessera.dev", 2)); cl == nil {
		t.Fatal("both whole GPUs should allocate after recovery")
	}
}

// NoExecute only where the profile opts in.
func TestNoExecuteWhenProfileOptsIn(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	m := health.NewMonitor(lib, health.DefaultPolicy())
	e := newEnv(t, lib, node, mixedProfile+"  health: {noExecute: true}\n", WithHealth(m))
	m.Handle(xidEvent(1, 79))
	e.d.republish(context.Background())
	if ts := taintsOf(e.pub)["gpu-1"]; len(ts) != 1 || ts[0].Effect != resourceapi.DeviceTaintEffectNoExecute {
		t.Fatalf("taints %v", ts)
	}
	// A profile with health checks off: no taints, health Unknown.
	off := *e.res
	off.Health.Disabled = true
	if err := e.d.SetResolution(context.Background(), &off); err != nil {
		t.Fatal(err)
	}
	if len(taintsOf(e.pub)) != 0 {
		t.Errorf("taints with health checks off: %v", taintsOf(e.pub))
	}
	for _, h := range e.d.healthReport().Devices {
		if h.Health != kubeletplugin.HealthStatusUnknown {
			t.Errorf("%s: %s with health checks off", h.DeviceName, h.Health)
		}
	}
}

type eventLog struct {
	mu  sync.Mutex
	got []string
}

func (e *eventLog) Event(typ, reason, msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.got = append(e.got, typ+" "+reason+": "+msg)
}

func (e *eventLog) has(reason string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, g := range e.got {
		if strings.Contains(g, " "+reason+":") {
			return true
		}
	}
	return false
}

// An API server that drops allowMultipleAllocations (DRAConsumableCapacity off) and device taints
// (DRADeviceTaints off): the driver turns time-sliced mode and taints off on its node, with Events,
// and publishes slices without them, through the real ResourceSlice controller of the helper.
func TestDroppedFieldsTurnModesOff(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	m := health.NewMonitor(lib, health.DefaultPolicy())
	m.Handle(xidEvent(0, 79)) // gpu-0 is tainted from the start
	e := newEnv(t, lib, node, mixedProfile)
	e.stop()
	strip := func(a k8stesting.Action) (bool, runtime.Object, error) {
		var s *resourceapi.ResourceSlice
		switch a := a.(type) {
		case k8stesting.CreateAction:
			s, _ = a.GetObject().(*resourceapi.ResourceSlice)
		case k8stesting.UpdateAction:
			s, _ = a.GetObject().(*resourceapi.ResourceSlice)
		}
		if s != nil {
			for i := range s.Spec.Devices {
				s.Spec.Devices[i].AllowMultipleAllocations = nil
				s.Spec.Devices[i].Taints = nil
				for k, c := range s.Spec.Devices[i].Capacity {
					c.RequestPolicy = nil
					s.Spec.Devices[i].Capacity[k] = c
				}
			}
		}
		return false, nil, nil
	}
	e.client.PrependReactor("create", "resourceslices", strip)
	// The fake API server does not implement generateName.
	var seq int
	e.client.PrependReactor("create", "resourceslices", func(a k8stesting.Action) (bool, runtime.Object, error) {
		s := a.(k8stesting.CreateAction).GetObject().(*resourceapi.ResourceSlice)
		if s.Name == "" && s.GenerateName != "" {
			seq++
			s.Name = fmt.Sprintf("%s%05d", s.GenerateName, seq)
		}
		return false, nil, nil
	})
	e.client.PrependReactor("update", "resourceslices", strip)
	events := &eventLog{}
	phases := startup.New()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := New(ctx, lib, WithNodeName(testNode), WithStateDir(e.stateDir), WithCDI(e.gen), WithBootID(node.BootID),
		WithTimeSlicer(e.slicer), WithKubeClient(e.client), WithResyncInterval(0), WithEvents(events), WithHealth(m),
		WithStartup(phases))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetResolution(ctx, e.res); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx, kubeletplugin.RegistrationService(false), kubeletplugin.DRAService(false)); err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	// Start tells the daemon's start-up record where its own time went.
	var marked []string
	for _, ph := range phases.List() {
		marked = append(marked, ph.Name)
	}
	if fmt.Sprint(marked) != "[first-publish kubelet-plugin slice-controller]" {
		t.Errorf("Start marked %v, want [first-publish kubelet-plugin slice-controller]", marked)
	}
	poll(t, "time-sliced mode and taints turned off", func() (bool, error) {
		f := d.Features()
		return f.NoTimeSliced && f.NoTaints && events.has(ReasonModeOff) && events.has(ReasonTaintsOff), nil
	})
	poll(t, "slices without the time-sliced GPUs", func() (bool, error) {
		list, err := e.client.ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		var names []string
		for _, s := range list.Items {
			for _, dev := range s.Spec.Devices {
				names = append(names, dev.Name)
			}
		}
		sort.Strings(names)
		return fmt.Sprint(names) == fmt.Sprint([]string{"gpu-0", "gpu-1"}), nil
	})
	if !events.has(ReasonGPUNotServed) {
		t.Error("no Event says the time-sliced GPUs are not published")
	}
}

func TestHealthPolicyFromProfile(t *testing.T) {
	p, err := HealthPolicy(api.HealthSettings{IgnoredXIDs: []uint64{94}, CriticalXIDs: []uint64{74}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		xid  uint64
		want health.Action
	}{{94, health.Ignore}, {74, health.UntilQuiet}, {62, health.Ignore}, {79, health.UntilReset}, {13, health.Ignore}} {
		if got := p.Classify(xidEvent(0, tc.xid)); got != tc.want {
			t.Errorf("XID %d: %s, want %s", tc.xid, got, tc.want)
		}
	}
	if _, err := HealthPolicy(api.HealthSettings{IgnoredXIDs: []uint64{79}}); err == nil {
		t.Error("ignoring XID 79 was accepted")
	}
}
