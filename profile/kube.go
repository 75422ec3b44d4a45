package profile

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
)

// NodeLabels watches one Node's labels through the API server (a watch with a field selector on
// the node's name, so only that object is sent).
type NodeLabels struct {
	mu      sync.Mutex
	labels  map[string]string
	changed chan struct{}
	synced  cache.InformerSynced
}

// WatchNodeLabels starts watching the named node until ctx ends and waits (up to timeout) for the
// first copy of it.
func WatchNodeLabels(ctx context.Context, client kubernetes.Interface, nodeName string, timeout time.Duration) (*NodeLabels, error) {
	n := &NodeLabels{changed: make(chan struct{}, 1)}
	lw := cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "nodes", metav1.NamespaceAll, fields.OneTermEqualSelector("metadata.name", nodeName))
	informer := cache.NewSharedIndexInformer(lw, &corev1.Node{}, 0, cache.Indexers{})
	_, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.set(obj) },
		UpdateFunc: func(_, obj any) { n.set(obj) },
		DeleteFunc: func(any) { n.set(nil) },
	})
	if err != nil {
		return nil, err
	}
	go informer.RunWithContext(ctx)
	n.synced = informer.HasSynced
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !cache.WaitForCacheSync(wctx.Done(), informer.HasSynced) {
		return nil, fmt.Errorf("node %q: labels not read within %s", nodeName, timeout)
	}
	return n, nil
}

func (n *NodeLabels) set(obj any) {
	var labels map[string]string
	if node, ok := obj.(*corev1.Node); ok {
		labels = maps.Clone(node.Labels)
	}
	n.mu.Lock()
	same := maps.Equal(labels, n.labels)
	n.labels = labels
	n.mu.Unlock()
	if !same {
		select {
		case n.changed <- struct{}{}:
		default:
		}
	}
}

// Labels returns the node's labels as last seen.
func (n *NodeLabels) Labels() map[string]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.labels
}

// Changed is signalled when the labels change.
func (n *NodeLabels) Changed() <-chan struct{} { return n.changed }

// NodeEvents records Events on a Node object.
type NodeEvents struct {
	recorder    record.EventRecorder
	ref         *corev1.ObjectReference
	broadcaster record.EventBroadcaster
}

// NewNodeEvents returns an EventRecorder that posts Events about the node, as component. Call
// Shutdown to flush.
func NewNodeEvents(client kubernetes.Interface, nodeName, component string) *NodeEvents {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &NodeEvents{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: nodeName}),
		// Node events name the node by its name as UID, as the kubelet does.
		ref: &corev1.ObjectReference{Kind: "Node", Name: nodeName, UID: types.UID(nodeName)},
	}
}

// Event posts an Event on the node.
func (e *NodeEvents) Event(eventType, reason, message string) {
	e.recorder.Event(e.ref, eventType, reason, message)
}

// Shutdown stops the broadcaster.
func (e *NodeEvents) Shutdown() { e.broadcaster.Shutdown() }
