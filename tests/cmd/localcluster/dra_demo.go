package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// The demo node's sharing profile: GPU 0 cut into MIG devices on demand, GPU 1 shared by memory and
// compute through MPS, GPUs 2-3 whole; the rest to no one.
const demoProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: none}
  rules:
    - {name: mig-on-demand, selector: {indices: [0]}, owner: dra, mode: mig-dynamic}
    - {name: shared-mps, selector: {indices: [1]}, owner: dra, mode: shared, shared: {isolation: mps}}
    - {name: whole, selector: {indices: [2, 3]}, owner: dra, mode: whole}
`

const demoPlugin = "demo-tessera-kubelet-plugin"

// runDRADemo runs Tessera's DRA driver on a simulated DGX H100 for the local node and shows a MIG
// device made for a pod and destroyed after it, and two pods sharing one GPU by memory.
func runDRADemo(ctx context.Context, c *harness.Cluster, binDir string) error {
	bin, err := filepath.Abs(filepath.Join(binDir, "tessera-kubelet-plugin"))
	if err != nil {
		return err
	}
	if _, err := os.Stat(bin); err != nil {
		fmt.Printf("note: %s is not there (yet): build it with `make build`. Skipping the DRA part.\n", bin)
		return nil
	}
	// A fresh simulated node and driver state every time; an earlier demo's driver stops first.
	c.StopHostProcess(demoPlugin, 10*time.Second)
	dir := filepath.Join(c.StateDir, "demo")
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	simDir := filepath.Join(dir, "sim")
	mpsRoot := "/run/tessera-demo/mps" // MPS socket paths must stay under 108 bytes
	_ = os.RemoveAll(mpsRoot)
	for _, d := range []string{dir, simDir, mpsRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	profile := filepath.Join(dir, "profile.yaml")
	if err := os.WriteFile(profile, []byte(demoProfile), 0o644); err != nil {
		return err
	}
	if err := applyDeviceClasses(ctx, c); err != nil {
		return err
	}
	metricsAddr, err := freeLocalAddr()
	if err != nil {
		return err
	}
	t0 := time.Now()
	hp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{Name: demoPlugin, Path: bin, Args: []string{
		"--metrics-address=" + metricsAddr, "--telemetry-interval=1s",
		"--nvml=sim:dgx-h100", "--sim-state-dir=" + simDir, "--node-name=" + c.NodeName,
		"--kubelet-registry-dir=" + c.PluginRegistryDir, "--kubelet-plugins-dir=" + c.PluginsDir,
		"--cdi-dir=" + c.CDIDir, "--state-dir=" + filepath.Join(dir, "state"), "--mps-root=" + mpsRoot,
		"--config-file=" + profile,
	}})
	if err != nil {
		return err
	}
	fmt.Printf("sharing profile (%s):\n", profile)
	for _, l := range strings.Split(strings.TrimSpace(demoProfile), "\n") {
		fmt.Printf("  | %s\n", l)
	}
	var devices, counters int
	err = harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		if exited, err := hp.Exited(); exited {
			return false, fmt.Errorf("the plugin exited: %v\n%s", err, hp.Logs())
		}
		list, err := c.Client().ResourceV1().ResourceSlices().List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=gpu.tessera.dev"})
		if err != nil {
			return false, err
		}
		devices, counters = 0, 0
		for _, s := range list.Items {
			devices += len(s.Spec.Devices)
			counters += len(s.Spec.SharedCounters)
		}
		return devices == 1+25+1+2 && counters == 1, nil
	})
	if err != nil {
		return fmt.Errorf("ResourceSlices: %w\n%s", err, hp.Logs())
	}
	fmt.Printf("driver up, %d devices and %d counter set (GPU 0's) published in %s (GPU 0: the whole GPU and 25 MIG placements; GPU 1: one shared device; GPUs 2-3 whole)\n",
		devices, counters, time.Since(t0).Round(time.Millisecond))
	opts := backend.Options{NVML: "sim:dgx-h100", SimStateDir: simDir}

	section("A pod asks for a 3g.40gb MIG device; the driver makes it when the kubelet prepares the claim")
	if err := template(ctx, c, "demo-mig-3g-40gb", "mig.tessera.dev", `device.attributes["gpu.tessera.dev"].profile == "3g.40gb"`, nil); err != nil {
		return err
	}
	pod, out, claim, err := runClaimPod(ctx, c, "demo-mig", "demo-mig-3g-40gb", `ls /dev/nvidia0 /dev/nvidia-caps/*; echo ready; sleep 600`)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, hp.Logs())
	}
	fmt.Printf("the scheduler allocated %s; inside the pod:\n", claim)
	printIndented(out)
	if err := showMIG(opts, "MIG devices on GPU 0 while the pod runs"); err != nil {
		return err
	}
	if err := deletePod(ctx, c, pod); err != nil {
		return err
	}
	if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		n, err := migCount(opts)
		return err == nil && n == 0, err
	}); err != nil {
		return fmt.Errorf("MIG device not destroyed after the pod: %w", err)
	}
	fmt.Println("pod deleted: the kubelet unprepared the claim and the driver destroyed the MIG device (GPU 0 has none)")

	section("Two pods share GPU 1 by memory and compute; MPS holds each to its share")
	for _, s := range []struct{ name, mem, pct string }{{"demo-share-10g", "10Gi", "20"}, {"demo-share-20g", "20Gi", "40"}} {
		if err := template(ctx, c, s.name, "shared.gpu.tessera.dev", "", map[resourcev1.QualifiedName]resource.Quantity{
			"memory": resource.MustParse(s.mem), "computePercent": resource.MustParse(s.pct)}); err != nil {
			return err
		}
		pod, out, claim, err := runClaimPod(ctx, c, s.name, s.name,
			`echo "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=$CUDA_MPS_PINNED_DEVICE_MEM_LIMIT CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"; echo ready; sleep 600`)
		if err != nil {
			return fmt.Errorf("%w\n%s", err, hp.Logs())
		}
		fmt.Printf("pod %s (claim asks memory %s, computePercent %s) got %s:\n", pod, s.mem, s.pct, claim)
		printIndented(out)
		defer func() { _ = deletePod(context.WithoutCancel(ctx), c, pod) }()
	}
	fmt.Println("both pods run on one GPU; the MPS daemon enforces the larger share for every client, and each")
	fmt.Println("container's own limit below it (docs/sharing.md says which holds at which level)")

	section("Who holds what: the driver's /metrics (docs/metrics.md)")
	var lines []string
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		page, err := harness.GetURL(ctx, "http://"+metricsAddr+"/metrics")
		if err != nil {
			return false, nil
		}
		lines = lines[:0]
		for _, l := range strings.Split(page, "\n") {
			if (strings.HasPrefix(l, "tessera_device_allocated{") || strings.HasPrefix(l, "tessera_device_memory_limit_bytes{")) &&
				strings.Contains(l, `pod="demo-share-`) {
				lines = append(lines, l)
			}
		}
		return len(lines) == 4, nil
	})
	if err != nil {
		return fmt.Errorf("metrics never named both pods: %w\n%s", err, strings.Join(lines, "\n"))
	}
	printIndented(strings.Join(lines, "\n"))
	fmt.Println("each share of GPU 1 is named with its claim and pod and its memory limit; the same endpoint has")
	fmt.Println("GPU readings, per-pod memory and utilization, and idle holders (condition Idle on the claim)")
	return nil
}

// freeLocalAddr returns a loopback address with a free port.
func freeLocalAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func printIndented(out string) {
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if l != "ready" {
			fmt.Printf("  | %s\n", l)
		}
	}
}

func applyDeviceClasses(ctx context.Context, c *harness.Cluster) error {
	data, err := os.ReadFile(filepath.Join("deployments", "dra", "deviceclasses.yaml"))
	if err != nil {
		return fmt.Errorf("the DeviceClasses (run the demo from the repository root): %w", err)
	}
	for _, doc := range bytes.Split(data, []byte("\n---\n")) {
		var dc resourcev1.DeviceClass
		if err := yaml.UnmarshalStrict(doc, &dc); err != nil {
			return err
		}
		_ = c.Client().ResourceV1().DeviceClasses().Delete(ctx, dc.Name, metav1.DeleteOptions{})
		if _, err := c.CreateDeviceClass(ctx, &dc); err != nil {
			return fmt.Errorf("DeviceClass %s: %w", dc.Name, err)
		}
	}
	return nil
}

func template(ctx context.Context, c *harness.Cluster, name, class, cel string, capacity map[resourcev1.QualifiedName]resource.Quantity) error {
	req := &resourcev1.ExactDeviceRequest{DeviceClassName: class}
	if cel != "" {
		req.Selectors = []resourcev1.DeviceSelector{{CEL: &resourcev1.CELDeviceSelector{Expression: cel}}}
	}
	if capacity != nil {
		req.Capacity = &resourcev1.CapacityRequirements{Requests: capacity}
	}
	t := &resourcev1.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
			Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: req}}}}},
	}
	_ = c.Client().ResourceV1().ResourceClaimTemplates("default").Delete(ctx, name, metav1.DeleteOptions{})
	_, err := c.CreateResourceClaimTemplate(ctx, t)
	return err
}

// runClaimPod starts a pod with a claim from the template and waits until it printed "ready"; it
// returns the pod's name, its output and the allocated device.
func runClaimPod(ctx context.Context, c *harness.Cluster, name, tmpl, script string) (string, string, string, error) {
	pod := harness.BusyboxPod("default", name, "sh", "-c", script)
	pod.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "gpu", ResourceClaimTemplateName: ptr.To(tmpl)}}
	pod.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "gpu"}}
	if err := deletePod(ctx, c, name); err != nil {
		return "", "", "", err
	}
	if _, err := c.CreatePod(ctx, pod); err != nil {
		return "", "", "", err
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var out string
	err := harness.Poll(pctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		o, err := c.ReadContainerOutput(ctx, "default", name, "main")
		out = o
		return err == nil && strings.Contains(o, "ready"), nil
	})
	if err != nil {
		return "", "", "", fmt.Errorf("pod %s: %w\n%s", name, err, c.DescribePod(ctx, "default", name))
	}
	p, err := c.Client().CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", "", "", err
	}
	dev := "?"
	for _, s := range p.Status.ResourceClaimStatuses {
		if s.ResourceClaimName == nil {
			continue
		}
		if cl, err := c.Client().ResourceV1().ResourceClaims("default").Get(ctx, *s.ResourceClaimName, metav1.GetOptions{}); err == nil && cl.Status.Allocation != nil {
			r := cl.Status.Allocation.Devices.Results[0]
			dev = r.Device
			if r.ShareID != nil {
				dev += " (share " + string(*r.ShareID) + ")"
			}
		}
	}
	return name, regexp.MustCompile(`\r`).ReplaceAllString(out, ""), dev, nil
}

func deletePod(ctx context.Context, c *harness.Cluster, name string) error {
	zero := int64(0)
	err := c.Client().CoreV1().Pods("default").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, err := c.Client().CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

func migCount(o backend.Options) (int, error) {
	lib, _, err := o.Open()
	if err != nil {
		return 0, err
	}
	defer lib.Shutdown()
	m, err := lib.MigDevices(0)
	return len(m), err
}

func showMIG(o backend.Options, title string) error {
	lib, _, err := o.Open()
	if err != nil {
		return err
	}
	defer lib.Shutdown()
	m, err := lib.MigDevices(0)
	if err != nil {
		return err
	}
	if len(m) == 0 {
		return errors.New("no MIG device on GPU 0 while the pod runs")
	}
	fmt.Printf("%s (read through NVML on the simulated node):\n", title)
	for _, d := range m {
		fmt.Printf("  | %s  %s  placement %d:%d  GPU instance %d, compute instance %d, %d MiB, %d SMs\n",
			d.UUID, d.Profile, d.Placement.Start, d.Placement.Size, d.GI, d.CI, d.MemoryMiB, d.SMCount)
	}
	return nil
}
