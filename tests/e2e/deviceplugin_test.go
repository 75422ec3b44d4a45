//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// One sharing profile on a simulated dgx-h100 gives every kind of device the plugin serves.
const e2eDeviceProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  rules:
  - {name: whole, selector: {indices: [0, 1]}, owner: device-plugin, mode: whole}
  - {name: shared, selector: {indices: [2, 3]}, owner: device-plugin, mode: time-sliced, resourceName: nvidia.com/gpu.shared, timeSlicing: {replicas: %d}}
  - {name: mps, selector: {indices: [4]}, owner: device-plugin, mode: mps, resourceName: nvidia.com/gpu.mps, mps: {replicas: 2}}
  - {name: mig, selector: {indices: [5, 6]}, owner: device-plugin, mode: mig-static, mig: {layout: all-3g.40gb}}
  - {name: dra, selector: {indices: [7]}, owner: dra, mode: whole}
`

// tessera-device-plugin runs as a host process next to the real kubelet on a simulated dgx-h100.
// Pods get a whole GPU, a time-sliced replica, a MIG device (the plugin cut the GPUs itself) and
// an MPS client through CDI and see them from inside; the plugin labels the node. After a plugin
// restart and a kubelet restart the same devices are advertised and pods still get them; an edit
// of the config file changes the advertised replicas.
func TestDevicePluginServesPods(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 6*time.Minute)

	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "tessera-device-plugin")
	build := exec.CommandContext(ctx, "go", "build", "-tags", harness.BuildTags, "-o", bin, "./cmd/tessera-device-plugin")
	build.Dir = filepath.Join("..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tessera-device-plugin: %v\n%s", err, out)
	}
	// Unix socket paths are short: the MPS root lives in a short directory.
	mpsRoot, err := os.MkdirTemp("", "e2e-mps")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(mpsRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	simState := filepath.Join(dir, "sim")
	config := filepath.Join(dir, "profile.yaml")
	writeProfile := func(replicas int) {
		t.Helper()
		if err := os.WriteFile(config, []byte(fmt.Sprintf(e2eDeviceProfile, replicas)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeProfile(4)
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))

	hp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-device-plugin",
		Path: bin,
		Args: []string{"--nvml=sim:dgx-h100", "--sim-state-dir=" + simState, "--config-file=" + config,
			"--device-plugin-dir=" + c.DevicePluginDir, "--cdi-dir=" + c.CDIDir, "--mps-root=" + filepath.Join(mpsRoot, "m"),
			"--node-name=" + c.NodeName, "--kubeconfig=" + c.PluginKubeconfig, "--config-poll-interval=200ms", "-v=2",
			"--metrics-address=" + metricsAddr},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		hp.Stop(0)
		// The plugin started MPS daemons (stand-ins) that outlive it, as real ones do: stop them.
		spec, _ := sim.BuiltinNode("dgx-h100")
		if node, err := sim.Open(spec, simState); err == nil {
			if lib, err := nvmlib.Wrap(node.NVML()); err == nil {
				m := mps.NewManager(lib, mps.WithRoot(filepath.Join(mpsRoot, "m")), mps.ForSimulatedHost(node.Host()))
				sts, _ := m.List()
				for _, s := range sts {
					if err := m.Stop(context.Background(), s.GPUUUID, mps.StopOptions{}); err != nil {
						t.Logf("stopping the MPS daemon of GPU %d: %v", s.GPUIndex, err)
					}
				}
				_ = lib.Shutdown()
			}
		}
		_ = os.RemoveAll(mpsRoot)
		_ = os.Remove(filepath.Join(c.CDIDir, "tessera.dev-gpu.json"))
		for _, l := range []string{"nvidia.com/gpu.product", "nvidia.com/gpu.count", "nvidia.com/gpu.memory", "nvidia.com/gpu.replicas",
			"nvidia.com/gpu.sharing-strategy", "nvidia.com/mig.strategy", "nvidia.com/mig.capable"} {
			patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null}}}`, l)
			_, _ = c.Client().CoreV1().Nodes().Patch(context.Background(), c.NodeName, "application/merge-patch+json", []byte(patch), metav1.PatchOptions{})
		}
	})
	if t.Failed() {
		return
	}

	want := map[string]int64{"nvidia.com/gpu": 2, "nvidia.com/gpu.shared": 8, "nvidia.com/gpu.mps": 2, "nvidia.com/mig-3g.40gb": 4}
	// waitAllocatable waits until the plugin process has registered every resource `registrations`
	// times (its metrics), the kubelet itself counts the healthy devices wanted (PodResources
	// GetAllocatableResources: the device manager's own view) and the node status shows them.
	podResources := filepath.Join(c.KubeletRootDir, "pod-resources", "kubelet.sock")
	waitAllocatable := func(what string, registrations int, want map[string]int64) {
		t.Helper()
		var last string
		err := harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			m, err := harness.GetURL(ctx, "http://"+metricsAddr+"/metrics")
			if err != nil {
				last = "metrics: " + err.Error()
				return false, nil
			}
			for r := range want {
				line := fmt.Sprintf("tessera_device_plugin_registrations_total{resource=%q} %d", r, registrations)
				if !strings.Contains(m, line) {
					last = "plugin metrics lack " + line
					return false, nil
				}
			}
			ok, why, err := allocatableIs(ctx, c, podResources, want)
			last = why
			return ok, err
		})
		if err != nil {
			t.Fatalf("%s: want %v: %v; last: %s\nplugin log:\n%s", what, want, err, last, tail(hp.Logs(), 40))
		}
	}
	waitAllocatable("start", 1, want)

	n, err := c.Client().CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{"nvidia.com/gpu.count": "7", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED",
		"nvidia.com/gpu.sharing-strategy": "mixed", "nvidia.com/mig.strategy": "mixed", "nvidia.com/mig.capable": "true"} {
		if n.Labels[k] != v {
			t.Errorf("node label %s=%q, want %q", k, n.Labels[k], v)
		}
	}

	run := func(name, res, script string, want ...string) {
		t.Helper()
		pod := harness.BusyboxPod(ns, name, "sh", "-c", script)
		pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{corev1.ResourceName(res): resource.MustParse("1")}
		out, err := c.RunPod(ctx, pod)
		if err != nil {
			t.Fatalf("pod %s: %v\n%s\nplugin log:\n%s", name, err, out, tail(hp.Logs(), 40))
		}
		t.Logf("pod %s:\n%s", name, out)
		for _, re := range want {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("pod %s: output does not match %s", name, re)
			}
		}
	}
	runAll := func(round string) {
		run("whole-"+round, "nvidia.com/gpu", `ls -l /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl 2>&1; echo "V=$NVIDIA_VISIBLE_DEVICES"`,
			`(?m)^crw-rw-rw- .* 195, +[01] .*/dev/nvidia[01]$`, `(?m)/dev/nvidiactl$`, `(?m)^V=void$`,
			`(?m)No such file or directory`) // exactly one of GPU 0 and 1
		run("replica-"+round, "nvidia.com/gpu.shared", `ls /dev/nvidia2 /dev/nvidia3 2>/dev/null; echo "R=$TESSERA_REPLICA"`,
			`(?m)^R=GPU-[0-9a-f-]+::[0-3]$`, `(?m)^/dev/nvidia[23]$`)
		run("mig-"+round, "nvidia.com/mig-3g.40gb", `ls -l /dev/nvidia-caps/; ls /dev/nvidia5 /dev/nvidia6 2>/dev/null; true`,
			`(?m)^cr--r--r-- .* nvidia-cap\d+$`, `(?m)^/dev/nvidia[56]$`)
		run("mps-"+round, "nvidia.com/gpu.mps", `echo "P=$CUDA_MPS_PIPE_DIRECTORY T=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"; test -d /tmp/nvidia-mps && echo pipe-mounted; ls /dev/nvidia4`,
			`(?m)^P=/tmp/nvidia-mps T=50$`, `(?m)^pipe-mounted$`, `(?m)^/dev/nvidia4$`)
	}
	runAll("a")

	// The plugin restarts: the same devices come back.
	if err := hp.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitAllocatable("plugin restart", 1, want)
	runAll("b")

	// The kubelet restarts (removing the plugin's sockets): the plugin registers again.
	if err := c.RestartKubelet(ctx); err != nil {
		t.Fatal(err)
	}
	waitAllocatable("kubelet restart", 2, want)
	run("replica-c", "nvidia.com/gpu.shared", `echo "R=$TESSERA_REPLICA"`, `(?m)^R=GPU-[0-9a-f-]+::[0-3]$`)
	if !strings.Contains(hp.Logs(), "Socket gone") {
		t.Errorf("the plugin log does not show the re-registration after the kubelet restart")
	}

	// A live edit of the profile: two replicas per GPU instead of four.
	writeProfile(2)
	want["nvidia.com/gpu.shared"] = 4
	waitAllocatable("profile edit", 2, want)

	if _, err := os.Stat(filepath.Join(c.CDIDir, "tessera.dev-gpu.json")); err != nil {
		t.Error(err)
	}
	if l, err := cdi.List(c.CDIDir, cdi.DefaultVendorClass); err != nil || len(l.Errors) > 0 {
		t.Errorf("CDI specs: %v %v", err, l.Errors)
	}
}

// allocatableIs reports whether the kubelet itself (PodResources GetAllocatableResources: the
// device manager's own view) and the node status both show exactly these allocatable counts, and if
// not, what they show.
func allocatableIs(ctx context.Context, c *harness.Cluster, podResources string, want map[string]int64) (bool, string, error) {
	got, err := kubeletAllocatable(ctx, podResources)
	if err != nil {
		return false, "pod resources: " + err.Error(), nil
	}
	for r, v := range want {
		if got[r] != v {
			return false, fmt.Sprintf("kubelet allocatable %v", got), nil
		}
	}
	n, err := c.Client().CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		return false, "", err
	}
	for r, v := range want {
		q := n.Status.Allocatable[corev1.ResourceName(r)]
		if q.Value() != v {
			return false, fmt.Sprintf("node allocatable %v", n.Status.Allocatable), nil
		}
	}
	return true, "", nil
}

// buildBinaries builds the named commands (folders of cmd/) into dir and returns their paths.
func buildBinaries(t *testing.T, ctx context.Context, dir string, names ...string) map[string]string {
	t.Helper()
	return buildBinariesWith(t, ctx, dir, nil, names...)
}

// buildBinariesWith is buildBinaries with extra go build flags (link flags only keep the compile
// cache that make build and the other tests filled).
func buildBinariesWith(t *testing.T, ctx context.Context, dir string, flags []string, names ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, b := range names {
		out[b] = filepath.Join(dir, b)
		args := append(append([]string{"build", "-tags", harness.BuildTags}, flags...), "-o", out[b], "./cmd/"+b)
		build := exec.CommandContext(ctx, "go", args...)
		build.Dir = filepath.Join("..", "..")
		if msg, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", b, err, msg)
		}
	}
	return out
}

// kubeletAllocatable asks the kubelet's PodResources API for its allocatable devices per resource.
func kubeletAllocatable(ctx context.Context, socket string) (map[string]int64, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := podresourcesapi.NewPodResourcesListerClient(conn).GetAllocatableResources(ctx, &podresourcesapi.AllocatableResourcesRequest{})
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, d := range resp.Devices {
		out[d.ResourceName] += int64(len(d.DeviceIds))
	}
	return out, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
