package plugin

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
)

// Node labels an admin can select on, with the names NVIDIA's GPU feature discovery uses.
const (
	LabelProduct         = "nvidia.com/gpu.product"
	LabelCount           = "nvidia.com/gpu.count"
	LabelMemory          = "nvidia.com/gpu.memory"
	LabelReplicas        = "nvidia.com/gpu.replicas"
	LabelSharingStrategy = "nvidia.com/gpu.sharing-strategy"
	LabelMIGStrategy     = "nvidia.com/mig.strategy"
	LabelMIGCapable      = "nvidia.com/mig.capable"
)

// OwnedLabels are every label the plugin sets; it removes those it no longer sets.
var OwnedLabels = []string{LabelProduct, LabelCount, LabelMemory, LabelReplicas, LabelSharingStrategy, LabelMIGStrategy, LabelMIGCapable}

// NodeLabeler publishes the plugin's node labels.
type NodeLabeler interface {
	// Apply sets the labels; owned labels absent from labels are removed.
	Apply(ctx context.Context, labels map[string]string) error
}

// nodeLabels are the labels for what the plugin serves: the product, count and memory of its GPUs,
// replicas and sharing strategy (none, time-slicing, mps, or mixed when a profile uses both), MIG
// strategy and whether the GPUs can run MIG. The product carries -SHARED when GPUs are shared, as
// GPU feature discovery writes it, so that workloads that need a whole GPU can avoid them.
func nodeLabels(res *api.Resolution, snap *inventory.Snapshot, gpus map[int]*gpuState) map[string]string {
	out := map[string]string{}
	if res == nil {
		return out
	}
	idx := slices.Sorted(maps.Keys(gpus))
	if len(idx) == 0 {
		return out
	}
	first := gpus[idx[0]].assignment.GPU
	strategies := map[string]bool{}
	replicas := 1
	capable := false
	for _, i := range idx {
		a := gpus[i].assignment
		capable = capable || a.GPU.MigCapable
		switch a.Mode {
		case api.ModeTimeSliced:
			strategies["time-slicing"] = true
		case api.ModeMPS:
			strategies["mps"] = true
		case api.ModeMIGStatic:
			if a.MIG != nil && len(a.MIG.Replicas) > 0 {
				strategies["time-slicing"] = true
			}
		}
		if a.Replicas > replicas {
			replicas = a.Replicas
		}
	}
	sharing := "none"
	switch len(strategies) {
	case 0:
	case 1:
		for s := range strategies {
			sharing = s
		}
	default:
		sharing = "mixed"
	}
	product := first.ProductName
	if snap != nil {
		for _, g := range snap.GPUs {
			if g.Index == first.Index && g.ProductName != "" {
				product = g.ProductName
			}
		}
	}
	product = labelValue(strings.ReplaceAll(product, " ", "-"))
	if sharing != "none" && product != "" {
		product = labelValue(product + "-SHARED")
	}
	out[LabelProduct] = product
	out[LabelCount] = strconv.Itoa(len(idx))
	if first.MemoryMiB > 0 {
		out[LabelMemory] = strconv.FormatUint(first.MemoryMiB, 10)
	}
	out[LabelReplicas] = strconv.Itoa(replicas)
	out[LabelSharingStrategy] = sharing
	out[LabelMIGStrategy] = res.DevicePlugin.MIGStrategy
	out[LabelMIGCapable] = strconv.FormatBool(capable)
	for k, v := range out {
		if v == "" {
			delete(out, k)
		}
	}
	return out
}

// labelValue makes s a valid label value: allowed characters only, at most 63, alphanumeric ends.
func labelValue(s string) string {
	b := []byte(s)
	for i, c := range b {
		ok := c == '-' || c == '_' || c == '.' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
		if !ok {
			b[i] = '-'
		}
	}
	s = string(b)
	if len(s) > validation.LabelValueMaxLength {
		s = s[:validation.LabelValueMaxLength]
	}
	return strings.Trim(s, "-_.")
}

// KubeLabeler patches the node's labels through the API server, only when they change.
type KubeLabeler struct {
	client kubernetes.Interface
	node   string

	mu   sync.Mutex
	last map[string]string
}

// NewKubeLabeler returns a labeler of the named node.
func NewKubeLabeler(client kubernetes.Interface, node string) *KubeLabeler {
	return &KubeLabeler{client: client, node: node}
}

// Apply implements NodeLabeler with a merge patch: owned labels not given are removed.
func (k *KubeLabeler) Apply(ctx context.Context, labels map[string]string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.last != nil && maps.Equal(k.last, labels) {
		return nil
	}
	patch := map[string]any{}
	for _, l := range OwnedLabels {
		if v, ok := labels[l]; ok {
			patch[l] = v
		} else {
			patch[l] = nil
		}
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": patch}})
	if err != nil {
		return err
	}
	if _, err := k.client.CoreV1().Nodes().Patch(ctx, k.node, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("labelling node %s: %w", k.node, err)
	}
	k.last = maps.Clone(labels)
	klog.InfoS("Node labels updated", "node", k.node, "labels", labels)
	return nil
}
