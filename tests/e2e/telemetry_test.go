//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/telemetry"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

const telemetryProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - {name: dra, selector: {indices: [4, 5, 6, 7]}, owner: dra, mode: whole}
`

// metricValue finds the value of the one series of name whose labels include every want pair
// (label="value") in a Prometheus text page.
func metricValue(page, name string, want ...string) (float64, bool) {
	for _, line := range strings.Split(page, "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		return v, err == nil
	}
	return 0, false
}

// hostPIDsOfPod lists the host PIDs in a pod's cgroup, found as the telemetry finds them.
func hostPIDsOfPod(uid string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if got, err := telemetry.PodUIDOfPID("/proc", pid); err == nil && got == uid {
			out = append(out, pid)
		}
	}
	slices.Sort(out)
	return out
}

// Both daemons on the real kubelet export who holds which device: a pod holding a whole device-plugin
// GPU is named on its device, the process in its container (registered on the simulated GPU with its
// real host PID) is attributed to it through its cgroup, the GPU's utilization becomes the pod's, and
// when the GPU goes idle for the window the pod gets a GPUIdle Event; a pod holding a DRA claim is
// named on the DRA driver's device with its claim.
func TestTelemetryAttributesPods(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 5*time.Minute)
	createShippedClasses(t, ctx, c)

	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bins := buildBinaries(t, ctx, dir, "tessera-device-plugin", "tessera-kubelet-plugin")
	simDir := filepath.Join(dir, "sim")
	profile := filepath.Join(dir, "profile.yaml")
	if err := os.WriteFile(profile, []byte(telemetryProfile), 0o644); err != nil {
		t.Fatal(err)
	}
	spec, _ := sim.BuiltinNode("dgx-h100")
	node, err := sim.Open(spec, simDir)
	if err != nil {
		t.Fatal(err)
	}
	busy := 50
	for i := range 8 {
		if err := node.Set(i, sim.Settings{UtilizationGPU: &busy}); err != nil {
			t.Fatal(err)
		}
	}
	mpsRoot, err := os.MkdirTemp("", "e2e-tm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(mpsRoot) })
	common := []string{"--nvml=sim:dgx-h100", "--sim-state-dir=" + simDir, "--config-file=" + profile, "--node-name=" + c.NodeName,
		"--kubeconfig=" + c.PluginKubeconfig, "--cdi-dir=" + c.CDIDir, "--telemetry-interval=300ms", "--idle-window=3s", "-v=2"}
	dpAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-device-plugin", Path: bins["tessera-device-plugin"],
		Args: append(slices.Clone(common), "--device-plugin-dir="+c.DevicePluginDir, "--mps-root="+filepath.Join(mpsRoot, "m"), "--metrics-address="+dpAddr),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dp.Stop(0)
		_ = os.Remove(filepath.Join(c.CDIDir, "tessera.dev-gpu.json"))
	})
	draAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	kp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-kubelet-plugin", Path: bins["tessera-kubelet-plugin"],
		Args: append(slices.Clone(common), "--kubelet-registry-dir="+c.PluginRegistryDir, "--kubelet-plugins-dir="+c.PluginsDir,
			"--state-dir="+filepath.Join(dir, "dra"), "--mps-root="+filepath.Join(mpsRoot, "d"), "--metrics-address="+draAddr),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		kp.Stop(10 * time.Second)
		deleteDriverSlices(t, c)
	})
	logs := func() string {
		return fmt.Sprintf("\ndevice plugin log:\n%s\nDRA driver log:\n%s", tail(dp.Logs(), 25), tail(kp.Logs(), 25))
	}
	// waitMetric polls a metrics page until the series has the value.
	waitMetric := func(addr, name string, want float64, labels ...string) string {
		t.Helper()
		var page string
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		err := harness.Poll(wctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			p, err := harness.GetURL(ctx, "http://"+addr+"/metrics")
			if err != nil {
				return false, nil
			}
			page = p
			v, ok := metricValue(p, name, labels...)
			return ok && v == want, nil
		})
		if err != nil {
			var lines []string
			for _, l := range strings.Split(page, "\n") {
				if strings.HasPrefix(l, name) {
					lines = append(lines, l)
				}
			}
			t.Fatalf("%s %v never %v; have:\n%s%s", name, labels, want, strings.Join(lines, "\n"), logs())
		}
		return page
	}

	// A pod holds a whole device-plugin GPU.
	pod := harness.BusyboxPod(ns, "trainer", "sleep", "3600")
	pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}
	zero := int64(0)
	pod.Spec.TerminationGracePeriodSeconds = &zero
	created, err := c.CreatePod(ctx, pod)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
		t.Fatalf("pod: %v%s", err, logs())
	}
	page := waitMetric(dpAddr, "tessera_device_allocated", 1, `pod="trainer"`, `namespace="`+ns+`"`, `component="device-plugin"`)
	m := regexp.MustCompile(`tessera_device_allocated\{[^}]*gpu="(\d)"[^}]*pod="trainer"`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no GPU label on the trainer's device:\n%s", page)
	}
	gpu, _ := strconv.Atoi(m[1])

	// Its container's process runs on that GPU (the simulator is told its real host PID).
	pids := hostPIDsOfPod(string(created.UID))
	if len(pids) == 0 {
		t.Fatalf("no host process in pod %s's cgroup", created.UID)
	}
	pid := pids[len(pids)-1]
	if err := node.AddProcess(gpu, pid, 1234, -1, -1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = node.EndProcesses(gpu, pid) })
	util := 42
	if err := node.Set(gpu, sim.Settings{UtilizationGPU: &util}); err != nil {
		t.Fatal(err)
	}
	g := fmt.Sprintf(`gpu="%d"`, gpu)
	waitMetric(dpAddr, "tessera_pod_gpu_memory_used_bytes", 1234<<20, g, `pod="trainer"`, `pod_uid="`+string(created.UID)+`"`)
	waitMetric(dpAddr, "tessera_pod_gpu_processes", 1, g, `pod="trainer"`)
	waitMetric(dpAddr, "tessera_pod_gpu_utilization_percent", 42, g, `pod="trainer"`)
	waitMetric(dpAddr, "tessera_gpu_utilization_percent", 42, g, `component="device-plugin"`)
	waitMetric(dpAddr, "tessera_profile_reloads_total", 1, `component="device-plugin"`, `result="success"`)
	waitMetric(draAddr, "tessera_profile_reloads_total", 0, `component="dra"`, `result="failure"`)
	if p, err := harness.GetURL(ctx, "http://"+dpAddr+"/metrics"); err == nil {
		if _, ok := metricValue(p, "tessera_gpu_utilization_percent", `gpu="4"`); ok {
			t.Errorf("the device plugin exports GPU 4, which the DRA driver owns")
		}
	}

	// The GPU goes idle: after the window the pod gets an Event and the metric says so.
	idle := 0
	if err := node.Set(gpu, sim.Settings{UtilizationGPU: &idle}); err != nil {
		t.Fatal(err)
	}
	waitMetric(dpAddr, "tessera_device_idle", 1, `pod="trainer"`)
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		evs, err := c.Client().CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=trainer,reason=" + telemetry.ReasonIdle})
		return err == nil && len(evs.Items) > 0 && strings.Contains(evs.Items[0].Message, "has held nvidia.com/gpu"), err
	})
	if err != nil {
		t.Fatalf("no %s Event on the idle pod: %v%s", telemetry.ReasonIdle, err, logs())
	}

	// A pod holding a DRA claim is named on the DRA driver's device, with the claim.
	tmpl := classClaimTemplate(ns, "whole-gpu", "gpu.tessera.dev")
	if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
		t.Fatal(err)
	}
	server := claimPod(ns, "server", tmpl.Name, "sleep", "3600")
	server.Spec.TerminationGracePeriodSeconds = &zero
	if _, err := c.CreatePod(ctx, server); err != nil {
		t.Fatal(err)
	}
	claim := podClaim(t, ctx, c, ns, server.Name)
	if _, err := c.WaitForPodPhase(ctx, ns, server.Name, corev1.PodRunning); err != nil {
		t.Fatalf("pod: %v%s", err, logs())
	}
	dev := claim.Status.Allocation.Devices.Results[0].Device
	waitMetric(draAddr, "tessera_device_allocated", 1, `component="dra"`, `device="`+dev+`"`, `pod="server"`,
		`claim="`+ns+"/"+claim.Name+`"`, `resource="`+dra.DriverName+`"`)
	waitMetric(draAddr, "tessera_gpu_readable", 1, `component="dra"`, `gpu="4"`)

	// Its GPU goes idle: the claim's device status gets condition Idle=True, and False once busy again.
	draGPU, err := strconv.Atoi(strings.TrimPrefix(dev, "gpu-"))
	if err != nil {
		t.Fatalf("device %s", dev)
	}
	idleCondition := func(want metav1.ConditionStatus) {
		t.Helper()
		var last string
		wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		err := harness.Poll(wctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			cl, err := c.Client().ResourceV1().ResourceClaims(ns).Get(ctx, claim.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, d := range cl.Status.Devices {
				for _, cond := range d.Conditions {
					if d.Device == dev && cond.Type == dra.ConditionIdle {
						last = fmt.Sprintf("%s %s: %s", cond.Status, cond.Reason, cond.Message)
						return cond.Status == want, nil
					}
				}
			}
			return false, nil
		})
		if err != nil {
			t.Fatalf("claim %s: condition Idle never %s (last: %q)%s", claim.Name, want, last, logs())
		}
		t.Logf("claim %s: Idle %s", claim.Name, last)
	}
	if err := node.Set(draGPU, sim.Settings{UtilizationGPU: &idle}); err != nil {
		t.Fatal(err)
	}
	idleCondition(metav1.ConditionTrue)
	if err := node.Set(draGPU, sim.Settings{UtilizationGPU: &busy}); err != nil {
		t.Fatal(err)
	}
	idleCondition(metav1.ConditionFalse)
}
