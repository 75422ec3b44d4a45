//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// The DRA control plane works without any driver process: the test publishes a ResourceSlice
// for a simulated node itself; the resourceclaim controller makes a claim from the pod's
// template and the real scheduler allocates one of the slice's devices and binds the pod there.
func TestDRAAllocationOnSimulatedNode(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 2*time.Minute)
	const (
		driver = "e2e.tessera.dev"
		node   = "sim-dra-0"
		class  = "e2e-tessera-gpu"
	)
	if err := c.AddSimulatedNodes(ctx, node); err != nil {
		t.Fatal(err)
	}
	rs := c.Client().ResourceV1()
	var devices []resourcev1.Device
	for i := 0; i < 4; i++ {
		devices = append(devices, resourcev1.Device{
			Name: fmt.Sprintf("gpu-%d", i),
			Attributes: map[resourcev1.QualifiedName]resourcev1.DeviceAttribute{
				"index": {IntValue: ptr.To(int64(i))},
			},
		})
	}
	slice := &resourcev1.ResourceSlice{
		ObjectMeta: metav1.ObjectMeta{Name: node + "-" + driver},
		Spec: resourcev1.ResourceSliceSpec{
			Driver:   driver,
			NodeName: ptr.To(node),
			Pool:     resourcev1.ResourcePool{Name: node, Generation: 1, ResourceSliceCount: 1},
			Devices:  devices,
		},
	}
	if _, err := rs.ResourceSlices().Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create ResourceSlice: %v", err)
	}
	if _, err := c.CreateDeviceClass(ctx, &resourcev1.DeviceClass{
		ObjectMeta: metav1.ObjectMeta{Name: class},
		Spec: resourcev1.DeviceClassSpec{Selectors: []resourcev1.DeviceSelector{{
			CEL: &resourcev1.CELDeviceSelector{Expression: fmt.Sprintf("device.driver == %q", driver)},
		}}},
	}); err != nil {
		t.Fatalf("create DeviceClass: %v", err)
	}
	t.Cleanup(func() {
		bg := context.Background()
		_ = rs.ResourceSlices().Delete(bg, slice.Name, metav1.DeleteOptions{})
		_ = rs.DeviceClasses().Delete(bg, class, metav1.DeleteOptions{})
		_ = c.DeleteNodes(bg, node)
	})

	tmpl := &resourcev1.ResourceClaimTemplate{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "two-gpus"},
		Spec: resourcev1.ResourceClaimTemplateSpec{Spec: resourcev1.ResourceClaimSpec{
			Devices: resourcev1.DeviceClaim{Requests: []resourcev1.DeviceRequest{{
				Name: "gpus",
				Exactly: &resourcev1.ExactDeviceRequest{
					DeviceClassName: class,
					AllocationMode:  resourcev1.DeviceAllocationModeExactCount,
					Count:           2,
				},
			}}},
		}},
	}
	if _, err := c.CreateResourceClaimTemplate(ctx, tmpl); err != nil {
		t.Fatalf("create ResourceClaimTemplate: %v", err)
	}
	pod := harness.BusyboxPod(ns, "wants-gpus", "true")
	pod.Spec.NodeSelector = map[string]string{corev1.LabelHostname: node}
	pod.Spec.ResourceClaims = []corev1.PodResourceClaim{{Name: "gpus", ResourceClaimTemplateName: ptr.To(tmpl.Name)}}
	pod.Spec.Containers[0].Resources.Claims = []corev1.ResourceClaim{{Name: "gpus"}}
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatalf("create pod: %v", err)
	}

	var claimName string
	err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		p, err := c.Client().CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, s := range p.Status.ResourceClaimStatuses {
			if s.Name == "gpus" && s.ResourceClaimName != nil {
				claimName = *s.ResourceClaimName
			}
		}
		return p.Spec.NodeName == node && claimName != "", nil
	})
	if err != nil {
		t.Fatalf("pod not scheduled onto %s with a generated claim: %v\n%s", node, err, c.DescribePod(ctx, ns, pod.Name))
	}
	claim, err := rs.ResourceClaims(ns).Get(ctx, claimName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if claim.Status.Allocation == nil {
		t.Fatalf("claim %s not allocated", claimName)
	}
	results := claim.Status.Allocation.Devices.Results
	if len(results) != 2 {
		t.Fatalf("allocated %d devices, want 2: %+v", len(results), results)
	}
	seen := map[string]bool{}
	for _, r := range results {
		if r.Driver != driver || r.Pool != node || seen[r.Device] {
			t.Errorf("unexpected allocation result %+v", r)
		}
		seen[r.Device] = true
	}
	zero := int64(0)
	_ = c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
}
