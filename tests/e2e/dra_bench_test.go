//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"

	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// latencies summarises a set of durations.
type latencies []time.Duration

func (l latencies) pct(p float64) time.Duration {
	if len(l) == 0 {
		return 0
	}
	s := slices.Clone(l)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

// Measures the driver on the real API server, with a kubelet-like gRPC client on its socket, against
// the bare claim GET on the same API server in the same run: Prepare and Unprepare p50/p99 serially
// and with 8 parallel callers, claims per second, and start to first slice. It asserts correctness
// only (every call succeeds); the figures are logged. The node is a simulated dgx-h100 cut into
// 56 1g.10gb MIG devices, one per claim.
func TestDRADriverBenchmark(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 10*time.Minute)

	// Start to first slice: three cold starts (no slices of the driver in the API server).
	d := startDRADriverWith(t, ctx, c, "all-1g", 56)
	var firsts latencies
	for range 3 {
		d.hp.Stop(10 * time.Second)
		deleteDriverSlices(t, c)
		w, err := c.Client().ResourceV1().ResourceSlices().Watch(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		if err := d.hp.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		for ev := range w.ResultChan() {
			if ev.Type == watch.Added {
				firsts = append(firsts, time.Since(t0))
				break
			}
		}
		w.Stop()
	}
	d.waitSlices(t, ctx, c, 56)
	waitPluginSocket(t, ctx, c)

	// Claims allocated as the scheduler would (status.allocation), one per MIG device.
	devs := d.deviceNames(t, ctx, c)
	var claims []*resourcev1.ResourceClaim
	for i, dev := range devs {
		cl, err := c.CreateResourceClaim(ctx, classClaim(ns, fmt.Sprintf("bench-%02d", i), "mig.tessera.dev"))
		if err != nil {
			t.Fatal(err)
		}
		cl.Status.Allocation = &resourcev1.AllocationResult{Devices: resourcev1.DeviceAllocationResult{Results: []resourcev1.DeviceRequestAllocationResult{{
			Request: "gpu", Driver: dra.DriverName, Pool: c.NodeName, Device: dev}}}}
		if cl, err = c.Client().ResourceV1().ResourceClaims(ns).UpdateStatus(ctx, cl, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		claims = append(claims, cl)
	}

	conn, err := grpc.NewClient("unix://"+filepath.Join(c.PluginsDir, dra.DriverName, "dra.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kubelet := drapb.NewDRAPluginClient(conn)
	ref := func(cl *resourcev1.ResourceClaim) []*drapb.Claim {
		return []*drapb.Claim{{Namespace: cl.Namespace, Name: cl.Name, Uid: string(cl.UID)}}
	}
	prepare := func(cl *resourcev1.ResourceClaim) (time.Duration, error) {
		t0 := time.Now()
		r, err := kubelet.NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{Claims: ref(cl)})
		d := time.Since(t0)
		if err == nil {
			if e := r.Claims[string(cl.UID)].GetError(); e != "" {
				err = fmt.Errorf("%s", e)
			} else if len(r.Claims[string(cl.UID)].GetDevices()) != 1 {
				err = fmt.Errorf("prepare returned %v", r.Claims[string(cl.UID)])
			}
		}
		return d, err
	}
	unprepare := func(cl *resourcev1.ResourceClaim) (time.Duration, error) {
		t0 := time.Now()
		r, err := kubelet.NodeUnprepareResources(ctx, &drapb.NodeUnprepareResourcesRequest{Claims: ref(cl)})
		d := time.Since(t0)
		if err == nil {
			if e := r.Claims[string(cl.UID)].GetError(); e != "" {
				err = fmt.Errorf("%s", e)
			}
		}
		return d, err
	}
	get := func(cl *resourcev1.ResourceClaim) (time.Duration, error) {
		t0 := time.Now()
		_, err := c.Client().ResourceV1().ResourceClaims(cl.Namespace).Get(ctx, cl.Name, metav1.GetOptions{})
		return time.Since(t0), err
	}

	// run calls op for `rounds` rounds over the claims with `callers` callers, each on its own claims:
	// caller w takes every callers-th claim, and the claims are ordered so that the 8 callers work on
	// the 8 different GPUs (per-GPU locks: callers on one GPU would wait for each other).
	byGPU := make([][]*resourcev1.ResourceClaim, 8)
	for i, cl := range claims {
		g := int(devs[i][len("gpu-")] - '0')
		byGPU[g] = append(byGPU[g], cl)
	}
	claims = claims[:0]
	for k := 0; k < 7; k++ {
		for g := range 8 {
			claims = append(claims, byGPU[g][k])
		}
	}
	run := func(callers, rounds int, ops ...func(*resourcev1.ResourceClaim) (time.Duration, error)) ([]latencies, time.Duration) {
		out := make([]latencies, len(ops))
		var mu sync.Mutex
		var wg sync.WaitGroup
		t0 := time.Now()
		for w := range callers {
			wg.Go(func() {
				local := make([]latencies, len(ops))
				for r := range rounds {
					for i := w; i < len(claims); i += callers {
						_ = r
						for k, op := range ops {
							d, err := op(claims[i])
							if err != nil {
								t.Errorf("%s: %v", claims[i].Name, err)
								return
							}
							local[k] = append(local[k], d)
						}
					}
				}
				mu.Lock()
				for k := range ops {
					out[k] = append(out[k], local[k]...)
				}
				mu.Unlock()
			})
		}
		wg.Wait()
		return out, time.Since(t0)
	}

	run(1, 1, prepare, unprepare) // warm up
	getSerial, _ := run(1, 5, get)
	serial, serialWall := run(1, 5, prepare, unprepare)
	getPar, getParWall := run(8, 5, get)
	procs := []string{"tessera-kubelet-plugin", harness.APIServer, harness.Etcd, "e2e.test (client)", harness.Kubelet, harness.Containerd,
		harness.Scheduler, harness.ControllerManager}
	pids := map[string]int{"tessera-kubelet-plugin": d.hp.PID, "e2e.test (client)": os.Getpid()}
	maps.Copy(pids, controlPlanePIDs(c))
	cpu0 := sampleProcs(procs, pids)
	par, parWall := run(8, 5, prepare, unprepare)
	cpu := sampleProcs(procs, pids).since(cpu0)
	if t.Failed() {
		t.FailNow()
	}
	n := len(serial[0])
	var b strings.Builder
	row := func(name string, l latencies, base latencies) {
		fmt.Fprintf(&b, "%-34s p50 %-10s p99 %-10s (%.1fx / %.1fx the claim GET)\n", name, ms(l.pct(.5)), ms(l.pct(.99)),
			float64(l.pct(.5))/float64(base.pct(.5)), float64(l.pct(.99))/float64(base.pct(.99)))
	}
	fmt.Fprintf(&b, "claim GET, serial                  p50 %-10s p99 %s\n", ms(getSerial[0].pct(.5)), ms(getSerial[0].pct(.99)))
	fmt.Fprintf(&b, "claim GET, 8 callers               p50 %-10s p99 %s  (%.0f GETs/s)\n", ms(getPar[0].pct(.5)), ms(getPar[0].pct(.99)), float64(len(getPar[0]))/getParWall.Seconds())
	row("Prepare, serial", serial[0], getSerial[0])
	row("Unprepare, serial", serial[1], getSerial[0])
	row("Prepare, 8 callers", par[0], getPar[0])
	row("Unprepare, 8 callers", par[1], getPar[0])
	fmt.Fprintf(&b, "claims/s (prepare+unprepare), serial:    %.0f (%d claims)\n", float64(n)/serialWall.Seconds(), n)
	fmt.Fprintf(&b, "claims/s (prepare+unprepare), 8 callers: %.0f (%d claims)\n", float64(len(par[0]))/parWall.Seconds(), len(par[0]))
	fmt.Fprintf(&b, "start to first slice (3 cold starts):    median %s, max %s\n", ms(firsts.pct(.5)), ms(firsts.pct(1)))
	fmt.Fprintf(&b, "CPU per claim, 8 callers: %s\n", cpu.perPod(len(par[0])))
	for _, line := range strings.Split(d.hp.Logs(), "\n") {
		if strings.Contains(line, `"Started"`) { // each start's phases (telemetry/startup)
			fmt.Fprintf(&b, "start-up phases: %s\n", line[strings.Index(line, `"Started"`):])
		}
	}
	t.Logf("DRA driver on the real API server (simulated dgx-h100, 56 MIG devices):\n%s", b.String())
	if dir := os.Getenv("TESSERA_BENCH_OUT"); dir != "" {
		pc := func(l latencies) harness.Percentiles {
			return harness.Percentiles{P50ms: float64(l.pct(.5).Microseconds()) / 1e3, P99ms: float64(l.pct(.99).Microseconds()) / 1e3}
		}
		fig := harness.DRABenchFigures{Callers: 8, GetSerial: pc(getSerial[0]), GetParallel: pc(getPar[0]),
			PrepareSerial: pc(serial[0]), UnprepareSerial: pc(serial[1]), PrepareParallel: pc(par[0]), UnprepareParallel: pc(par[1]),
			ClaimsPerSecSerial: float64(n) / serialWall.Seconds(), ClaimsPerSecParallel: float64(len(par[0])) / parWall.Seconds(),
			FirstSliceMs: float64(firsts.pct(.5).Microseconds()) / 1e3, CPUOrder: cpu.order, CPUPerClaim: map[string]float64{},
			BusyCores: cpu.machine / cpu.wall.Seconds()}
		for name, secs := range cpu.procs {
			fig.CPUPerClaim[name] = 1000 * secs / float64(len(par[0]))
		}
		data, err := json.Marshal(fig)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, harness.DRABenchFile), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func deleteDriverSlices(t *testing.T, c *harness.Cluster) {
	t.Helper()
	ctx := context.Background()
	list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list.Items {
		if err := c.Client().ResourceV1().ResourceSlices().Delete(ctx, s.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

func waitPluginSocket(t *testing.T, ctx context.Context, c *harness.Cluster) {
	t.Helper()
	sock := filepath.Join(c.PluginsDir, dra.DriverName, "dra.sock")
	if err := harness.Poll(ctx, 20*time.Millisecond, func(context.Context) (bool, error) {
		_, err := os.Stat(sock)
		return err == nil, nil
	}); err != nil {
		t.Fatalf("no %s: %v", sock, err)
	}
}

func (d *draDriver) deviceNames(t *testing.T, ctx context.Context, c *harness.Cluster) []string {
	t.Helper()
	list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range list.Items {
		for _, dev := range s.Spec.Devices {
			out = append(out, dev.Name)
		}
	}
	slices.Sort(out)
	return out
}
