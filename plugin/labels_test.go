package plugin_test

import (
	"maps"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tessera-gpu/tessera/plugin"
)

// Node labels with NVIDIA's names follow what is served; labels of others are left alone.
func TestNodeLabels(t *testing.T) {
	client := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{"keep": "me"}}})
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 30*time.Second)
	p := e.start("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n",
		plugin.WithNodeLabels(plugin.NewKubeLabeler(client, "n1")))
	labels := func() map[string]string {
		n, err := client.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return n.Labels
	}
	want := map[string]string{
		"keep":                            "me",
		"nvidia.com/gpu.product":          "NVIDIA-H100-80GB-HBM3-SHARED",
		"nvidia.com/gpu.count":            "8",
		"nvidia.com/gpu.memory":           "81559",
		"nvidia.com/gpu.replicas":         "4",
		"nvidia.com/gpu.sharing-strategy": "time-slicing",
		"nvidia.com/mig.strategy":         "none",
		"nvidia.com/mig.capable":          "true",
	}
	if got := labels(); !maps.Equal(got, want) {
		t.Errorf("labels:\n%v\nwant\n%v", got, want)
	}
	if err := p.Update(ctx, e.resolve("version: v1\nflags: {migStrategy: mixed}\n")); err != nil {
		t.Fatal(err)
	}
	want["nvidia.com/gpu.product"] = "NVIDIA-H100-80GB-HBM3"
	want["nvidia.com/gpu.replicas"] = "1"
	want["nvidia.com/gpu.sharing-strategy"] = "none"
	want["nvidia.com/mig.strategy"] = "mixed"
	if got := labels(); !maps.Equal(got, want) {
		t.Errorf("labels after the change:\n%v\nwant\n%v", got, want)
	}
}
