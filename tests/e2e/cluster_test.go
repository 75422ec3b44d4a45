//go:build e2e

// End-to-end tests against a real local cluster: `make e2e`, or
//
//	go test -tags e2e -count=1 -timeout 80m -v ./tests/e2e/...
//
// See docs/testing.md for how the cluster is built and how to add a scenario.
package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// TestMain starts the local cluster for the package's tests and always tears it down
// (framework.Run).
func TestMain(m *testing.M) {
	os.Exit(framework.Run(m))
}

func randomSuffix(t *testing.T) string {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// The real node registers, becomes Ready and carries no not-ready taint.
func TestRealNodeReady(t *testing.T) {
	c := framework.Cluster(t)
	ctx := framework.Context(t, time.Minute)
	node, err := c.Client().CoreV1().Nodes().Get(ctx, harness.RealNodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get node %s: %v", harness.RealNodeName, err)
	}
	ready := false
	for _, cond := range node.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			ready = cond.Status == corev1.ConditionTrue
		}
	}
	if !ready {
		t.Errorf("node %s is not Ready: %+v", node.Name, node.Status.Conditions)
	}
	for _, taint := range node.Spec.Taints {
		if taint.Effect == corev1.TaintEffectNoSchedule || taint.Effect == corev1.TaintEffectNoExecute {
			t.Errorf("node %s has taint %s", node.Name, taint.ToString())
		}
	}
	if got := node.Status.NodeInfo.KubeletVersion; got != harness.KubernetesVersion {
		t.Errorf("kubelet version = %q, want %q", got, harness.KubernetesVersion)
	}
	if !strings.HasPrefix(node.Status.NodeInfo.ContainerRuntimeVersion, "containerd://2.") {
		t.Errorf("container runtime = %q, want containerd 2.x", node.Status.NodeInfo.ContainerRuntimeVersion)
	}
	for _, dir := range []string{c.PluginRegistryDir, c.CDIDir} {
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			t.Errorf("expected directory %s: %v", dir, err)
		}
	}
	// The kubelet's device plugin socket must show up in the cluster's DevicePluginDir (the
	// kubelet itself uses harness.HostDevicePluginDir, bind-mounted onto it).
	sock := filepath.Join(c.DevicePluginDir, "kubelet.sock")
	if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		st, err := os.Stat(sock)
		return err == nil && st.Mode()&os.ModeSocket != 0, nil
	}); err != nil {
		t.Errorf("kubelet device plugin socket %s: %v", sock, err)
	}
}

// A busybox pod runs echo on the real node; its output is read back from the kubelet's log files
// and through the apiserver, and must match exactly.
func TestBusyboxPodOutput(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 3*time.Minute)
	want := "tessera-e2e " + randomSuffix(t)
	pod := harness.BusyboxPod(ns, "echo", "echo", want)

	start := time.Now()
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	if _, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodSucceeded); err != nil {
		t.Fatalf("pod did not succeed: %v", err)
	}
	got, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
	if err != nil {
		t.Fatalf("read container output: %v", err)
	}
	t.Logf("pod created -> Succeeded -> output read in %s", time.Since(start).Round(time.Millisecond))
	if got != want+"\n" {
		t.Errorf("container output = %q, want %q", got, want+"\n")
	}
	logs, err := c.PodLogs(ctx, ns, pod.Name, "main")
	if err != nil {
		t.Fatalf("pod logs through the apiserver: %v", err)
	}
	if logs != want+"\n" {
		t.Errorf("pod logs = %q, want %q", logs, want+"\n")
	}
}

// A failing container is reported as Failed with its exit code, and WaitForPodPhase stops early.
func TestFailingPodReported(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 3*time.Minute)
	pod := harness.BusyboxPod(ns, "fail", "sh", "-c", "echo about to fail >&2; exit 3")
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	p, err := c.WaitForPodPhase(ctx, ns, pod.Name, corev1.PodFailed)
	if err != nil {
		t.Fatalf("pod did not fail: %v", err)
	}
	if n := len(p.Status.ContainerStatuses); n != 1 || p.Status.ContainerStatuses[0].State.Terminated == nil ||
		p.Status.ContainerStatuses[0].State.Terminated.ExitCode != 3 {
		t.Errorf("want exit code 3, got %+v", p.Status.ContainerStatuses)
	}
	out, err := c.ReadContainerOutput(ctx, ns, pod.Name, "main")
	if err != nil || out != "about to fail\n" {
		t.Errorf("output = %q, %v; want stderr line", out, err)
	}
	// Waiting for Succeeded on a Failed pod must return an error at once, not at the deadline.
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	t0 := time.Now()
	if _, err := c.WaitForPodPhase(wctx, ns, pod.Name, corev1.PodSucceeded); err == nil {
		t.Errorf("WaitForPodPhase(Succeeded) on a failed pod returned no error")
	} else if time.Since(t0) > 10*time.Second {
		t.Errorf("WaitForPodPhase took %s to notice the pod had failed", time.Since(t0))
	}
}

// Simulated nodes are Ready, untainted and used by the real scheduler; their pods stay Pending.
func TestSimulatedNodesSchedule(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 2*time.Minute)
	names := []string{"sim-sched-0", "sim-sched-1"}
	if err := c.AddSimulatedNodes(ctx, names...); err != nil {
		t.Fatalf("add simulated nodes: %v", err)
	}
	t.Cleanup(func() { _ = c.DeleteNodes(context.Background(), names...) })
	for _, n := range names {
		node, err := c.Client().CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(node.Spec.Taints) != 0 {
			t.Errorf("simulated node %s has taints %v", n, node.Spec.Taints)
		}
	}
	pod := harness.BusyboxPod(ns, "on-sim", "true")
	pod.Spec.NodeSelector = map[string]string{corev1.LabelHostname: names[1]}
	if _, err := c.CreatePod(ctx, pod); err != nil {
		t.Fatal(err)
	}
	err := harness.Poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		p, err := c.Client().CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return p.Spec.NodeName == names[1], nil
	})
	if err != nil {
		t.Fatalf("pod not scheduled onto %s: %v", names[1], err)
	}
	zero := int64(0)
	_ = c.Client().CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
}

// A host process started through the harness has its output captured and is stopped by Stop.
func TestHostProcess(t *testing.T) {
	c := framework.Cluster(t)
	ctx := framework.Context(t, time.Minute)
	hp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "e2e-sleeper",
		Path: "/bin/sh",
		Args: []string{"-c", `echo "started with KUBECONFIG=$KUBECONFIG"; exec sleep 600`},
	})
	if err != nil {
		t.Fatal(err)
	}
	err = harness.Poll(ctx, 50*time.Millisecond, func(context.Context) (bool, error) {
		return strings.Contains(hp.Logs(), "started with KUBECONFIG="+c.PluginKubeconfig), nil
	})
	if err != nil {
		t.Fatalf("host process output not captured: %v; log:\n%s", err, hp.Logs())
	}
	hp.Stop(5 * time.Second)
	if gone, _ := hp.Exited(); !gone {
		t.Errorf("host process %d still running after Stop", hp.PID)
	}
	// A second one is left running on purpose: the teardown check at the end of the run proves
	// that Stop also ends host processes.
	if _, err := c.StartHostProcess(ctx, harness.HostProcessSpec{Name: "e2e-left-running", Path: "/bin/sleep", Args: []string{"600"}}); err != nil {
		t.Fatal(err)
	}
}

// Restarting the kubelet brings the node back to Ready, and pods run afterwards.
func TestRestartKubelet(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 3*time.Minute)
	t0 := time.Now()
	if err := c.RestartKubelet(ctx); err != nil {
		t.Fatalf("restart kubelet: %v", err)
	}
	t.Logf("kubelet restarted and node Ready in %s", time.Since(t0).Round(time.Millisecond))
	out, err := c.RunPod(ctx, harness.BusyboxPod(ns, "after-restart", "echo", "still works"))
	if err != nil {
		t.Fatalf("pod after kubelet restart: %v", err)
	}
	if out != "still works\n" {
		t.Errorf("output = %q", out)
	}
}
