package telemetry

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

// NodePods keeps the pods of one node, from a watch with a field selector on spec.nodeName.
type NodePods struct {
	mu     sync.RWMutex
	byUID  map[string]PodInfo
	byName map[string]PodInfo
	// byClaim maps "namespace/claim" to the pod that uses the claim.
	byClaim map[string]PodInfo
}

// WatchNodePods starts watching the pods of nodeName until ctx ends and waits (up to timeout) for
// the first list.
func WatchNodePods(ctx context.Context, client kubernetes.Interface, nodeName string, timeout time.Duration) (*NodePods, error) {
	n := &NodePods{byUID: map[string]PodInfo{}, byName: map[string]PodInfo{}, byClaim: map[string]PodInfo{}}
	lw := cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "pods", metav1.NamespaceAll, fields.OneTermEqualSelector("spec.nodeName", nodeName))
	inf := cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, cache.Indexers{})
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { n.set(o, false) },
		UpdateFunc: func(_, o any) { n.set(o, false) },
		DeleteFunc: func(o any) {
			if t, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = t.Obj
			}
			n.set(o, true)
		},
	})
	if err != nil {
		return nil, err
	}
	go inf.RunWithContext(ctx)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !cache.WaitForCacheSync(wctx.Done(), inf.HasSynced) {
		return nil, fmt.Errorf("pods of node %q not listed within %s", nodeName, timeout)
	}
	return n, nil
}

func (n *NodePods) set(o any, deleted bool) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return
	}
	pi := PodInfo{UID: string(p.UID), Namespace: p.Namespace, Name: p.Name, Annotations: maps.Clone(p.Annotations)}
	n.mu.Lock()
	defer n.mu.Unlock()
	key := p.Namespace + "/" + p.Name
	var claims []string
	for _, c := range p.Spec.ResourceClaims {
		if c.ResourceClaimName != nil {
			claims = append(claims, p.Namespace+"/"+*c.ResourceClaimName)
		}
	}
	for _, st := range p.Status.ResourceClaimStatuses {
		if st.ResourceClaimName != nil {
			claims = append(claims, p.Namespace+"/"+*st.ResourceClaimName)
		}
	}
	if deleted {
		delete(n.byUID, pi.UID)
		if cur, ok := n.byName[key]; ok && cur.UID == pi.UID {
			delete(n.byName, key)
		}
		for _, c := range claims {
			if cur, ok := n.byClaim[c]; ok && cur.UID == pi.UID {
				delete(n.byClaim, c)
			}
		}
		return
	}
	n.byUID[pi.UID] = pi
	n.byName[key] = pi
	for _, c := range claims {
		n.byClaim[c] = pi
	}
}

// ByClaim implements ClaimPods: the pod using a claim ("namespace", "claim name").
func (n *NodePods) ByClaim(namespace, claim string) (PodInfo, bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	p, ok := n.byClaim[namespace+"/"+claim]
	return p, ok
}

// ByUID implements Pods.
func (n *NodePods) ByUID(uid string) (PodInfo, bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	p, ok := n.byUID[uid]
	return p, ok
}

// Get implements Pods.
func (n *NodePods) Get(namespace, name string) (PodInfo, bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	p, ok := n.byName[namespace+"/"+name]
	return p, ok
}

// PodEvents posts Events on pods.
type PodEvents struct {
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

// NewPodEvents returns an EventRecorder posting as component from node. Call Shutdown to flush.
func NewPodEvents(client kubernetes.Interface, nodeName, component string) *PodEvents {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &PodEvents{broadcaster: b, recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: nodeName})}
}

// PodEvent implements EventRecorder.
func (e *PodEvents) PodEvent(p PodInfo, eventType, reason, message string) {
	ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: p.Namespace, Name: p.Name, UID: types.UID(p.UID)}
	e.recorder.Event(ref, eventType, reason, message)
}

// Shutdown stops the broadcaster.
func (e *PodEvents) Shutdown() { e.broadcaster.Shutdown() }
