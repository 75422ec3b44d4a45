package telemetry_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/telemetry"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type fakeSource struct {
	owned    []int
	holdings []telemetry.Holding
}

func (f *fakeSource) Owned() []int { return f.owned }
func (f *fakeSource) Holdings(context.Context) ([]telemetry.Holding, error) {
	return f.holdings, nil
}

type fakePods map[string]telemetry.PodInfo // by UID

func (f fakePods) ByUID(uid string) (telemetry.PodInfo, bool) { p, ok := f[uid]; return p, ok }
func (f fakePods) Get(ns, name string) (telemetry.PodInfo, bool) {
	for _, p := range f {
		if p.Namespace == ns && p.Name == name {
			return p, true
		}
	}
	return telemetry.PodInfo{}, false
}

type events struct {
	mu  sync.Mutex
	all []string
}

func (e *events) PodEvent(p telemetry.PodInfo, typ, reason, msg string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.all = append(e.all, fmt.Sprintf("%s/%s %s %s %s", p.Namespace, p.Name, typ, reason, msg))
}

func (e *events) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.all...)
}

const (
	uidA = "11111111-2222-3333-4444-555555555555"
	uidB = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
)

// env is a simulated dgx-h100 whose GPU 1 is cut into 3g.40gb devices, a fake procfs with two pods'
// processes and a sampler over GPUs 0 and 1.
type env struct {
	proc   string
	node   *sim.Node
	lib    nvmlib.Interface
	clock  *fakeClock
	src    *fakeSource
	pods   fakePods
	events *events
	s      *telemetry.Sampler
	reg    *prometheus.Registry
	mig    nvmlib.MigDevice
}

func writeCgroup(t testing.TB, proc string, pid int, content string) {
	t.Helper()
	dir := filepath.Join(proc, fmt.Sprint(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func newEnv(t testing.TB, window time.Duration) *env {
	t.Helper()
	spec, _ := sim.BuiltinNode("dgx-h100")
	node, err := sim.Open(spec, filepath.Join(t.TempDir(), "sim"))
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	if _, err := lib.SetMigMode(1, true); err != nil {
		t.Fatal(err)
	}
	profs, _ := lib.MigProfiles(1)
	for _, p := range profs {
		if p.Name != "3g.40gb" {
			continue
		}
		for _, start := range []int{0, 4} {
			gi, err := lib.CreateGpuInstance(1, p.ID, nvmlib.Placement{Start: start, Size: 4})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := lib.CreateComputeInstance(1, gi, p.ComputeSlices); err != nil {
				t.Fatal(err)
			}
		}
	}
	migs, err := lib.MigDevices(1)
	if err != nil || len(migs) != 2 {
		t.Fatalf("MIG devices: %v %v", migs, err)
	}
	proc := t.TempDir()
	// Pod A (cgroupfs driver, cgroup v1) runs two processes on GPU 0; pod B (systemd driver, v2)
	// one on GPU 1's first MIG device and one on its second; PID 300 is no pod's.
	writeCgroup(t, proc, 100, "12:memory:/kubepods/besteffort/pod"+uidA+"/0123abcd\n11:cpu,cpuacct:/kubepods/besteffort/pod"+uidA+"/0123abcd\n")
	writeCgroup(t, proc, 101, "12:memory:/kubepods/besteffort/pod"+uidA+"/4567ef01\n")
	writeCgroup(t, proc, 200, "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"+strings.ReplaceAll(uidB, "-", "_")+".slice/cri-containerd-89ab.scope\n")
	writeCgroup(t, proc, 300, "0::/system.slice/sshd.service\n")
	writeCgroup(t, proc, 201, "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"+strings.ReplaceAll(uidB, "-", "_")+".slice/cri-containerd-cdef.scope\n")
	for _, p := range []struct {
		gpu, pid int
		mem      uint64
		gi, ci   int
	}{{0, 100, 1000, -1, -1}, {0, 101, 500, -1, -1}, {0, 300, 42, -1, -1}, {1, 200, 2048, migs[0].GI, migs[0].CI}, {1, 201, 100, migs[1].GI, migs[1].CI}} {
		if err := node.AddProcess(p.gpu, p.pid, p.mem, p.gi, p.ci); err != nil {
			t.Fatal(err)
		}
	}
	e := &env{proc: proc, node: node, lib: lib, clock: &fakeClock{t: time.Unix(1_800_000_000, 0)}, events: &events{}, mig: migs[0],
		pods: fakePods{uidA: {UID: uidA, Namespace: "ml", Name: "trainer"}, uidB: {UID: uidB, Namespace: "ml", Name: "server"}}}
	e.src = &fakeSource{owned: []int{1, 0}, holdings: []telemetry.Holding{
		{GPU: 0, Device: "GPU-0", Resource: "nvidia.com/gpu", Kind: telemetry.KindGPU, GI: -1, Exclusive: true, Healthy: true, Namespace: "ml", Pod: "trainer"},
		{GPU: 1, Device: migs[0].UUID, Resource: "nvidia.com/mig-3g.40gb", Kind: telemetry.KindMIG, GI: migs[0].GI, Healthy: true,
			MemoryLimitBytes: int64(migs[0].MemoryMiB) << 20, Namespace: "ml", Pod: "server"},
		{GPU: 1, Device: "free-one", Resource: "nvidia.com/mig-3g.40gb", Kind: telemetry.KindMIG, GI: 99, Healthy: false},
	}}
	e.s, err = telemetry.New(telemetry.Options{Lib: lib, Component: "device-plugin", Source: e.src, Pods: e.pods, Events: e.events,
		ProcRoot: proc, IdleWindow: window, IdleUtilizationPercent: 5, Clock: e.clock,
		LastXIDs: func() map[int]uint64 { return map[int]uint64{1: 48} }})
	if err != nil {
		t.Fatal(err)
	}
	e.reg = prometheus.NewPedanticRegistry()
	if err := e.reg.Register(e.s); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) set(t *testing.T, gpu, util, powerW int) {
	t.Helper()
	mw := powerW * 1000
	if err := e.node.Set(gpu, sim.Settings{UtilizationGPU: &util, PowerMilliwatts: &mw}); err != nil {
		t.Fatal(err)
	}
}

// scrape gathers the registry into "name{label=value,...}" → value, labels sorted.
func (e *env) scrape(t *testing.T) map[string]float64 {
	t.Helper()
	fams, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(ls)
			out[f.GetName()+"{"+strings.Join(ls, ",")+"}"] = value(m)
		}
	}
	return out
}

func value(m *dto.Metric) float64 {
	switch {
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	}
	return 0
}

// find returns the value of the one series of name whose labels include every want pair.
func find(t *testing.T, got map[string]float64, name string, want ...string) float64 {
	t.Helper()
	var hits []string
	for k := range got {
		if !strings.HasPrefix(k, name+"{") {
			continue
		}
		ok := true
		for _, w := range want {
			if !strings.Contains(k, w+",") && !strings.Contains(k, w+"}") {
				ok = false
			}
		}
		if ok {
			hits = append(hits, k)
		}
	}
	if len(hits) != 1 {
		t.Fatalf("%s %v: %d series match: %v", name, want, len(hits), hits)
	}
	return got[hits[0]]
}

// A set reading comes back in the scrape; processes are attributed to their pods by cgroup (both
// cgroup drivers), a process of no pod to none; the exclusive holder gets the GPU's utilization.
func TestReadingsAndAttribution(t *testing.T) {
	e := newEnv(t, 30*time.Minute)
	e.set(t, 0, 73, 412)
	e.s.Sample(context.Background())
	got := e.scrape(t)
	if v := find(t, got, "tessera_gpu_utilization_percent", "gpu=0", "component=device-plugin"); v != 73 {
		t.Errorf("GPU 0 utilization %v, want 73", v)
	}
	if v := find(t, got, "tessera_gpu_power_watts", "gpu=0"); v != 412 {
		t.Errorf("GPU 0 power %v W, want 412", v)
	}
	if v := find(t, got, "tessera_gpu_last_xid", "gpu=1"); v != 48 {
		t.Errorf("GPU 1's last XID %v, want 48", v)
	}
	if v := find(t, got, "tessera_gpu_last_xid", "gpu=0"); v != 0 {
		t.Errorf("GPU 0's last XID %v, want 0", v)
	}
	if v := find(t, got, "tessera_gpu_readable", "gpu=1"); v != 1 {
		t.Errorf("GPU 1 unreadable")
	}
	for k := range got {
		if strings.Contains(k, "gpu=2") {
			t.Errorf("a GPU the front end does not own is exported: %s", k)
		}
	}
	if v := find(t, got, "tessera_pod_gpu_memory_used_bytes", "gpu=0", "pod=trainer", "pod_uid="+uidA); v != 1500<<20 {
		t.Errorf("trainer's memory on GPU 0: %v, want %v", v, 1500<<20)
	}
	if v := find(t, got, "tessera_pod_gpu_processes", "gpu=0", "pod=trainer"); v != 2 {
		t.Errorf("trainer's processes: %v", v)
	}
	if v := find(t, got, "tessera_pod_gpu_memory_used_bytes", "gpu=1", "namespace=ml", "pod=server", "pod_uid="+uidB); v != 2148<<20 {
		t.Errorf("server's memory on GPU 1 (systemd cgroup): %v", v)
	}
	for k := range got {
		if strings.HasPrefix(k, "tessera_pod_gpu_memory_used_bytes") && strings.Contains(k, "gpu=0") && !strings.Contains(k, "pod=trainer") {
			t.Errorf("a process of no pod was attributed: %s", k)
		}
	}
	if v := find(t, got, "tessera_pod_gpu_utilization_percent", "gpu=0", "pod=trainer"); v != 73 {
		t.Errorf("exclusive holder's utilization %v, want 73", v)
	}
	for k := range got {
		if strings.HasPrefix(k, "tessera_pod_gpu_utilization_percent") && strings.Contains(k, "pod=server") {
			t.Errorf("utilization exported for a MIG holder, which NVML cannot give: %s", k)
		}
	}
	if v := find(t, got, "tessera_device_allocated", "device="+e.mig.UUID, "pod=server"); v != 1 {
		t.Errorf("MIG device not allocated: %v", v)
	}
	if v := find(t, got, "tessera_device_allocated", "device=free-one"); v != 0 {
		t.Errorf("free device allocated: %v", v)
	}
	if v := find(t, got, "tessera_device_healthy", "device=free-one"); v != 0 {
		t.Errorf("unhealthy device reported healthy")
	}
	if v := find(t, got, "tessera_device_memory_limit_bytes", "device="+e.mig.UUID); v != float64(e.mig.MemoryMiB<<20) {
		t.Errorf("MIG memory limit %v", v)
	}
	if v := find(t, got, "tessera_device_memory_limit_bytes", "device=GPU-0"); v != float64(e.gpuMemMiB(t, 0))*(1<<20) {
		t.Errorf("whole GPU's memory limit %v, want the GPU's memory", v)
	}
	if v := find(t, got, "tessera_telemetry_samples_total"); v != 1 {
		t.Errorf("samples %v", v)
	}
}

// Idle detection with a fake clock: a whole-GPU holder under the threshold for the window is
// reported once (Event and metric); activity resets it; the opt-out annotation silences it; a MIG
// holder counts as busy while a process runs on its instance.
func TestIdleDetection(t *testing.T) {
	e := newEnv(t, 30*time.Minute)
	ctx := context.Background()
	var changes []string
	e.s, _ = telemetry.New(telemetry.Options{Lib: e.lib, Component: "device-plugin", Source: e.src, Pods: e.pods, Events: e.events,
		ProcRoot: e.proc, IdleWindow: 30 * time.Minute, IdleUtilizationPercent: 5, Clock: e.clock,
		OnIdleChange: func(h telemetry.Holding, idle bool, msg string) {
			changes = append(changes, fmt.Sprintf("%s %v %v", h.Pod, idle, msg != ""))
		}})
	e.reg = prometheus.NewPedanticRegistry()
	e.reg.MustRegister(e.s)
	e.set(t, 0, 2, 70)
	e.s.Sample(ctx)
	e.clock.Add(29 * time.Minute)
	e.s.Sample(ctx)
	if n := len(e.events.list()); n != 0 {
		t.Fatalf("reported before the window: %v", e.events.list())
	}
	if d := e.s.IdleFor("GPU-0", "ml", "trainer", ""); d != 29*time.Minute {
		t.Errorf("idle for %s, want 29m", d)
	}
	e.clock.Add(time.Minute)
	e.s.Sample(ctx)
	evs := e.events.list()
	if len(evs) != 1 || !strings.Contains(evs[0], "ml/trainer Warning GPUIdle") || !strings.Contains(evs[0], "30m0s") {
		t.Fatalf("events: %v", evs)
	}
	got := e.scrape(t)
	if v := find(t, got, "tessera_device_idle", "device=GPU-0"); v != 1 {
		t.Errorf("tessera_device_idle %v, want 1", v)
	}
	if v := find(t, got, "tessera_device_idle_seconds", "device=GPU-0"); v != 1800 {
		t.Errorf("idle seconds %v, want 1800", v)
	}
	// The MIG holder has a process on its instance: busy, never idle.
	if d := e.s.IdleFor(e.mig.UUID, "ml", "server", ""); d != 0 {
		t.Errorf("MIG holder with a process idle for %s", d)
	}
	// Reported once per idle period.
	e.clock.Add(10 * time.Minute)
	e.s.Sample(ctx)
	if n := len(e.events.list()); n != 1 {
		t.Errorf("reported again in the same idle period: %v", e.events.list())
	}
	// Work resets it.
	e.set(t, 0, 60, 300)
	e.s.Sample(ctx)
	if want := []string{"trainer true true", "trainer false false"}; !slices.Equal(changes, want) {
		t.Errorf("idle changes %q, want %q", changes, want)
	}
	if d := e.s.IdleFor("GPU-0", "ml", "trainer", ""); d != 0 {
		t.Errorf("busy holder idle for %s", d)
	}
	if v := find(t, e.scrape(t), "tessera_device_idle", "device=GPU-0"); v != 0 {
		t.Errorf("tessera_device_idle %v after work, want 0", v)
	}
	// The MIG process ends: idle from then on, although the other MIG device of its GPU is busy.
	if err := e.node.EndProcesses(1, 200); err != nil {
		t.Fatal(err)
	}
	e.s.Sample(ctx)
	e.clock.Add(31 * time.Minute)
	e.s.Sample(ctx)
	evs = e.events.list()
	if len(evs) != 2 || !strings.Contains(evs[1], "ml/server") || !strings.Contains(evs[1], "no process on it") {
		t.Fatalf("events after the MIG process ended: %v", evs)
	}
}

func TestIdleOptOutAndPowerThreshold(t *testing.T) {
	e := newEnv(t, time.Minute)
	ctx := context.Background()
	p := e.pods[uidA]
	p.Annotations = map[string]string{telemetry.AnnotationIdleCheck: "off"}
	e.pods[uidA] = p
	e.set(t, 0, 0, 60)
	e.s.Sample(ctx)
	e.clock.Add(2 * time.Minute)
	e.s.Sample(ctx)
	for _, ev := range e.events.list() {
		if strings.Contains(ev, "trainer") {
			t.Errorf("opted-out pod reported: %s", ev)
		}
	}

	// Power above the threshold keeps a GPU busy at 0 % utilization.
	e2 := newEnv(t, time.Minute)
	s, err := telemetry.New(telemetry.Options{Lib: e2.lib, Component: "dra", Source: e2.src, Pods: e2.pods, Events: e2.events,
		IdleWindow: time.Minute, IdleUtilizationPercent: 5, IdlePowerWatts: 100, Clock: e2.clock, ProcRoot: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	e2.set(t, 0, 0, 250)
	s.Sample(ctx)
	e2.clock.Add(5 * time.Minute)
	s.Sample(ctx)
	if d := s.IdleFor("GPU-0", "ml", "trainer", ""); d != 0 {
		t.Errorf("GPU drawing 250 W counted idle for %s", d)
	}
	e2.set(t, 0, 0, 60)
	s.Sample(ctx)
	e2.clock.Add(2 * time.Minute)
	s.Sample(ctx)
	if d := s.IdleFor("GPU-0", "ml", "trainer", ""); d != 2*time.Minute {
		t.Errorf("GPU at 60 W idle for %s, want 2m", d)
	}
}

func TestPodUIDOfCgroup(t *testing.T) {
	for in, want := range map[string]string{
		"12:memory:/kubepods/burstable/pod" + uidA + "/abc\n":                                                      uidA,
		"0::/kubepods.slice/kubepods-pod" + strings.ReplaceAll(uidB, "-", "_") + ".slice/cri-containerd-1.scope\n": uidB,
		"0::/user.slice/user-0.slice/session-1.scope\n":                                                            "",
		"garbage without colons\n":                                                                                 "",
		"":                                                                                                         "",
	} {
		if got := telemetry.PodUIDOfCgroup([]byte(in)); got != want {
			t.Errorf("%q: got %q, want %q", in, got, want)
		}
	}
}

// A time-sliced GPU shared by two pods: NVML's process samples split its utilization by pod, and
// the pod whose processes do nothing is reported idle although the GPU as a whole is busy.
func TestSharedGPUSplitByProcess(t *testing.T) {
	e := newEnv(t, 10*time.Minute)
	ctx := context.Background()
	proc := t.TempDir()
	writeCgroup(t, proc, 500, "12:memory:/kubepods/besteffort/pod"+uidA+"/c1\n")
	writeCgroup(t, proc, 600, "0::/kubepods.slice/kubepods-pod"+strings.ReplaceAll(uidB, "-", "_")+".slice/c2.scope\n")
	if err := e.node.AddProcess(2, 500, 4096, -1, -1); err != nil {
		t.Fatal(err)
	}
	if err := e.node.AddProcess(2, 600, 1024, -1, -1); err != nil {
		t.Fatal(err)
	}
	if err := e.node.SetProcessUtilization(2, 500, 37); err != nil {
		t.Fatal(err)
	}
	e.set(t, 2, 40, 300)
	src := &fakeSource{owned: []int{2}, holdings: []telemetry.Holding{
		{GPU: 2, Device: "GPU-2::0", Resource: "nvidia.com/gpu.shared", Kind: telemetry.KindReplica, GI: -1, Healthy: true, Namespace: "ml", Pod: "trainer"},
		{GPU: 2, Device: "GPU-2::1", Resource: "nvidia.com/gpu.shared", Kind: telemetry.KindReplica, GI: -1, Healthy: true, Namespace: "ml", Pod: "server"},
	}}
	s, err := telemetry.New(telemetry.Options{Lib: e.lib, Component: "device-plugin", Source: src, Pods: e.pods, Events: e.events,
		ProcRoot: proc, IdleWindow: 10 * time.Minute, IdleUtilizationPercent: 5, Clock: e.clock})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s)
	e.reg = reg
	s.Sample(ctx)
	got := e.scrape(t)
	if v := find(t, got, "tessera_pod_gpu_utilization_percent", "gpu=2", "pod=trainer"); v != 37 {
		t.Errorf("trainer's share of GPU 2: %v, want 37", v)
	}
	if v := find(t, got, "tessera_pod_gpu_utilization_percent", "gpu=2", "pod=server"); v != 0 {
		t.Errorf("server's share of GPU 2: %v, want 0", v)
	}
	e.clock.Add(11 * time.Minute)
	s.Sample(ctx)
	if d := s.IdleFor("GPU-2::0", "ml", "trainer", ""); d != 0 {
		t.Errorf("the busy replica holder idle for %s", d)
	}
	if d := s.IdleFor("GPU-2::1", "ml", "server", ""); d != 11*time.Minute {
		t.Errorf("the idle replica holder idle for %s, want 11m", d)
	}
	evs := e.events.list()
	if len(evs) != 1 || !strings.Contains(evs[0], "ml/server") {
		t.Errorf("events: %v", evs)
	}
}

func (e *env) gpuMemMiB(t *testing.T, gpu int) uint64 {
	t.Helper()
	tm, err := e.lib.Telemetry(gpu)
	if err != nil {
		t.Fatal(err)
	}
	return tm.MemoryTotalMiB
}

// A GPU that falls off the bus is reported unreadable, its holder is never idle, and the failed NVML
// calls are counted by call and code.
func TestLostGPU(t *testing.T) {
	e := newEnv(t, time.Minute)
	ctx := context.Background()
	e.set(t, 0, 0, 50)
	if err := e.node.InjectGPULost(0); err != nil {
		t.Fatal(err)
	}
	e.s.Sample(ctx)
	e.clock.Add(2 * time.Minute)
	e.s.Sample(ctx)
	got := e.scrape(t)
	if v := find(t, got, "tessera_gpu_readable", "gpu=0"); v != 0 {
		t.Errorf("a lost GPU reported readable")
	}
	if d := e.s.IdleFor("GPU-0", "ml", "trainer", ""); d != 0 {
		t.Errorf("the holder of a lost GPU counted idle for %s", d)
	}
	lost := 0.0
	for k, v := range got {
		if strings.HasPrefix(k, "tessera_nvml_errors_total{") && strings.Contains(k, "GPU_IS_LOST") {
			lost += v
		}
	}
	if lost < 2 {
		t.Errorf("NVML errors on the lost GPU counted %v times, want at least 2 (two samples): %v", lost, got)
	}
}
