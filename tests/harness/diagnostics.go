package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Limits of DumpDiagnostics: lines of each component log, pods listed, pods described.
var (
	DiagnosticLines     = 40
	DiagnosticPods      = 50
	DiagnosticDescribes = 5
)

// DumpDiagnostics writes what explains a failure: nodes, pods that are not done with their events
// (like kubectl describe), recent warning events, and the tail of every component's and host
// process's log.
func (c *Cluster) DumpDiagnostics(w io.Writer) {
	fmt.Fprintf(w, "\n======== diagnostics of the cluster in %s ========\n", c.StateDir)
	if c.client != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c.dumpAPI(ctx, w)
	}
	logs, _ := filepath.Glob(filepath.Join(c.LogDir, "*.log"))
	sort.Strings(logs)
	for _, l := range logs {
		fmt.Fprintf(w, "\n---- last %d lines of %s ----\n%s\n", DiagnosticLines, l, tailFile(l, DiagnosticLines))
	}
	fmt.Fprintf(w, "======== end of diagnostics ========\n\n")
}

func (c *Cluster) dumpAPI(ctx context.Context, w io.Writer) {
	nodes, err := c.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		fmt.Fprintf(w, "list nodes: %v\n", err)
		return
	}
	fmt.Fprintf(w, "---- nodes ----\n")
	for _, n := range nodes.Items {
		ready := "Unknown"
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				ready = fmt.Sprintf("%s (%s: %s)", cond.Status, cond.Reason, cond.Message)
			}
		}
		var taints []string
		for _, t := range n.Spec.Taints {
			taints = append(taints, t.ToString())
		}
		fmt.Fprintf(w, "%s  Ready=%s  taints=%v\n", n.Name, ready, taints)
	}
	pods, err := c.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		fmt.Fprintf(w, "list pods: %v\n", err)
		return
	}
	fmt.Fprintf(w, "---- pods (%d) ----\n", len(pods.Items))
	simulated := map[string]bool{}
	for _, n := range nodes.Items {
		if n.Labels[SimulatedNodeLabel] == "true" {
			simulated[n.Name] = true
		}
	}
	for i, p := range pods.Items {
		if i == DiagnosticPods {
			fmt.Fprintf(w, "... and %d more\n", len(pods.Items)-i)
			break
		}
		fmt.Fprintf(w, "%s/%s  node=%s  phase=%s  %s\n", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, podStatusSummary(&p))
	}
	described := 0
	for _, p := range pods.Items {
		// Pods bound to simulated nodes stay Pending by design.
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodRunning || simulated[p.Spec.NodeName] {
			continue
		}
		if described == DiagnosticDescribes {
			fmt.Fprintf(w, "(not describing more pods)\n")
			break
		}
		described++
		fmt.Fprintf(w, "---- describe pod %s/%s ----\n%s", p.Namespace, p.Name, c.DescribePod(ctx, p.Namespace, p.Name))
	}
	events, err := c.client.CoreV1().Events("").List(ctx, metav1.ListOptions{FieldSelector: "type=Warning"})
	if err == nil && len(events.Items) > 0 {
		items := events.Items
		sort.Slice(items, func(i, j int) bool { return eventTime(items[i]).Before(eventTime(items[j])) })
		if len(items) > 30 {
			items = items[len(items)-30:]
		}
		fmt.Fprintf(w, "---- warning events ----\n")
		for _, e := range items {
			fmt.Fprintf(w, "%s %s/%s %s: %s\n", eventTime(e).Format("15:04:05"), e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, strings.TrimSpace(e.Message))
		}
	}
}

// DescribePod returns `kubectl describe pod` output (or, without kubectl, the pod's status and
// events).
func (c *Cluster) DescribePod(ctx context.Context, namespace, name string) string {
	if c.Binaries != nil && c.Binaries.Kubectl != "" {
		if _, err := os.Stat(c.Binaries.Kubectl); err == nil {
			out, err := exec.CommandContext(ctx, c.Binaries.Kubectl, "--kubeconfig", c.Kubeconfig,
				"describe", "pod", "-n", nsOrDefault(namespace), name).CombinedOutput()
			if err == nil {
				return string(out)
			}
		}
	}
	var b strings.Builder
	if p, err := c.client.CoreV1().Pods(nsOrDefault(namespace)).Get(ctx, name, getOpts); err == nil {
		fmt.Fprintf(&b, "phase %s: %s\n", p.Status.Phase, podStatusSummary(p))
	}
	ev, err := c.PodEvents(ctx, namespace, name)
	if err != nil {
		fmt.Fprintf(&b, "events: %v\n", err)
	} else {
		b.WriteString("Events:\n" + ev)
	}
	return b.String()
}

// Kubectl runs the cluster's kubectl with the admin kubeconfig and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, c.Binaries.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
