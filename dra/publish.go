package dra

import (
	"context"
	"fmt"
	"strconv"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// firstPublish creates the node's slices directly when it has none yet, named and shaped exactly as
// the helper's ResourceSlice controller names and shapes them (index prefix, generation 1, owned by
// the Node), so the controller adopts them unchanged when it has synced. The controller waits for its
// informer in one-second steps before its first write; this puts the first slices in the API server
// a few milliseconds after start instead. Anything unexpected leaves the work to the controller.
func (d *Driver) firstPublish(ctx context.Context, dr resourceslice.DriverResources) {
	if d.client == nil {
		return
	}
	logger := klog.FromContext(ctx)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rc := d.client.ResourceV1().ResourceSlices()
	list, err := rc.List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + d.node + ",spec.driver=" + DriverName})
	if err != nil || len(list.Items) > 0 {
		return // slices exist (a restart): the controller updates them
	}
	node, err := d.client.CoreV1().Nodes().Get(ctx, d.node, metav1.GetOptions{})
	if err != nil {
		logger.V(2).Info("First publish left to the ResourceSlice controller", "err", err)
		return
	}
	pool := dr.Pools[d.node]
	n := len(pool.Slices)
	width := max(5, len(strconv.FormatInt(int64(n-1), 16))) // the controller's index prefix
	for i, s := range pool.Slices {
		slice := &resourceapi.ResourceSlice{
			ObjectMeta: metav1.ObjectMeta{
				GenerateName: fmt.Sprintf("%0*x-%s-%s-", width, i, DriverName, d.node),
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: d.node, UID: node.UID,
					Controller: ptr.To(true)}},
			},
			Spec: resourceapi.ResourceSliceSpec{
				Driver:   DriverName,
				NodeName: ptr.To(d.node),
				Pool:     resourceapi.ResourcePool{Name: d.node, Generation: 1, ResourceSliceCount: int64(n)},
				Devices:  s.Devices,
				// Counter sets too: devices of mig-dynamic GPUs and siblings consume them, and a
				// pool without them would let the scheduler allocate overlapping devices.
				SharedCounters:         s.SharedCounters,
				PartitionTypeAttribute: s.PartitionTypeAttribute,
			},
		}
		if _, err := rc.Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			logger.V(2).Info("First publish left to the ResourceSlice controller", "slice", i, "err", err)
			return
		}
	}
	logger.V(2).Info("First ResourceSlices created", "slices", n)
}
