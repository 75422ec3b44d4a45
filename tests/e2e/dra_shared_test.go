//go:build e2e

package e2e

import (
	"context"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// Two pods share GPU 0 by memory on the real kubelet and scheduler: each claim asks for its own
// memory and compute, the scheduler puts both on the one shared device, and each container gets
// its own MPS limits; the MPS daemon was raised to the larger claim and quits after the last pod.
func TestDRASharedGPUByMemory(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 4*time.Minute)
	createShippedClasses(t, ctx, c)
	d := startDRADriverWith(t, ctx, c, "shared", 2)

	share := func(name, mem, pct string) {
		tmpl := &resourcev1.ResourceClaimTemplate{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
				Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: &resourcev1.ExactDeviceRequest{
					DeviceClassName: "shared.gpu.tessera.dev",
					Selectors:       []resourcev1.DeviceSelector{{CEL: &resourcev1.CELDeviceSelector{Expression: `device.attributes["gpu.tessera.dev"].isolation == "mps"`}}},
					Capacity: &resourcev1.CapacityRequirements{Requests: map[resourcev1.QualifiedName]resource.Quantity{
						"memory": resource.MustParse(mem), "computePercent": resource.MustParse(pct)}},
				}}},
			}}},
		}
		if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
			t.Fatal(err)
		}
	}
	share("small", "10Gi", "20")
	share("large", "20Gi", "40")
	script := `echo "M=$CUDA_MPS_PINNED_DEVICE_MEM_LIMIT T=$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE P=$CUDA_MPS_PIPE_DIRECTORY"; test -d /tmp/nvidia-mps && echo pipe-mounted; ls /dev/nvidia*; sleep 3600`
	pods := map[string]string{"small": `(?m)^M=0=10240M T=20 P=/tmp/nvidia-mps$`, "large": `(?m)^M=0=20480M T=40 P=/tmp/nvidia-mps$`}
	for _, name := range []string{"small", "large"} {
		if _, err := c.CreatePod(ctx, claimPod(ns, "share-"+name, name, "sh", "-c", script)); err != nil {
			t.Fatal(err)
		}
	}
	shares := map[string]bool{}
	for _, name := range []string{"small", "large"} {
		pod := "share-" + name
		claim := podClaim(t, ctx, c, ns, pod)
		r := claim.Status.Allocation.Devices.Results[0]
		if r.Device != "gpu-0" || r.ShareID == nil {
			t.Fatalf("%s allocated %s (share %v), want a share of gpu-0", pod, r.Device, r.ShareID)
		}
		shares[string(*r.ShareID)] = true
		if _, err := c.WaitForPodPhase(ctx, ns, pod, corev1.PodRunning); err != nil {
			t.Fatalf("%v\n%s\nplugin log:\n%s", err, c.DescribePod(ctx, ns, pod), d.hp.Logs())
		}
		var out string
		if err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
			o, err := c.ReadContainerOutput(ctx, ns, pod, "main")
			out = o
			return err == nil && strings.Contains(o, "/dev/nvidia"), nil
		}); err != nil {
			t.Fatalf("%s output: %v\n%s", pod, err, out)
		}
		t.Logf("%s:\n%s", pod, out)
		for _, want := range []string{pods[name], `(?m)^pipe-mounted$`, `(?m)^/dev/nvidia0$`} {
			if !regexp.MustCompile(want).MatchString(out) {
				t.Errorf("%s: output does not match %s", pod, want)
			}
		}
	}
	if len(shares) != 2 {
		t.Errorf("the two claims got share IDs %v", shares)
	}
	lib, node, err := d.nvml.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Shutdown()
	told, err := node.Host().Recorded(host.ToolMPSControl)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"set_default_device_pinned_mem_limit 0 20480M", "set_default_active_thread_percentage 40"} {
		if !slices.ContainsFunc(told, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("the MPS daemon was not told %q: %q", want, told)
		}
	}
	if g, err := lib.GPU(0); err != nil || g.ComputeMode != nvmlib.ComputeModeExclusiveProcess {
		t.Errorf("GPU 0 compute mode while shared through MPS: %v %v", g.ComputeMode, err)
	}

	zero := int64(0)
	for _, name := range []string{"small", "large"} {
		_ = c.Client().CoreV1().Pods(ns).Delete(ctx, "share-"+name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		g, err := lib.GPU(0)
		return err == nil && g.ComputeMode == nvmlib.ComputeModeDefault && len(d.checkpoints(t)) == 0, nil
	}); err != nil {
		t.Fatalf("after the pods: checkpoints %v\n%s", d.checkpoints(t), d.hp.Logs())
	}
	if told, _ = node.Host().Recorded(host.ToolMPSControl); !slices.ContainsFunc(told, func(s string) bool { return strings.TrimSpace(s) == "stdin: quit" }) {
		t.Errorf("the MPS daemon was not stopped after the last claim: %q", told)
	}
}
