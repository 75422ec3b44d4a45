//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// draDriver is tessera-kubelet-plugin running as a host process for the real node, on a simulated
// dgx-h100.
type draDriver struct {
	hp       *harness.HostProcess
	simDir   string
	stateDir string
	cdiDir   string
	mpsRoot  string
	nvml     backend.Options
}

const draProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - {name: whole, selector: {indices: [0, 1]}, owner: dra, mode: whole}
    - {name: mig, selector: {indices: [2]}, owner: dra, mode: mig-static, mig: {layout: existing}}
    - {name: ts, selector: {indices: [3]}, owner: dra, mode: time-sliced, timeSlicing: {interval: Medium}}
`

// GPU 0 mig-dynamic (its whole-GPU device and 25 placements), GPU 1 whole.
const draDynamicProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - {name: dynamic, selector: {indices: [0]}, owner: dra, mode: mig-dynamic}
    - {name: whole, selector: {indices: [1]}, owner: dra, mode: whole}
`

// GPU 0 shared with MPS isolation, GPU 1 shared by time-slicing.
const draSharedProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: device-plugin, mode: whole}
  rules:
    - {name: mps, selector: {indices: [0]}, owner: dra, mode: shared, shared: {isolation: mps}}
    - {name: ts, selector: {indices: [1]}, owner: dra, mode: shared}
`

const draAllMIGProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: dra, mode: mig-static, mig: {layout: existing}}
`

// startDRADriver builds the plugin, cuts GPU 2 of a simulated dgx-h100 into 1g.10gb MIG devices and
// starts the plugin with the profile above; it waits for the node's ResourceSlices.
func startDRADriver(t *testing.T, ctx context.Context, c *harness.Cluster) *draDriver {
	t.Helper()
	return startDRADriverWith(t, ctx, c, "mixed", 2+7+1)
}

// startDRADriverWith starts the plugin with layout "mixed" (draProfile, GPU 2 in MIG) or "all-1g"
// (every GPU cut into seven 1g.10gb, all DRA's) and waits for n published devices.
func startDRADriverWith(t *testing.T, ctx context.Context, c *harness.Cluster, layout string, n int) *draDriver {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil { // containers read the simulated driver files
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "tessera-kubelet-plugin")
	build := exec.CommandContext(ctx, "go", "build", "-tags", harness.BuildTags, "-o", bin, "./cmd/tessera-kubelet-plugin")
	build.Dir = filepath.Join("..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tessera-kubelet-plugin: %v\n%s", err, out)
	}
	d := &draDriver{simDir: filepath.Join(dir, "sim"), stateDir: filepath.Join(dir, "state"), cdiDir: c.CDIDir}
	d.nvml = backend.Options{NVML: "sim:dgx-h100", SimStateDir: d.simDir}
	lib, _, err := d.nvml.Open()
	if err != nil {
		t.Fatal(err)
	}
	gpus, profileDoc := "[2]", draProfile
	switch layout {
	case "all-1g":
		gpus, profileDoc = "all", draAllMIGProfile
	case "dynamic":
		gpus, profileDoc = "", draDynamicProfile // the driver turns MIG mode on and makes instances itself
	case "shared":
		gpus, profileDoc = "", draSharedProfile
	}
	if gpus != "" {
		cfg, err := mig.ParseConfig([]byte("version: v1\nmig-configs:\n  c:\n    - devices: "+gpus+"\n      mig-enabled: true\n      mig-devices: {\"1g.10gb\": 7}\n"), "e2e")
		if err != nil {
			t.Fatal(err)
		}
		if rep, err := mig.Apply(ctx, lib, cfg, "c", mig.Options{}); err != nil || !rep.OK() {
			t.Fatalf("mig apply: %v %+v", err, rep)
		}
	}
	lib.Shutdown()
	profileFile := filepath.Join(dir, "profiles", "dra")
	if err := os.MkdirAll(filepath.Dir(profileFile), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(profileFile, []byte(profileDoc), 0o644); err != nil {
		t.Fatal(err)
	}
	// MPS sockets live under the root: keep it short (Linux allows 107 bytes for a socket path).
	mpsRoot, err := os.MkdirTemp("", "e2e-dra-mps")
	if err != nil {
		t.Fatal(err)
	}
	d.mpsRoot = filepath.Join(mpsRoot, "m")
	t.Cleanup(func() { os.RemoveAll(mpsRoot) })
	hp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "tessera-kubelet-plugin",
		Path: bin,
		Args: []string{
			"--nvml=sim:dgx-h100", "--sim-state-dir=" + d.simDir,
			"--node-name=" + c.NodeName,
			"--kubelet-registry-dir=" + c.PluginRegistryDir,
			"--kubelet-plugins-dir=" + c.PluginsDir,
			"--cdi-dir=" + c.CDIDir,
			"--state-dir=" + d.stateDir,
			"--mps-root=" + d.mpsRoot,
			"--config-file=" + profileFile,
			fmt.Sprintf("--metrics-address=127.0.0.1:%d", freePort(t)),
			"--health-probe-interval=1s",
			"-v=2",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	d.hp = hp
	t.Cleanup(func() {
		hp.Stop(10 * time.Second)
		bg := context.Background()
		slices, err := c.Client().ResourceV1().ResourceSlices().List(bg, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err == nil {
			for _, s := range slices.Items {
				_ = c.Client().ResourceV1().ResourceSlices().Delete(bg, s.Name, metav1.DeleteOptions{})
			}
		}
	})
	d.waitSlices(t, ctx, c, n)
	return d
}

// waitSlices waits until the node's pool holds n devices.
func (d *draDriver) waitSlices(t *testing.T, ctx context.Context, c *harness.Cluster, n int) {
	t.Helper()
	err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		if exited, err := d.hp.Exited(); exited {
			return false, fmt.Errorf("the plugin exited: %v\n%s", err, d.hp.Logs())
		}
		list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err != nil {
			return false, err
		}
		got := 0
		for _, s := range list.Items {
			if s.Spec.NodeName != nil && *s.Spec.NodeName == c.NodeName {
				got += len(s.Spec.Devices)
			}
		}
		return got == n, nil
	})
	if err != nil {
		t.Fatalf("ResourceSlices with %d devices not published: %v\n%s", n, err, d.hp.Logs())
	}
}

func (d *draDriver) claimSpecs(t *testing.T) []string {
	t.Helper()
	var out []string
	ents, err := os.ReadDir(d.cdiDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "tessera.dev-gpu_") {
			out = append(out, e.Name())
		}
	}
	return out
}

// staticSpecDevices lists the device names of the driver's static spec (none: no spec).
func (d *draDriver) staticSpecDevices(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(d.cdiDir, "tessera.dev-gpu-dra.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var spec struct {
		Devices []struct {
			Name string `json:"name"`
		} `json:"devices"`
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, dev := range spec.Devices {
		out = append(out, dev.Name)
	}
	return out
}

func (d *draDriver) checkpoints(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(d.stateDir, "checkpoints"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	return out
}

func createShippedClasses(t testing.TB, ctx context.Context, c *harness.Cluster) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "deployments", "dra", "deviceclasses.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range bytes.Split(data, []byte("\n---\n")) {
		var dc resourcev1.DeviceClass
		if err := yaml.UnmarshalStrict(doc, &dc); err != nil {
			t.Fatal(err)
		}
		if _, err := c.CreateDeviceClass(ctx, &dc); err != nil {
			t.Fatalf("create DeviceClass %s: %v", dc.Name, err)
		}
		name := dc.Name
		t.Cleanup(func() {
			_ = c.Client().ResourceV1().DeviceClasses().Delete(context.Background(), name, metav1.DeleteOptions{})
		})
	}
}

func claimPod(ns, name, template string, command ...string) *corev1.Pod {
	pod := harness.BusyboxPod(ns, name, command...)
	pod.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "gpu", ResourceClaimTemplateName: ptr.To(template)}}
	pod.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "gpu"}}
	return pod
}

// standaloneClaimPod is claimPod for an existing claim (not a template): the claim and its status
// outlive the pod.
func standaloneClaimPod(ns, name, claim string, command ...string) *corev1.Pod {
	pod := harness.BusyboxPod(ns, name, command...)
	pod.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "gpu", ResourceClaimName: ptr.To(claim)}}
	pod.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "gpu"}}
	return pod
}

// classClaimTemplate is a template of classClaim.
func classClaimTemplate(ns, name, class string) *resourcev1.ResourceClaimTemplate {
	return &resourcev1.ResourceClaimTemplate{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: resourcev1.ResourceClaimTemplateSpec{Spec: classClaim(ns, name, class).Spec}}
}

// classClaim is a claim for one device of a DeviceClass, as request "gpu".
func classClaim(ns, name, class string) *resourcev1.ResourceClaim {
	return &resourcev1.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{Requests: []resourcev1.DeviceRequest{{
			Name: "gpu", Exactly: &resourcev1.ExactDeviceRequest{DeviceClassName: class}}}}}}
}

// podClaim returns the claim generated for a pod's "gpu" claim, once allocated.
func podClaim(t *testing.T, ctx context.Context, c *harness.Cluster, ns, pod string) *resourcev1.ResourceClaim {
	t.Helper()
	var claim *resourcev1.ResourceClaim
	err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		p, err := c.Client().CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, s := range p.Status.ResourceClaimStatuses {
			if s.Name == "gpu" && s.ResourceClaimName != nil {
				cl, err := c.Client().ResourceV1().ResourceClaims(ns).Get(ctx, *s.ResourceClaimName, metav1.GetOptions{})
				if err != nil {
					return false, err
				}
				if cl.Status.Allocation != nil {
					claim = cl
					return true, nil
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("pod %s: no allocated claim: %v\n%s", pod, err, c.DescribePod(ctx, ns, pod))
	}
	return claim
}

// Tessera's DRA driver on the real kubelet: slices are published; a pod whose claim comes from a
// template gets a whole GPU and sees exactly its device node through the claim's CDI spec, the claim
// gets its device status, and the spec and checkpoint go away when the pod ends; the time-sliced GPU
// got its interval through nvidia-smi; and over a plugin restart a running pod keeps running and its
// claim unprepares later under the new instance.
func TestDRADriverOnRealKubelet(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 5*time.Minute)
	createShippedClasses(t, ctx, c)
	d := startDRADriver(t, ctx, c)

	// The profile's time-sliced GPU 3 got interval Medium (2) from the simulator's nvidia-smi.
	lib, node, err := d.nvml.Open()
	if err != nil {
		t.Fatal(err)
	}
	recorded, err := node.Host().Recorded("nvidia-smi")
	lib.Shutdown()
	if err != nil || !slices.ContainsFunc(recorded, func(s string) bool { return strings.Contains(s, "compute-policy -i 3 --set-timeslice 2") }) {
		t.Errorf("nvidia-smi was not asked for GPU 3's interval: %v %q", err, recorded)
	}

	tmpl := classClaimTemplate(ns, "whole-gpu", "gpu.tessera.dev")
	if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
		t.Fatal(err)
	}

	t.Run("PodGetsItsGPU", func(t *testing.T) {
		pod := claimPod(ns, "sees-gpu", tmpl.Name, "sh", "-c", `ls -l /dev/nvidia* && echo "visible=$NVIDIA_VISIBLE_DEVICES"`)
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		claim := podClaim(t, ctx, c, ns, pod.Name)
		res := claim.Status.Allocation.Devices.Results
		if len(res) != 1 || res[0].Driver != dra.DriverName || res[0].Pool != c.NodeName {
			t.Fatalf("allocation %+v", res)
		}
		minor := strings.TrimPrefix(res[0].Device, "gpu-") // the simulator's minors are the indices
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodSucceeded); err != nil {
			t.Fatalf("%v\n%s\nplugin log:\n%s", err, c.DescribePod(ctx, ns, pod.Name), d.hp.Logs())
		}
		out, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("pod output:\n%s", out)
		nodes := regexp.MustCompile(`(?m)/dev/nvidia([0-9]+)$`).FindAllStringSubmatch(out, -1)
		if len(nodes) != 1 || nodes[0][1] != minor {
			t.Errorf("the container sees GPU nodes %v, want only /dev/nvidia%s", nodes, minor)
		}
		for _, want := range []string{`(?m)^crw.* 195, +255 .*/dev/nvidiactl$`, `(?m)^visible=void$`} {
			if !regexp.MustCompile(want).MatchString(out) {
				t.Errorf("output does not match %s", want)
			}
		}
		zero := int64(0)
		_ = c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		// The kubelet unprepares: spec and checkpoint go.
		if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
			return len(d.claimSpecs(t)) == 0 && len(d.checkpoints(t)) == 0, nil
		}); err != nil {
			t.Fatalf("after the pod: specs %v, checkpoints %v\n%s", d.claimSpecs(t), d.checkpoints(t), d.hp.Logs())
		}
	})

	t.Run("ClaimStatusWritten", func(t *testing.T) {
		// A standalone claim keeps its status for us to read while its pod runs.
		claim := classClaim(ns, "mig-claim", "mig.tessera.dev")
		if _, err := c.CreateResourceClaim(ctx, claim); err != nil {
			t.Fatal(err)
		}
		pod := standaloneClaimPod(ns, "mig-user", claim.Name, "sh", "-c", "ls /dev/nvidia-caps && sleep 3600")
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
			t.Fatalf("%v\n%s\n%s", err, c.DescribePod(ctx, ns, pod.Name), d.hp.Logs())
		}
		err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
			cl, err := c.Client().ResourceV1().ResourceClaims(ns).Get(ctx, claim.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, s := range cl.Status.Devices {
				var data dra.DeviceData
				if s.Driver == dra.DriverName && s.Data != nil && json.Unmarshal(s.Data.Raw, &data) == nil &&
					strings.HasPrefix(data.UUID, "MIG-") && len(s.Conditions) == 1 && s.Conditions[0].Type == dra.ConditionReady {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			t.Fatalf("claim device status: %v", err)
		}
		zero := int64(0)
		_ = c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		if err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
			cl, err := c.Client().ResourceV1().ResourceClaims(ns).Get(ctx, claim.Name, metav1.GetOptions{})
			return err == nil && len(cl.Status.ReservedFor) == 0 && len(d.checkpoints(t)) == 0, nil
		}); err != nil {
			t.Fatalf("claim not released: %v", err)
		}
	})

	t.Run("RestartWithPreparedClaims", func(t *testing.T) {
		pod := claimPod(ns, "long-runner", tmpl.Name, "sh", "-c", "ls /dev/nvidia* && sleep 3600")
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
			t.Fatalf("%v\n%s", err, c.DescribePod(ctx, ns, pod.Name))
		}
		// A whole GPU is answered from the driver's static spec: no transient spec for the claim.
		claim := podClaim(t, ctx, c, ns, pod.Name)
		if specs := d.claimSpecs(t); len(specs) != 0 {
			t.Fatalf("claim specs %v for the whole GPU of %s, want none", specs, claim.UID)
		}
		static := d.staticSpecDevices(t)
		if len(static) == 0 {
			t.Fatal("no static spec")
		}
		serving, unprepared := strings.Count(d.hp.Logs(), "Serving the kubelet"), strings.Count(d.hp.Logs(), `"Unprepared"`)
		if err := d.hp.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		// The new instance registers and publishes; the pod never noticed.
		d.waitSlices(t, ctx, c, 2+7+1)
		if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
			return strings.Count(d.hp.Logs(), "Serving the kubelet") > serving, nil
		}); err != nil {
			t.Fatalf("restarted plugin not serving: %v\n%s", err, d.hp.Logs())
		}
		p, err := c.Client().CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase != corev1.PodRunning || len(p.Status.ContainerStatuses) != 1 || p.Status.ContainerStatuses[0].RestartCount != 0 {
			t.Fatalf("pod after the plugin restart: %s %+v", p.Status.Phase, p.Status.ContainerStatuses)
		}
		if got := d.staticSpecDevices(t); !slices.Equal(got, static) {
			t.Fatalf("static spec after restart: %v, before %v", got, static)
		}
		// Unprepare, now served by the new instance.
		zero := int64(0)
		if err := c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
			return len(d.claimSpecs(t)) == 0 && len(d.checkpoints(t)) == 0, nil
		}); err != nil {
			t.Fatalf("claim not unprepared after the restart: specs %v checkpoints %v\n%s", d.claimSpecs(t), d.checkpoints(t), d.hp.Logs())
		}
		if strings.Count(d.hp.Logs(), `"Unprepared"`) <= unprepared {
			t.Errorf("the new instance did not log the unprepare:\n%s", d.hp.Logs())
		}
	})
}
