package migmanager

import (
	"context"
	"encoding/json"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// KubeState publishes the state label on the Node with a merge patch that touches that label only.
type KubeState struct {
	client kubernetes.Interface
	node   string
}

// NewKubeState publishes the state label of node.
func NewKubeState(client kubernetes.Interface, node string) *KubeState {
	return &KubeState{client: client, node: node}
}

// SetState implements StateSink.
func (k *KubeState) SetState(ctx context.Context, state string) error {
	var v any
	if state != "" {
		v = state
	}
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{LabelState: v}}})
	if err != nil {
		return err
	}
	if _, err := k.client.CoreV1().Nodes().Patch(ctx, k.node, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("labelling node %s %s=%s: %w", k.node, LabelState, state, err)
	}
	return nil
}
