//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/deployments/image"
	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// installImageRef names the image the test builds and imports; never pulled.
const installImageRef = "ghcr.io/tessera-gpu/tessera:e2e"

// buildImage builds stripped binaries and the image tarball (as make image does) and imports it
// into the cluster's containerd.
func buildImage(t *testing.T, ctx context.Context, c *harness.Cluster) image.Result {
	t.Helper()
	dir := t.TempDir()
	built := buildBinariesWith(t, ctx, dir, []string{"-ldflags=-s -w"}, "tessera", "tessera-device-plugin", "tessera-kubelet-plugin", "tessera-webhook")
	bins := slices.Sorted(maps.Values(built))
	tarball := filepath.Join(dir, "tessera-image.tar")
	res, err := image.Build(ctx, image.Options{Binaries: bins, Ref: installImageRef, Out: tarball})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ctr(ctx, "images", "import", tarball); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = c.Ctr(context.Background(), "images", "rm", installImageRef) })
	return res
}

// Tessera installed for real: the chart, with the simulated-node preset and the image built here
// (no Docker daemon), goes onto the local cluster through the Helm library; its DaemonSet pods run
// in containerd, register with the real kubelet (device plugin resources, DRA ResourceSlices), and
// workloads get their GPUs through both front ends; uninstalling leaves no Tessera resource on the
// node.
func TestHelmInstallOnLocalCluster(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 8*time.Minute)

	t0 := time.Now()
	img := buildImage(t, ctx, c)
	t.Logf("image %s (%d files, %.1f MB) built and imported in %s", img.Digest, len(img.Files), float64(img.Size)/1e6, time.Since(t0).Round(time.Second))

	// Node state under a temporary dir; short MPS root (socket paths are limited to 107 bytes).
	state := t.TempDir()
	if err := os.Chmod(state, 0o755); err != nil { // workload containers read the simulated driver files
		t.Fatal(err)
	}
	mpsRoot, err := os.MkdirTemp("", "e2e-helm-mps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(mpsRoot) })
	dpPort, kpPort := freePort(t), freePort(t)
	overrides := map[string]any{
		"image": map[string]any{"repository": strings.Split(installImageRef, ":")[0], "tag": "e2e", "pullPolicy": "Never"},
		// This cluster has no kube-proxy: the pods reach the API server on the host's loopback.
		"hostNetwork": true,
		"env": []any{
			map[string]any{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
			map[string]any{"name": "KUBERNETES_SERVICE_PORT", "value": fmt.Sprint(c.Ports.APIServer)},
		},
		"nodeSelector": map[string]any{corev1.LabelHostname: c.NodeName},
		"hostPaths": map[string]any{
			"kubeletRoot": c.KubeletRootDir, "cdiDir": c.CDIDir, "stateDir": state, "mpsRoot": filepath.Join(mpsRoot, "m"),
		},
		"devicePlugin":  map[string]any{"metrics": map[string]any{"address": fmt.Sprintf("127.0.0.1:%d", dpPort)}},
		"kubeletPlugin": map[string]any{"metrics": map[string]any{"address": fmt.Sprintf("127.0.0.1:%d", kpPort)}},
		// The API server reaches the webhook at its pod's IP (--enable-aggregator-routing): only
		// this test's namespace is validated, so other tests never depend on it.
		"webhook": map[string]any{"namespaceSelector": map[string]any{"matchLabels": map[string]any{"kubernetes.io/metadata.name": ns}}},
	}
	valuesFile := filepath.Join(t.TempDir(), "e2e-values.json")
	data, err := json.Marshal(overrides)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(valuesFile, data, 0o644); err != nil {
		t.Fatal(err)
	}
	release := "tessera"
	chart := func(ctx context.Context, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, "go", append([]string{"run", "./deployments/helm/cmd/tessera-chart"}, args...)...)
		cmd.Dir = filepath.Join("..", "..")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() {
		if out, err := chart(context.Background(), "uninstall", "--kubeconfig", c.Kubeconfig, "--namespace", ns, "--release", release); err != nil {
			t.Logf("uninstall: %v\n%s", err, out)
		}
		deleteDriverSlices(t, c)
	})
	// Helm runs in a process of its own: see deployments/helm's package comment.
	t1 := time.Now()
	out, err := chart(ctx, "install", "--kubeconfig", c.Kubeconfig, "--namespace", ns, "--release", release,
		"-f", filepath.Join("deployments", "helm", "tessera", "values-sim.yaml"), "-f", valuesFile)
	if err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	t.Logf("%s in %s", strings.TrimSpace(out), time.Since(t1).Round(100*time.Millisecond))
	t1 = time.Now()

	// The DaemonSet pods and the webhook run and are ready.
	dsNames := []string{"tessera-device-plugin", "tessera-kubelet-plugin"}
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		wh, err := c.Client().AppsV1().Deployments(ns).Get(ctx, "tessera-webhook", metav1.GetOptions{})
		if err != nil || wh.Status.ReadyReplicas != 1 {
			return false, err
		}
		for _, n := range dsNames {
			ds, err := c.Client().AppsV1().DaemonSets(ns).Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("DaemonSets and webhook not ready: %v\n%s", err, describeRelease(ctx, c, ns))
	}
	t.Logf("DaemonSet and webhook pods ready %s after install", time.Since(t1).Round(100*time.Millisecond))

	// Registered with the real kubelet: GPUs 0-1 whole, 2-3 time-sliced 4 ways (device plugin);
	// GPUs 4-7 as DRA devices in the node's ResourceSlices.
	podResources := filepath.Join(c.KubeletRootDir, "pod-resources", "kubelet.sock")
	want := map[string]int64{"nvidia.com/gpu": 2, "nvidia.com/gpu.shared": 8}
	var why string
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		ok, w, err := allocatableIs(ctx, c, podResources, want)
		why = w
		return ok, err
	})
	if err != nil {
		t.Fatalf("device plugin resources %v not advertised: %v (%s)\n%s", want, err, why, describeRelease(ctx, c, ns))
	}
	var slices []string
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err != nil {
			return false, err
		}
		slices = slices[:0]
		for _, s := range list.Items {
			if s.Spec.NodeName != nil && *s.Spec.NodeName == c.NodeName {
				for _, d := range s.Spec.Devices {
					slices = append(slices, d.Name)
				}
			}
		}
		return len(slices) == 4, nil
	})
	if err != nil {
		t.Fatalf("ResourceSlices: %v (devices %v)\n%s", err, slices, describeRelease(ctx, c, ns))
	}
	t.Logf("registered %s after install: %v and DRA devices %v", time.Since(t1).Round(100*time.Millisecond), want, slices)

	// The chart's DeviceClasses exist, owned by the release.
	for _, dc := range []string{"gpu.tessera.dev", "mig.tessera.dev", "time-sliced.gpu.tessera.dev", "shared.gpu.tessera.dev"} {
		got, err := c.Client().ResourceV1().DeviceClasses().Get(ctx, dc, metav1.GetOptions{})
		if err != nil || got.Annotations["meta.helm.sh/release-name"] != release {
			t.Errorf("DeviceClass %s: %v, annotations %v", dc, err, got.GetAnnotations())
		}
	}

	// A device plugin workload and a DRA workload get their GPUs.
	t.Run("ExtendedResource", func(t *testing.T) {
		pod := harness.BusyboxPod(ns, "dp-user", "sh", "-c", `ls /dev/nvidia* && echo "visible=$NVIDIA_VISIBLE_DEVICES"`)
		pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{"nvidia.com/gpu": resource.MustParse("1")}
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodSucceeded); err != nil {
			t.Fatalf("%v\n%s\n%s", err, c.DescribePod(ctx, ns, pod.Name), describeRelease(ctx, c, ns))
		}
		out, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("pod output:\n%s", out)
		nodes := regexp.MustCompile(`(?m)^/dev/nvidia([0-9]+)$`).FindAllStringSubmatch(out, -1)
		if len(nodes) != 1 || (nodes[0][1] != "0" && nodes[0][1] != "1") {
			t.Errorf("the container sees GPU nodes %v, want one of the device plugin's whole GPUs 0-1", nodes)
		}
	})
	t.Run("ResourceClaim", func(t *testing.T) {
		tmpl := classClaimTemplate(ns, "whole-gpu", "gpu.tessera.dev")
		if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
			t.Fatal(err)
		}
		pod := claimPod(ns, "dra-user", tmpl.Name, "sh", "-c", `ls /dev/nvidia*`)
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		claim := podClaim(t, ctx, c, ns, pod.Name)
		res := claim.Status.Allocation.Devices.Results
		if len(res) != 1 || res[0].Driver != dra.DriverName || res[0].Pool != c.NodeName {
			t.Fatalf("allocation %+v", res)
		}
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodSucceeded); err != nil {
			t.Fatalf("%v\n%s\n%s", err, c.DescribePod(ctx, ns, pod.Name), describeRelease(ctx, c, ns))
		}
		out, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
		if err != nil {
			t.Fatal(err)
		}
		minor := strings.TrimPrefix(res[0].Device, "gpu-")
		nodes := regexp.MustCompile(`(?m)^/dev/nvidia([0-9]+)$`).FindAllStringSubmatch(out, -1)
		if len(nodes) != 1 || nodes[0][1] != minor {
			t.Errorf("the container sees GPU nodes %v, want only /dev/nvidia%s (output %q)", nodes, minor, out)
		}
	})

	// The webhook, with the certificate the chart made, refuses a bad profile and bad claim
	// parameters at admission, naming the field.
	t.Run("Webhook", func(t *testing.T) {
		bad := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bad-profiles",
			Labels: map[string]string{"tessera.dev/sharing-profiles": "true"}},
			Data: map[string]string{"default": "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 0}}\n"}}
		_, err := c.Client().CoreV1().ConfigMaps(ns).Create(ctx, bad, metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "denied the request") || !strings.Contains(err.Error(), "replicas") {
			t.Errorf("bad profile ConfigMap: %v, want a denial naming replicas", err)
		}
		claim := &resourcev1.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "bad-params"},
			Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
				Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: &resourcev1.ExactDeviceRequest{DeviceClassName: "gpu.tessera.dev"}}},
				Config: []resourcev1.DeviceClaimConfiguration{{Requests: []string{"gpu"}, DeviceConfiguration: resourcev1.DeviceConfiguration{
					Opaque: &resourcev1.OpaqueDeviceConfiguration{Driver: dra.DriverName, Parameters: runtime.RawExtension{Raw: []byte(`{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":150}}}`)}},
				}}},
			}}}
		_, err = c.Client().ResourceV1().ResourceClaims(ns).Create(ctx, claim, metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "denied the request") {
			t.Errorf("claim with bad parameters: %v, want a denial", err)
		} else {
			t.Logf("denied: %v", err)
		}
	})

	// Node-scoped writes: with its own pod-bound token, the kubelet plugin may write its node's
	// ResourceSlices but not another node's, and the device plugin may set its GPU labels on its
	// own Node but no other label.
	t.Run("NodeScopedPolicies", func(t *testing.T) {
		as := func(sa, component string) kubernetes.Interface {
			pods, err := c.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
			if err != nil || len(pods.Items) != 1 {
				t.Fatalf("pods of %s: %v %d", component, err, len(pods.Items))
			}
			p := pods.Items[0]
			tr, err := c.Client().CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
				BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
			}}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			cfg := c.RESTConfig()
			cfg.BearerToken, cfg.BearerTokenFile = tr.Status.Token, ""
			cfg.Username, cfg.Password, cfg.CertFile, cfg.KeyFile, cfg.CertData, cfg.KeyData = "", "", "", "", nil, nil
			cs, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				t.Fatal(err)
			}
			return cs
		}
		kp := as("tessera-kubelet-plugin", "kubelet-plugin")
		slice := func(node string) *resourcev1.ResourceSlice {
			return &resourcev1.ResourceSlice{ObjectMeta: metav1.ObjectMeta{GenerateName: "policy-test-"},
				Spec: resourcev1.ResourceSliceSpec{Driver: dra.DriverName, NodeName: ptr.To(node),
					Pool: resourcev1.ResourcePool{Name: "policy-test-" + node, ResourceSliceCount: 1}}}
		}
		_, err := kp.ResourceV1().ResourceSlices().Create(ctx, slice("some-other-node"), metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "may not write a ResourceSlice of node") {
			t.Errorf("kubelet plugin writing another node's slice: %v, want the policy's denial", err)
		}
		own, err := kp.ResourceV1().ResourceSlices().Create(ctx, slice(c.NodeName), metav1.CreateOptions{})
		if err != nil {
			t.Errorf("kubelet plugin writing its own node's slice: %v", err)
		} else {
			_ = c.Client().ResourceV1().ResourceSlices().Delete(ctx, own.Name, metav1.DeleteOptions{})
		}
		foreign := slice(c.NodeName)
		foreign.Spec.Driver = "gpu.nvidia.com"
		if _, err := kp.ResourceV1().ResourceSlices().Create(ctx, foreign, metav1.CreateOptions{}); err == nil || !strings.Contains(err.Error(), "only write ResourceSlices of its own driver") {
			t.Errorf("kubelet plugin writing another driver's slice: %v, want the policy's denial", err)
		}
		if _, err := kp.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); err == nil {
			t.Error("the kubelet plugin may list Secrets")
		}
		dp := as("tessera-device-plugin", "device-plugin")
		patch := func(labels string) error {
			_, err := dp.CoreV1().Nodes().Patch(ctx, c.NodeName, types.MergePatchType, []byte(`{"metadata":{"labels":{`+labels+`}}}`), metav1.PatchOptions{})
			return err
		}
		node, err := c.Client().CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		replicas := node.Labels["nvidia.com/gpu.replicas"]
		if err := patch(`"nvidia.com/gpu.replicas":"99"`); err != nil {
			t.Errorf("device plugin setting its GPU label on its node: %v", err)
		}
		if err := patch(`"nvidia.com/gpu.replicas":"` + replicas + `"`); err != nil {
			t.Errorf("device plugin restoring its GPU label: %v", err)
		}
		if err := patch(`"node-role.kubernetes.io/control-plane":""`); err == nil || !strings.Contains(err.Error(), "may only change its own labels") {
			t.Errorf("device plugin setting another label: %v, want the policy's denial", err)
			_ = patch(`"node-role.kubernetes.io/control-plane":null`)
		}
	})

	// A chart upgrade rolls the DRA plugin seamlessly: the new pod starts beside the old one
	// (maxSurge 1, its own sockets by pod UID, the metrics port taken over when the old pod frees
	// it); a pod that holds a claim keeps running through it, and the new instance unprepares the
	// claim when the pod goes.
	t.Run("SeamlessUpgrade", func(t *testing.T) {
		claim := classClaim(ns, "held-across-upgrade", "gpu.tessera.dev")
		created, err := c.CreateResourceClaim(ctx, claim)
		if err != nil {
			t.Fatal(err)
		}
		pod := standaloneClaimPod(ns, "holder", claim.Name, "sh", "-c", "ls /dev/nvidia* && sleep 3600")
		if _, err := c.CreatePod(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
			t.Fatalf("%v\n%s", err, c.DescribePod(ctx, ns, pod.Name))
		}
		checkpoint := filepath.Join(state, "dra", "checkpoints", string(created.UID)+".json")
		if _, err := os.Stat(checkpoint); err != nil {
			t.Fatalf("the claim's checkpoint before the upgrade: %v", err)
		}
		oldPods, err := c.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=kubelet-plugin"})
		if err != nil || len(oldPods.Items) != 1 {
			t.Fatalf("kubelet plugin pods: %v %v", err, oldPods)
		}
		oldUID := oldPods.Items[0].UID

		// Any change to the pod template rolls the DaemonSet; here the log verbosity.
		upFile := filepath.Join(t.TempDir(), "upgrade.json")
		if err := os.WriteFile(upFile, []byte(`{"logVerbosity": 3}`), 0o644); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		out, err := chart(ctx, "upgrade", "--kubeconfig", c.Kubeconfig, "--namespace", ns, "--release", release,
			"-f", filepath.Join("deployments", "helm", "tessera", "values-sim.yaml"), "-f", valuesFile, "-f", upFile)
		if err != nil {
			t.Fatalf("upgrade: %v\n%s", err, out)
		}
		sawBoth := false
		err = harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
			pods, err := c.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=kubelet-plugin"})
			if err != nil {
				return false, err
			}
			if len(pods.Items) == 2 {
				sawBoth = true
			}
			if len(pods.Items) != 1 || pods.Items[0].UID == oldUID {
				return false, nil
			}
			p := pods.Items[0]
			for _, cs := range p.Status.ContainerStatuses {
				if !cs.Ready {
					return false, nil
				}
			}
			return p.Status.Phase == corev1.PodRunning, nil
		})
		if err != nil {
			t.Fatalf("the DRA plugin did not roll: %v\n%s", err, describeRelease(ctx, c, ns))
		}
		t.Logf("%s; DRA plugin rolled in %s (both pods seen at once: %v)", strings.TrimSpace(out), time.Since(t0).Round(100*time.Millisecond), sawBoth)
		if !sawBoth {
			t.Error("the new DRA plugin pod never ran beside the old one (maxSurge)")
		}
		if p, err := c.Client().CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); err != nil || p.Status.Phase != corev1.PodRunning {
			t.Fatalf("the claim's pod after the upgrade: %v %v", err, p.Status.Phase)
		}
		// The new instance serves: its metrics port taken over, the node's slices still there, and
		// the claim unprepared by it when the pod goes.
		if err := harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
			page, err := harness.GetURL(ctx, fmt.Sprintf("http://127.0.0.1:%d/metrics", kpPort))
			return err == nil && strings.Contains(page, "tessera_"), nil
		}); err != nil {
			t.Errorf("the new DRA plugin serves no metrics: %v\n%s", err, describeRelease(ctx, c, ns))
		}
		zero := int64(0)
		if err := c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		if err := harness.Poll(ctx, 200*time.Millisecond, func(context.Context) (bool, error) {
			_, err := os.Stat(checkpoint)
			return os.IsNotExist(err), nil
		}); err != nil {
			t.Fatalf("the claim was not unprepared after the upgrade (%s still there): %v\n%s", checkpoint, err, describeRelease(ctx, c, ns))
		}
	})

	// The daemons serve /metrics from their pods (host network here).
	for _, port := range []int{dpPort, kpPort} {
		page, err := harness.GetURL(ctx, fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
		if err != nil || !strings.Contains(page, "tessera_device_allocated") {
			t.Errorf("metrics on port %d: %v (%d bytes)", port, err, len(page))
		}
	}
}

// describeRelease says what the release's pods are doing, with their logs.
func describeRelease(ctx context.Context, c *harness.Cluster, ns string) string {
	var b strings.Builder
	pods, err := c.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=tessera"})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		b.WriteString(c.DescribePod(ctx, ns, p.Name))
		for _, ct := range p.Spec.Containers {
			logs, err := c.PodLogs(ctx, ns, p.Name, ct.Name)
			fmt.Fprintf(&b, "--- logs %s/%s (%v):\n%s\n", p.Name, ct.Name, err, tail(logs, 30))
		}
	}
	dss, _ := c.Client().AppsV1().DaemonSets(ns).List(ctx, metav1.ListOptions{})
	for _, ds := range dss.Items {
		fmt.Fprintf(&b, "DaemonSet %s: %s\n", ds.Name, dsStatus(ds))
	}
	return b.String()
}

func dsStatus(ds appsv1.DaemonSet) string {
	s := ds.Status
	return fmt.Sprintf("desired %d current %d ready %d available %d", s.DesiredNumberScheduled, s.CurrentNumberScheduled, s.NumberReady, s.NumberAvailable)
}
