//go:build e2e

package e2e

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/profile"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

var (
	podsPerNode = flag.Int("dra-pods-per-node", 4, "pods per simulated node in BenchmarkScheduleDRA")
	// Where the scheduler's time goes: with -dra-profile-dir, every model's run also writes
	// kube-scheduler's and kube-controller-manager's CPU profiles (the first -dra-profile-seconds of
	// the run) and both components' /metrics before and after the run into that directory.
	profileDir     = flag.String("dra-profile-dir", "", "BenchmarkScheduleDRA: write component CPU profiles and metrics per model here")
	profileSeconds = flag.Int("dra-profile-seconds", 10, "BenchmarkScheduleDRA: length of each CPU profile")
)

// slice models: how every simulated dgx-h100 node's GPUs are published, and what one pod asks.
var draModels = []struct {
	name, profile string
	claim         resourcev1.ExactDeviceRequest
}{
	{"whole", "defaults: {owner: dra, mode: whole}", resourcev1.ExactDeviceRequest{DeviceClassName: "gpu.tessera.dev"}},
	{"dynamic-mig", "defaults: {owner: dra, mode: mig-dynamic}", resourcev1.ExactDeviceRequest{DeviceClassName: "mig.tessera.dev",
		Selectors: []resourcev1.DeviceSelector{{CEL: &resourcev1.CELDeviceSelector{Expression: `device.attributes["gpu.tessera.dev"].profile == "1g.10gb"`}}}}},
	{"shared", "defaults: {owner: dra, mode: shared}", resourcev1.ExactDeviceRequest{DeviceClassName: "shared.gpu.tessera.dev",
		Capacity: &resourcev1.CapacityRequirements{Requests: map[resourcev1.QualifiedName]resource.Quantity{"memory": resource.MustParse("10Gi")}}}},
}

// BenchmarkScheduleDRA measures how fast the real kube-scheduler places pods whose claims our
// ResourceSlices serve, for each slice model, beside the same pods asking for a plain extended
// resource (nvidia.com/gpu, the device-plugin way) on the same nodes in the same run:
//
//	go test -tags e2e -run '^$' -bench ScheduleDRA -benchtime 1x -timeout 60m ./tests/e2e/ -nodes 100
//
// The slices are the driver's own (dra.Build on a simulated dgx-h100, per node), created through the
// API server as the driver's helper would; no kubelet runs on these nodes.
func BenchmarkScheduleDRA(b *testing.B) {
	c := framework.Cluster(b)
	ctx := framework.Context(b, 55*time.Minute)
	createShippedClasses(b, ctx, c)
	nodes := make([]string, *numNodes)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("dra-bench-%04d", i)
	}
	for _, n := range nodes {
		node := harness.SimulatedNode(n)
		node.Status.Capacity["nvidia.com/gpu"] = resource.MustParse("8")
		node.Status.Allocatable["nvidia.com/gpu"] = resource.MustParse("8")
		if err := c.AddSimulatedNode(ctx, node); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { _ = c.DeleteNodes(context.Background(), nodes...) })
	pods := *podsPerNode * len(nodes)
	run := func(model string, mk func(ns, name string) *corev1.Pod) *result {
		ns := framework.Namespace(b)
		if err := c.CreateNamespace(ctx, ns+"-"+model); err != nil {
			b.Fatal(err)
		}
		ns += "-" + model
		if model != "extended" {
			for _, m := range draModels {
				if m.name == model {
					tmpl := &resourcev1.ResourceClaimTemplate{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gpu"},
						Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
							Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: m.claim.DeepCopy()}}}}}}
					if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
						b.Fatal(err)
					}
				}
			}
		}
		stopProfiles := profileComponents(b, ctx, c, model)
		cpu0 := sampleCPU(c)
		res, err := schedulePods(ctx, c, ns, pods, mk)
		cpu := sampleCPU(c).since(cpu0)
		stopProfiles()
		if err != nil {
			b.Fatalf("%s: %v", model, err)
		}
		b.Logf("%s: CPU per pod: %s", model, cpu.perPod(pods))
		zero := int64(0)
		_ = c.Client().CoreV1().Pods(ns).DeleteCollection(context.Background(), metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
		_ = c.DeleteNamespace(context.Background(), ns)
		return res
	}
	extended := func(ns, name string) *corev1.Pod {
		p := benchPod(ns, name)
		p.Spec.Containers[0].Resources.Limits = corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}
		return p
	}
	withClaim := func(ns, name string) *corev1.Pod {
		p := benchPod(ns, name)
		p.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "gpu", ResourceClaimTemplateName: ptr.To("gpu")}}
		p.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "gpu"}}
		return p
	}
	for iter := 0; iter < b.N; iter++ {
		base := run("extended", extended)
		b.Logf("baseline, extended resource nvidia.com/gpu: %d pods on %d nodes: %.1f pods/s, create->bind p50 %s p99 %s",
			pods, len(nodes), base.podsPerSecond, base.p50, base.p99)
		for _, m := range draModels {
			slices, devices := publishModel(b, ctx, c, m.profile, nodes)
			res := run(m.name, withClaim)
			deleteSlices(ctx, c)
			b.Logf("DRA %-12s %d pods on %d nodes (%d slices, %d devices): %.1f pods/s = %.2fx the extended resource; create->bind p50 %s p99 %s",
				m.name+":", pods, len(nodes), slices, devices, res.podsPerSecond, res.podsPerSecond/base.podsPerSecond, res.p50, res.p99)
			b.ReportMetric(res.podsPerSecond, m.name+"-pods/s")
			b.ReportMetric(res.podsPerSecond/base.podsPerSecond, m.name+"-ratio")
		}
		b.ReportMetric(base.podsPerSecond, "extended-pods/s")
	}
}

// publishModel builds the driver's slices for a simulated dgx-h100 under the profile and creates them
// for every node (its own pool); it returns the number of slices and devices created.
func publishModel(b *testing.B, ctx context.Context, c *harness.Cluster, spec string, nodes []string) (int, int) {
	b.Helper()
	o := backend.Options{NVML: "sim:dgx-h100", SimStateDir: b.TempDir()}
	lib, _, err := o.Open()
	if err != nil {
		b.Fatal(err)
	}
	defer lib.Shutdown()
	doc := "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  " + spec + "\n"
	p, err := api.ParseProfile([]byte(doc))
	if err != nil {
		b.Fatal(err)
	}
	if strings.Contains(spec, "mig-dynamic") {
		for i := range 8 {
			if _, err := lib.SetMigMode(i, true); err != nil {
				b.Fatal(err)
			}
		}
	}
	gpus, err := profile.GPUsFromNVML(ctx, lib)
	if err != nil {
		b.Fatal(err)
	}
	r, err := api.Resolve(p.Profile, gpus)
	if err != nil {
		b.Fatal(err)
	}
	snap, err := inventory.New(lib).Snapshot(ctx)
	if err != nil {
		b.Fatal(err)
	}
	inv := dra.Build(dra.BuildInput{Pool: "x", Snapshot: snap, Resolution: r, Profiles: lib.MigProfiles,
		Instances: func(int) ([]nvmlib.GpuInstance, error) { return nil, nil }})
	pool := inv.Slices(dra.PublishOptions{NoPartitionType: true}).Pools["x"]
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	errs := make(chan error, 1)
	devices := 0
	for _, s := range pool.Slices {
		devices += len(s.Devices)
	}
	for _, n := range nodes {
		for i, s := range pool.Slices {
			sl := &resourcev1.ResourceSlice{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", n, i)},
				Spec: resourcev1.ResourceSliceSpec{Driver: dra.DriverName, NodeName: ptr.To(n),
					Pool:    resourcev1.ResourcePool{Name: n, Generation: 1, ResourceSliceCount: int64(len(pool.Slices))},
					Devices: s.Devices, SharedCounters: s.SharedCounters}}
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if _, err := c.Client().ResourceV1().ResourceSlices().Create(ctx, sl, metav1.CreateOptions{}); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}()
		}
	}
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	return len(pool.Slices) * len(nodes), devices * len(nodes)
}

func deleteSlices(ctx context.Context, c *harness.Cluster) {
	_ = c.Client().ResourceV1().ResourceSlices().DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
}

// profileComponents starts kube-scheduler's and kube-controller-manager's CPU profiles and saves
// their /metrics when -dra-profile-dir is set; the returned func, called when the run ends, saves
// the metrics again and waits for the profiles.
func profileComponents(b *testing.B, ctx context.Context, c *harness.Cluster, model string) func() {
	b.Helper()
	if *profileDir == "" {
		return func() {}
	}
	if err := os.MkdirAll(*profileDir, 0o755); err != nil {
		b.Fatal(err)
	}
	get := func(port int, path, file string) {
		cfg := c.RESTConfig()
		cfg.Host = fmt.Sprintf("https://127.0.0.1:%d", port)
		cfg.TLSClientConfig = rest.TLSClientConfig{Insecure: true} // self-signed serving certs on loopback
		hc, err := rest.HTTPClientFor(cfg)
		if err != nil {
			b.Logf("profile %s: %v", file, err)
			return
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Host+path, nil)
		resp, err := hc.Do(req)
		if err != nil {
			b.Logf("profile %s: %v", file, err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(filepath.Join(*profileDir, file))
		if err != nil {
			b.Logf("profile %s: %v", file, err)
			return
		}
		defer f.Close()
		_, _ = io.Copy(f, resp.Body)
	}
	comps := []struct {
		name string
		port int
	}{{"scheduler", c.Ports.Scheduler}, {"kcm", c.Ports.ControllerManager}}
	for _, k := range comps {
		get(k.port, "/metrics", fmt.Sprintf("%s-%s-metrics-before.txt", model, k.name))
	}
	var wg sync.WaitGroup
	for _, k := range comps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			get(k.port, fmt.Sprintf("/debug/pprof/profile?seconds=%d", *profileSeconds), fmt.Sprintf("%s-%s.pprof", model, k.name))
		}()
	}
	return func() {
		for _, k := range comps {
			get(k.port, "/metrics", fmt.Sprintf("%s-%s-metrics-after.txt", model, k.name))
		}
		wg.Wait()
	}
}

// cpuSample is the CPU time (seconds) each process of interest and the whole machine had used,
// and when: what one run costs per pod or claim, and whether other work shared the machine.
type cpuSample struct {
	at      time.Time
	wall    time.Duration // in a difference: the time between the samples
	order   []string
	procs   map[string]float64
	machine float64
}

var cpuComponents = []string{harness.APIServer, harness.Etcd, harness.Scheduler, harness.ControllerManager}

// sampleCPU samples the cluster's control plane (cpuComponents).
func sampleCPU(c *harness.Cluster) cpuSample { return sampleProcs(cpuComponents, controlPlanePIDs(c)) }

// controlPlanePIDs are the PIDs of the cluster's processes (control plane, kubelet, containerd), by
// component.
func controlPlanePIDs(c *harness.Cluster) map[string]int {
	pids := map[string]int{}
	for _, name := range append(cpuComponents, harness.Kubelet, harness.Containerd) {
		data, err := os.ReadFile(filepath.Join(c.StateDir, "pids", name+".pid"))
		if err != nil {
			continue
		}
		if f := strings.Fields(string(data)); len(f) > 0 {
			pids[name], _ = strconv.Atoi(f[0])
		}
	}
	return pids
}

// sampleProcs samples the named processes (name -> PID), reported in order.
func sampleProcs(order []string, pids map[string]int) cpuSample {
	s := cpuSample{at: time.Now(), order: order, procs: map[string]float64{}}
	const hz = 100 // USER_HZ
	for _, name := range order {
		pid, ok := pids[name]
		if !ok {
			continue
		}
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command (which may hold spaces): state is the first, utime the 12th.
		rest := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(rest) < 13 {
			continue
		}
		u, _ := strconv.ParseFloat(rest[11], 64)
		k, _ := strconv.ParseFloat(rest[12], 64)
		s.procs[name] = (u + k) / hz
	}
	if data, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(data), "\n")
		f := strings.Fields(line)
		for i, v := range f[1:] {
			n, _ := strconv.ParseFloat(v, 64)
			if i < 8 && i != 3 && i != 4 { // all but idle and iowait (guest time is in user already)
				s.machine += n / hz
			}
		}
	}
	return s
}

func (s cpuSample) since(t cpuSample) cpuSample {
	d := cpuSample{wall: s.at.Sub(t.at), order: s.order, procs: map[string]float64{}, machine: s.machine - t.machine}
	for k, v := range s.procs {
		d.procs[k] = v - t.procs[k]
	}
	return d
}

// perPod formats a difference of samples: each process's CPU milliseconds per pod (or claim), their
// sum, and the machine's busy cores over the run against the processes' (the rest is other work).
func (s cpuSample) perPod(pods int) string {
	var b strings.Builder
	sum := 0.0
	for _, name := range s.order {
		fmt.Fprintf(&b, "%s %.2f ms, ", name, 1000*s.procs[name]/float64(pods))
		sum += s.procs[name]
	}
	secs := s.wall.Seconds()
	fmt.Fprintf(&b, "together %.2f ms; machine busy %.2f cores, these processes %.2f cores", 1000*sum/float64(pods), s.machine/secs, sum/secs)
	return b.String()
}
