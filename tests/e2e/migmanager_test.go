//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/migmanager"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// GPUs 0 and 1 are the device plugin's, GPU 2 the DRA driver's, all three with the MIG layout the
// MIG manager sets; the other GPUs are whole device-plugin GPUs the layouts never select.
const migManagerProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - {name: dp-mig, selector: {indices: [0, 1]}, owner: device-plugin, mode: mig-static, mig: {layout: existing}}
    - {name: dra-mig, selector: {indices: [2]}, owner: dra, mode: mig-static, mig: {layout: existing}}
`

const migManagerLayouts = `version: v1
mig-configs:
  all-3g.40gb:
    - devices: [0, 1, 2]
      mig-enabled: true
      mig-devices: {"3g.40gb": 2}
  all-1g.10gb:
    - devices: [0, 1, 2]
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
  too-big:
    - devices: [0]
      mig-enabled: true
      mig-devices: {"3g.40gb": 3}
`

// stateRecorder records every value the node's state label takes, in order.
type stateRecorder struct {
	mu     sync.Mutex
	states []string
	seen   string
}

func (r *stateRecorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.states = nil
}

func (r *stateRecorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.states)
}

func (r *stateRecorder) add(v string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if v != r.seen && v != "" {
		r.states = append(r.states, v)
	}
	r.seen = v
}

func watchStateLabel(t *testing.T, ctx context.Context, c *harness.Cluster) *stateRecorder {
	t.Helper()
	r := &stateRecorder{}
	n, err := c.Client().CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		rv := n.ResourceVersion
		for ctx.Err() == nil {
			w, err := c.Client().CoreV1().Nodes().Watch(ctx, metav1.ListOptions{
				FieldSelector: fields.OneTermEqualSelector("metadata.name", c.NodeName).String(), ResourceVersion: rv})
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			for ev := range w.ResultChan() {
				if node, ok := ev.Object.(*corev1.Node); ok && ev.Type != watch.Error {
					rv = node.ResourceVersion
					r.add(node.Labels[migmanager.LabelState])
				}
			}
		}
	}()
	return r
}

// The node MIG manager, the device plugin and the DRA driver on one simulated dgx-h100 and the
// real kubelet: a label change moves the state label through pending, applying and success and
// the kubelet and the ResourceSlices show the new devices; a change that touches a device a pod
// uses waits until the pod is gone; a bad layout fails with its reason and keeps the old layout; a
// simulated reboot (MIG mode kept, instances gone) ends with the layout restored and re-advertised.
func TestMIGManager(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 8*time.Minute)

	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil { // containers read the simulated driver files
			t.Fatal(err)
		}
	}
	bins := buildBinaries(t, ctx, dir, "tessera", "tessera-device-plugin", "tessera-kubelet-plugin")
	simDir := filepath.Join(dir, "sim")
	profile := filepath.Join(dir, "profile.yaml")
	layouts := filepath.Join(dir, "layouts", migmanager.LayoutsKey)
	if err := os.MkdirAll(filepath.Dir(layouts), 0o755); err != nil {
		t.Fatal(err)
	}
	for f, doc := range map[string]string{profile: migManagerProfile, layouts: migManagerLayouts} {
		if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mpsRoot, err := os.MkdirTemp("", "e2e-mm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(mpsRoot) })
	nodeSim := []string{"--nvml=sim:dgx-h100", "--sim-state-dir=" + simDir}

	setLabel := func(v string) {
		t.Helper()
		val := "null"
		if v != "" {
			val = fmt.Sprintf("%q", v)
		}
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, migmanager.LabelConfig, val)
		if _, err := c.Client().CoreV1().Nodes().Patch(ctx, c.NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:null,%q:null}}}`, migmanager.LabelConfig, migmanager.LabelState)
		_, _ = c.Client().CoreV1().Nodes().Patch(context.Background(), c.NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	})
	states := watchStateLabel(t, ctx, c)
	setLabel("all-3g.40gb")

	dp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-device-plugin", Path: bins["tessera-device-plugin"],
		Args: append(slices.Clone(nodeSim), "--config-file="+profile, "--device-plugin-dir="+c.DevicePluginDir, "--cdi-dir="+c.CDIDir,
			"--mps-root="+filepath.Join(mpsRoot, "m"), "--node-name="+c.NodeName, "--kubeconfig="+c.PluginKubeconfig, "-v=2"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dp.Stop(0)
		_ = os.Remove(filepath.Join(c.CDIDir, "tessera.dev-gpu.json"))
	})
	kp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-kubelet-plugin", Path: bins["tessera-kubelet-plugin"],
		Args: append(slices.Clone(nodeSim), "--node-name="+c.NodeName, "--kubelet-registry-dir="+c.PluginRegistryDir,
			"--kubelet-plugins-dir="+c.PluginsDir, "--cdi-dir="+c.CDIDir, "--state-dir="+filepath.Join(dir, "dra"),
			"--mps-root="+filepath.Join(mpsRoot, "d"), "--config-file="+profile, "--resync-interval=2s", "-v=2"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		kp.Stop(10 * time.Second)
		bg := context.Background()
		list, err := c.Client().ResourceV1().ResourceSlices().List(bg, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err == nil {
			for _, s := range list.Items {
				_ = c.Client().ResourceV1().ResourceSlices().Delete(bg, s.Name, metav1.DeleteOptions{})
			}
		}
	})
	mmAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	mm, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-mig-manager", Path: bins["tessera"],
		Args: append(slices.Clone(nodeSim), "mig", "manager", "--config-file="+filepath.Dir(layouts), "--kubeconfig="+c.PluginKubeconfig,
			"--node-name="+c.NodeName, "--poll-interval=200ms", "--drain-timeout=3m", "--retry-interval=10m", "-v=2", "--metrics-address="+mmAddr),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mm.Stop(0) })
	logs := func() string {
		return fmt.Sprintf("\nmig manager log:\n%s\ndevice plugin log:\n%s\nDRA driver log:\n%s", tail(mm.Logs(), 30), tail(dp.Logs(), 30), tail(kp.Logs(), 20))
	}

	podResources := filepath.Join(c.KubeletRootDir, "pod-resources", "kubelet.sock")
	// Each wait has its own bound, so that a failure reports quickly and the rest of the budget stays.
	within := func() context.Context {
		w, cancel := context.WithTimeout(ctx, 90*time.Second)
		t.Cleanup(cancel)
		return w
	}
	// waitNode waits until the kubelet and the node status show these allocatable counts and the
	// DRA driver publishes n MIG devices of GPU 2.
	waitNode := func(what string, want map[string]int64, draMIG int) {
		t.Helper()
		var last string
		err := harness.Poll(within(), 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			ok, why, err := allocatableIs(ctx, c, podResources, want)
			if !ok || err != nil {
				last = why
				return false, err
			}
			list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
			if err != nil {
				return false, err
			}
			mig := 0
			for _, s := range list.Items {
				for _, d := range s.Spec.Devices {
					if strings.HasPrefix(d.Name, "gpu-2-mig-") {
						mig++
					}
				}
			}
			if mig != draMIG {
				last = fmt.Sprintf("ResourceSlices hold %d MIG devices of GPU 2", mig)
				return false, nil
			}
			return true, nil
		})
		if err != nil {
			t.Fatalf("%s: want %v and %d DRA MIG devices: %v; last: %s%s", what, want, draMIG, err, last, logs())
		}
	}
	// waitState waits for the state label to reach a final state and checks the states it went through.
	waitState := func(what string, want ...string) {
		t.Helper()
		final := want[len(want)-1]
		err := harness.Poll(within(), 100*time.Millisecond, func(context.Context) (bool, error) {
			s := states.list()
			return len(s) > 0 && s[len(s)-1] == final, nil
		})
		if err != nil {
			t.Fatalf("%s: state label never %s; went through %v%s", what, final, states.list(), logs())
		}
		if got := states.list(); !slices.Equal(got, want) {
			t.Errorf("%s: state label went through %v, want %v", what, got, want)
		}
	}
	nodeEvents := func(reason string) []string {
		t.Helper()
		list, err := c.Client().CoreV1().Events("").List(ctx, metav1.ListOptions{FieldSelector: "reason=" + reason})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range list.Items {
			if e.InvolvedObject.Kind == "Node" && e.InvolvedObject.Name == c.NodeName {
				out = append(out, e.Message)
			}
		}
		return out
	}
	waitEvent := func(reason, contains string) {
		t.Helper()
		err := harness.Poll(within(), 200*time.Millisecond, func(context.Context) (bool, error) {
			for _, m := range nodeEvents(reason) {
				if strings.Contains(m, contains) {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			t.Fatalf("no %s Event containing %q; have %q%s", reason, contains, nodeEvents(reason), logs())
		}
	}
	profilesOf := func(gpu int) []string {
		t.Helper()
		lib, _, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: simDir}.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer lib.Shutdown()
		devs, err := lib.MigDevices(gpu)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, d := range devs {
			out = append(out, d.Profile)
		}
		slices.Sort(out)
		return out
	}
	threeG := []string{"3g.40gb", "3g.40gb"}

	// 1. The label selected all-3g.40gb at start: MIG mode goes on and the devices appear.
	waitState("start", "pending", "applying", "success")
	waitNode("all-3g.40gb", map[string]int64{"nvidia.com/mig-3g.40gb": 4, "nvidia.com/gpu": 5}, 2)
	waitEvent(migmanager.ReasonApplied, `"all-3g.40gb" applied`)

	// 2. A label change: the old devices go, the new ones come, GPUs 3–7 keep serving throughout.
	states.reset()
	setLabel("all-1g.10gb")
	waitState("to all-1g.10gb", "pending", "applying", "success")
	waitNode("all-1g.10gb", map[string]int64{"nvidia.com/mig-1g.10gb": 14, "nvidia.com/mig-3g.40gb": 0, "nvidia.com/gpu": 5}, 7)
	if page, err := harness.GetURL(ctx, "http://"+mmAddr+"/metrics"); err != nil {
		t.Error(err)
	} else {
		for _, want := range []string{`tessera_mig_reconfigurations_total{result="success"} 2`, `tessera_mig_config_state{config="all-1g.10gb",state="success"} 1`} {
			if !strings.Contains(page, want) {
				t.Errorf("MIG manager metrics lack %s:\n%s", want, page)
			}
		}
	}

	// 3. A change that would destroy a device a pod uses waits until the pod is gone.
	pod := harness.BusyboxPod(ns, "mig-user", "sleep", "3600")
	pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{"nvidia.com/mig-1g.10gb": resource.MustParse("1")}
	zero := int64(0)
	pod.Spec.TerminationGracePeriodSeconds = &zero
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
		t.Fatalf("pod: %v%s", err, logs())
	}
	states.reset()
	setLabel("all-3g.40gb")
	waitEvent(migmanager.ReasonWaiting, "nvidia.com/mig-1g.10gb=MIG-")
	waitEvent(migmanager.ReasonWaiting, "used by pod "+ns+"/mig-user")
	time.Sleep(2 * time.Second) // it keeps waiting
	if got := states.list(); !slices.Equal(got, []string{"pending"}) {
		t.Fatalf("with a device in use the state went through %v, want only pending%s", got, logs())
	}
	if got := profilesOf(0); len(got) != 7 || got[0] != "1g.10gb" {
		t.Fatalf("GPU 0 changed while its device was in use: %v", got)
	}
	if err := c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	waitState("after the pod is gone", "pending", "applying", "success")
	waitNode("back to all-3g.40gb", map[string]int64{"nvidia.com/mig-3g.40gb": 4, "nvidia.com/mig-1g.10gb": 0, "nvidia.com/gpu": 5}, 2)

	// 4. Bad layouts fail with the reason and leave the layout as it was.
	states.reset()
	setLabel("no-such-layout")
	waitState("missing layout", "pending", "failed")
	waitEvent(migmanager.ReasonFailed, `"no-such-layout", which the layouts ConfigMap does not have`)
	states.reset()
	setLabel("too-big")
	waitState("impossible layout", "pending", "failed")
	waitEvent(migmanager.ReasonFailed, "3g.40gb x3: the GPU allows at most 2")
	if got := profilesOf(0); !slices.Equal(got, threeG) {
		t.Errorf("GPU 0 after the failed layouts: %v, want %v", got, threeG)
	}
	waitNode("after failures", map[string]int64{"nvidia.com/mig-3g.40gb": 4, "nvidia.com/gpu": 5}, 2)
	states.reset()
	setLabel("all-3g.40gb")
	waitState("good again", "pending", "applying", "success")

	// 5. A reboot: every process stops, MIG mode survives, the instances do not. The front ends come
	// back first and hold the managed GPUs; the manager restores the layout and they advertise it.
	mm.Stop(0)
	dp.Stop(0)
	kp.Stop(10 * time.Second)
	spec, _ := sim.BuiltinNode("dgx-h100")
	node, err := sim.Open(spec, simDir)
	if err != nil {
		t.Fatal(err)
	}
	oldBoot, _ := node.BootID()
	if err := node.Reboot(); err != nil {
		t.Fatal(err)
	}
	newBoot, _ := node.BootID()
	if newBoot == oldBoot {
		t.Fatal("the simulated reboot kept the boot ID")
	}
	if got := profilesOf(0); len(got) != 0 {
		t.Fatalf("MIG devices survived the reboot: %v", got)
	}
	if err := dp.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := kp.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	err = harness.Poll(within(), 100*time.Millisecond, func(context.Context) (bool, error) {
		return strings.Contains(dp.Logs(), "MIG manager holds devices") && strings.Contains(kp.Logs(), "MIG manager holds devices"), nil
	})
	if err != nil {
		t.Fatalf("the front ends did not hold the managed GPUs after the reboot%s", logs())
	}
	states.reset()
	if err := mm.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitState("after the reboot", "pending", "applying", "success")
	waitNode("after the reboot", map[string]int64{"nvidia.com/mig-3g.40gb": 4, "nvidia.com/gpu": 5}, 2)
	if got := profilesOf(1); !slices.Equal(got, threeG) {
		t.Errorf("GPU 1 after the reboot: %v, want %v", got, threeG)
	}
	plan, err := miggate.Dir{Path: filepath.Join(simDir, "mig-manager")}.ReadPlan()
	if err != nil || plan == nil || plan.BootID != newBoot || plan.State != miggate.StateSuccess {
		t.Errorf("plan after the reboot: %+v %v (boot %s)", plan, err, newBoot)
	}
}
