package plugin_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/plugin"
	"github.com/tessera-gpu/tessera/plugin/kubelettest"
	"github.com/tessera-gpu/tessera/profile"
)

// TestMain keeps the plugin's logs out of test and benchmark output unless TESSERA_TEST_LOGS is set.
func TestMain(m *testing.M) {
	if os.Getenv("TESSERA_TEST_LOGS") == "" {
		fs := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(fs)
		_ = fs.Set("logtostderr", "false")
		_ = fs.Set("alsologtostderr", "false")
		_ = fs.Set("stderrthreshold", "FATAL")
		klog.SetOutput(io.Discard)
	}
	os.Exit(m.Run())
}

// shortDir is a temporary directory with a short path: unix socket paths are limited to 107 bytes.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "tdp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// env is a simulated node with a kubelet stand-in.
type env struct {
	t       testing.TB
	node    *sim.Node
	lib     *countingLib
	kubelet *kubelettest.Kubelet
	dir     string
	cdi     *cdi.Generator
	mps     *mps.Manager
	monitor *health.Monitor
	pr      string
}

func newEnv(t testing.TB, nodeName string) *env {
	t.Helper()
	spec, err := sim.ParseTarget(nodeName)
	if !strings.Contains(nodeName, ":") {
		spec, err = sim.BuiltinNode(nodeName)
	}
	if err != nil {
		t.Fatal(err)
	}
	root := shortDir(t)
	node, err := sim.Open(spec, filepath.Join(root, "sim"))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Shutdown() })
	e := &env{t: t, node: node, lib: &countingLib{Interface: raw}, dir: filepath.Join(root, "dp")}
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := node.Host()
	e.cdi, err = cdi.New(cdi.WithDriverRoot(h.DriverRoot()), cdi.WithDevRoot(h.DevRoot()), cdi.WithProcRoot(h.ProcRoot()),
		cdi.WithSpecDir(filepath.Join(root, "cdi")), cdi.WithHookPath(h.ToolPath("nvidia-cdi-hook")))
	if err != nil {
		t.Fatal(err)
	}
	e.mps = mps.NewManager(e.lib, mps.WithRoot(filepath.Join(root, "mps")), mps.ForSimulatedHost(h), mps.WithTimeouts(0, 100*time.Millisecond, 0))
	t.Cleanup(func() {
		sts, _ := e.mps.List()
		for _, s := range sts {
			_ = e.mps.Stop(context.Background(), s.GPUUUID, mps.StopOptions{})
		}
	})
	e.kubelet, err = kubelettest.Start(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.kubelet.Stop)
	e.pr = filepath.Join(root, "pr", "kubelet.sock")
	if err := e.kubelet.ServePodResources(e.pr); err != nil {
		t.Fatal(err)
	}
	return e
}

// migLayout cuts GPUs into MIG devices: gpu index → profile counts.
func (e *env) migLayout(layout map[int]map[string]int) {
	e.t.Helper()
	cfg := &mig.Config{Version: "v1", MigConfigs: map[string][]mig.DeviceSpec{}}
	on := true
	for i, counts := range layout {
		cfg.MigConfigs["t"] = append(cfg.MigConfigs["t"], mig.DeviceSpec{Devices: mig.DeviceList{Indices: []int{i}}, MigEnabled: &on, MigDevices: counts})
	}
	rep, err := mig.Apply(context.Background(), e.lib, cfg, "t", mig.Options{})
	if err != nil || !rep.OK() {
		e.t.Fatalf("mig apply: %v %+v", err, rep)
	}
}

// resolve parses a profile (SharingProfile or NVIDIA config) and resolves it for the node.
func (e *env) resolve(doc string) *api.Resolution {
	e.t.Helper()
	p, err := api.ParseProfile([]byte(doc))
	if err != nil {
		e.t.Fatalf("profile: %v", err)
	}
	gpus, err := profile.GPUsFromNVML(context.Background(), e.lib)
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := api.Resolve(p.Profile, gpus)
	if err != nil {
		e.t.Fatalf("resolve: %v", err)
	}
	return r
}

// start creates a plugin with the env's CDI, MPS and PodResources, applies doc and runs it.
func (e *env) start(doc string, opts ...plugin.Option) *plugin.Plugin {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, err := plugin.NewPodResources(e.pr)
	if err != nil {
		e.t.Fatal(err)
	}
	base := []plugin.Option{plugin.WithDevicePluginDir(e.dir), plugin.WithCDI(e.cdi), plugin.WithMPS(e.mps, false, false),
		plugin.WithInUse(pr), plugin.WithIntervals(20*time.Millisecond, 50*time.Millisecond)}
	if e.monitor != nil {
		base = append(base, plugin.WithHealth(e.monitor))
	}
	p, err := plugin.New(ctx, e.lib, append(base, opts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	if doc != "" {
		if err := p.Update(ctx, e.resolve(doc)); err != nil {
			e.t.Fatalf("update: %v", err)
		}
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		<-done
		pr.Close()
	})
	return p
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitCount waits until the stand-in sees n devices of a resource, all healthy.
func (e *env) waitCount(resource string, n int) kubelettest.Snapshot {
	e.t.Helper()
	s, err := e.kubelet.WaitForResource(ctxT(e.t, 10*time.Second), resource, func(s kubelettest.Snapshot) bool {
		return len(s.Devices) == n && len(s.Healthy()) == n
	})
	if err != nil {
		e.t.Fatalf("want %d healthy %s: %v", n, resource, err)
	}
	return s
}

// waitResources waits until exactly these resources are connected with these device counts.
func (e *env) waitResources(want map[string]int) {
	e.t.Helper()
	var got map[string][]string
	err := e.kubelet.WaitFor(ctxT(e.t, 10*time.Second), func(k *kubelettest.Kubelet) bool {
		got = k.Connected()
		if len(got) != len(want) {
			return false
		}
		for r, n := range want {
			if len(got[r]) != n {
				return false
			}
		}
		return true
	})
	if err != nil {
		counts := map[string]int{}
		for r, ids := range got {
			counts[r] = len(ids)
		}
		e.t.Fatalf("resources: got %v, want %v", counts, want)
	}
}

func (e *env) uuids() []string {
	e.t.Helper()
	n, _ := e.lib.DeviceCount()
	var out []string
	for i := range n {
		g, err := e.lib.GPU(i)
		if err != nil {
			e.t.Fatal(err)
		}
		out = append(out, g.UUID)
	}
	return out
}

func replicaIDs(uuids []string, n int) []string {
	var out []string
	for _, u := range uuids {
		for i := range n {
			out = append(out, fmt.Sprintf("%s::%d", u, i))
		}
	}
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// countingLib counts NVML calls, to show that a path makes none.
type countingLib struct {
	nvmlib.Interface
	calls atomic.Int64
	mu    sync.Mutex
	names []string
}

func (c *countingLib) count(name string) {
	c.calls.Add(1)
	c.mu.Lock()
	c.names = append(c.names, name)
	c.mu.Unlock()
}

func (c *countingLib) Calls() (int64, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls.Load(), strings.Join(c.names, ",")
}

func (c *countingLib) System() (nvmlib.SystemInfo, error) {
	c.count("System")
	return c.Interface.System()
}
func (c *countingLib) DeviceCount() (int, error) {
	c.count("DeviceCount")
	return c.Interface.DeviceCount()
}
func (c *countingLib) GPU(i int) (nvmlib.GPU, error) { c.count("GPU"); return c.Interface.GPU(i) }
func (c *countingLib) NVLinkPeers(i int) ([]int, error) {
	c.count("NVLinkPeers")
	return c.Interface.NVLinkPeers(i)
}
func (c *countingLib) MigProfiles(i int) ([]nvmlib.MigProfile, error) {
	c.count("MigProfiles")
	return c.Interface.MigProfiles(i)
}
func (c *countingLib) GpuInstances(i int) ([]nvmlib.GpuInstance, error) {
	c.count("GpuInstances")
	return c.Interface.GpuInstances(i)
}
func (c *countingLib) MigDevices(i int) ([]nvmlib.MigDevice, error) {
	c.count("MigDevices")
	return c.Interface.MigDevices(i)
}
func (c *countingLib) SetComputeMode(i int, m nvmlib.ComputeMode) error {
	c.count("SetComputeMode")
	return c.Interface.SetComputeMode(i, m)
}
func (c *countingLib) Telemetry(i int) (nvmlib.Telemetry, error) {
	c.count("Telemetry")
	return c.Interface.Telemetry(i)
}
func (c *countingLib) ECCErrors(i int) (nvmlib.ECCCounts, error) {
	c.count("ECCErrors")
	return c.Interface.ECCErrors(i)
}
func (c *countingLib) Processes(i int) ([]nvmlib.Process, error) {
	c.count("Processes")
	return c.Interface.Processes(i)
}
