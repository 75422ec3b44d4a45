package harness

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

var getOpts = metav1.GetOptions{}

// SimulatedNodeLabel marks nodes made by AddSimulatedNodes.
const SimulatedNodeLabel = "tessera.dev/simulated-node"

// markNodeSchedulable removes the not-ready/unreachable taints from a node. With setReady it also
// sets the Ready condition (simulated nodes); without, it fails until the kubelet reports Ready.
func (c *Cluster) markNodeSchedulable(ctx context.Context, name string, setReady bool) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error { return c.markNodeSchedulableOnce(ctx, name, setReady) })
}

func (c *Cluster) markNodeSchedulableOnce(ctx context.Context, name string, setReady bool) error {
	node, err := c.client.CoreV1().Nodes().Get(ctx, name, getOpts)
	if err != nil {
		return err
	}
	ready := false
	for _, cond := range node.Status.Conditions {
		if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready {
		if !setReady {
			return fmt.Errorf("node %s is not Ready yet", name)
		}
		now := metav1.Now()
		node.Status.Conditions = append(filterConditions(node.Status.Conditions, corev1.NodeReady), corev1.NodeCondition{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "SimulatedNode",
			Message: "simulated by the tessera test harness", LastHeartbeatTime: now, LastTransitionTime: now,
		})
		if node, err = c.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	var keep []corev1.Taint
	for _, t := range node.Spec.Taints {
		if t.Key == corev1.TaintNodeNotReady || t.Key == corev1.TaintNodeUnreachable {
			continue
		}
		keep = append(keep, t)
	}
	if len(keep) != len(node.Spec.Taints) {
		node.Spec.Taints = keep
		if _, err := c.client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return nil
}

func filterConditions(conds []corev1.NodeCondition, drop corev1.NodeConditionType) []corev1.NodeCondition {
	var out []corev1.NodeCondition
	for _, c := range conds {
		if c.Type != drop {
			out = append(out, c)
		}
	}
	return out
}

// SimulatedNode returns the Node object AddSimulatedNodes creates: 64 CPUs, 512Gi memory, 110
// pods, labelled with SimulatedNodeLabel. Change it and pass it to AddSimulatedNode for other
// shapes.
func SimulatedNode(name string) *corev1.Node {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("64"),
		corev1.ResourceMemory: resource.MustParse("512Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				corev1.LabelHostname: name,
				corev1.LabelOSStable: "linux",
				SimulatedNodeLabel:   "true",
			},
		},
		Status: corev1.NodeStatus{Capacity: capacity, Allocatable: capacity.DeepCopy()},
	}
}

// AddSimulatedNodes creates Ready, schedulable nodes without a kubelet. Pods bound to them stay
// Pending forever (nobody runs them), which is what scheduler and DRA allocation tests want.
func (c *Cluster) AddSimulatedNodes(ctx context.Context, names ...string) error {
	for _, n := range names {
		if err := c.AddSimulatedNode(ctx, SimulatedNode(n)); err != nil {
			return err
		}
	}
	return nil
}

// AddSimulatedNode creates one node from an object (see SimulatedNode), sets it Ready and removes
// the not-ready taint. An existing node of that name is made Ready again.
func (c *Cluster) AddSimulatedNode(ctx context.Context, node *corev1.Node) error {
	status := node.Status
	_, err := c.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("create node %s: %w", node.Name, err)
	}
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := c.client.CoreV1().Nodes().Get(ctx, node.Name, getOpts)
		if err != nil {
			return err
		}
		now := metav1.Now()
		cur.Status.Capacity = status.Capacity
		cur.Status.Allocatable = status.Allocatable
		cur.Status.Conditions = append(filterConditions(cur.Status.Conditions, corev1.NodeReady), corev1.NodeCondition{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "SimulatedNode",
			Message: "simulated by the tessera test harness", LastHeartbeatTime: now, LastTransitionTime: now,
		})
		_, err = c.client.CoreV1().Nodes().UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("set node %s Ready: %w", node.Name, err)
	}
	return c.markNodeSchedulable(ctx, node.Name, true)
}

// DeleteNodes deletes nodes (simulated ones, typically) and ignores missing ones.
func (c *Cluster) DeleteNodes(ctx context.Context, names ...string) error {
	for _, n := range names {
		if err := c.client.CoreV1().Nodes().Delete(ctx, n, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	return nil
}
