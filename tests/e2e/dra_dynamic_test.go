//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// Dynamic MIG on the real kubelet and scheduler: a pod asks for a 3g.40gb; the scheduler picks a
// placement of GPU 0 (mode mig-dynamic) from our slices; NodePrepareResources creates the MIG device,
// the container sees its capability nodes; deleting the pod destroys it.
func TestDRADynamicMIGOnRealKubelet(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 4*time.Minute)
	createShippedClasses(t, ctx, c)
	d := startDRADriverWith(t, ctx, c, "dynamic", 26+1)

	migs := func() []nvmlib.MigDevice {
		lib, _, err := d.nvml.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer lib.Shutdown()
		m, err := lib.MigDevices(0)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := migs(); len(m) != 0 {
		t.Fatalf("MIG devices before any claim: %+v", m)
	}
	tmpl := &resourcev1.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "mig-3g-40gb"},
		Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
			Requests: []resourcev1.DeviceRequest{{Name: "mig", Exactly: &resourcev1.ExactDeviceRequest{
				DeviceClassName: "mig.tessera.dev",
				Selectors:       []resourcev1.DeviceSelector{{CEL: &resourcev1.CELDeviceSelector{Expression: `device.attributes["gpu.tessera.dev"].profile == "3g.40gb"`}}},
			}}},
		}}},
	}
	if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
		t.Fatal(err)
	}
	pod := claimPod(ns, "dynamic-mig", tmpl.Name, "sh", "-c", "ls -l /dev/nvidia0 /dev/nvidia-caps/ && echo listed && sleep 3600")
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatal(err)
	}
	claim := podClaim(t, ctx, c, ns, pod.Name)
	dev := claim.Status.Allocation.Devices.Results[0].Device
	if !regexp.MustCompile(`^gpu-0-mig-3g-40gb-[04]$`).MatchString(dev) {
		t.Fatalf("allocated %s", dev)
	}
	if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodRunning); err != nil {
		t.Fatalf("%v\n%s\nplugin log:\n%s", err, c.DescribePod(ctx, ns, pod.Name), d.hp.Logs())
	}
	m := migs()
	if len(m) != 1 || m[0].Profile != "3g.40gb" || fmt.Sprintf("gpu-0-mig-3g-40gb-%d", m[0].Placement.Start) != dev {
		t.Fatalf("MIG devices while the pod runs: %+v (allocated %s)", m, dev)
	}
	var out string
	if err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		o, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
		out = o
		return err == nil && strings.Contains(o, "listed"), nil
	}); err != nil {
		t.Fatalf("pod output: %v\n%s", err, out)
	}
	t.Logf("pod output:\n%s", out)
	gi, ci := host.GIMinor(0, m[0].GI), host.CIMinor(0, m[0].GI, m[0].CI)
	for _, want := range []string{
		`(?m)^crw-rw-rw- .* 195, +0 .*/dev/nvidia0$`,
		fmt.Sprintf(`(?m)^cr--r--r-- .* 508, +%d .*nvidia-cap%d$`, gi, gi),
		fmt.Sprintf(`(?m)^cr--r--r-- .* 508, +%d .*nvidia-cap%d$`, ci, ci),
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("the container does not see its MIG device: no match for %s", want)
		}
	}
	if n := len(regexp.MustCompile(`(?m)nvidia-cap\d+$`).FindAllString(out, -1)); n != 2 {
		t.Errorf("the container sees %d capability nodes, want its MIG device's 2", n)
	}

	zero := int64(0)
	if err := c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		return len(migs()) == 0 && len(d.checkpoints(t)) == 0 && len(d.claimSpecs(t)) == 0, nil
	}); err != nil {
		t.Fatalf("after the pod: MIG devices %+v, checkpoints %v, specs %v\n%s", migs(), d.checkpoints(t), d.claimSpecs(t), d.hp.Logs())
	}
}
