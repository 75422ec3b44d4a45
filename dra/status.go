package dra

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	resourceac "k8s.io/client-go/applyconfigurations/resource/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// DeviceData is what the driver writes into claim.status.devices[].data for each prepared device.
type DeviceData struct {
	// UUID is the UUID of what the container gets (GPU-… or MIG-…).
	UUID string `json:"uuid"`
	// GPUUUID and GPUIndex name the GPU it is on.
	GPUUUID  string `json:"gpuUUID"`
	GPUIndex int    `json:"gpuIndex"`
	// CDIDeviceID is the qualified CDI device name the container runtime injects.
	CDIDeviceID string `json:"cdiDeviceID"`
	// Mode is the GPU's sharing mode.
	Mode string `json:"mode"`
}

// Conditions written on prepared devices: Ready on each; Idle once the telemetry found the claim's
// holder idle for its window (True) and after it is busy again (False).
const (
	ConditionReady = "Ready"
	ReasonPrepared = "Prepared"
	ConditionIdle  = "Idle"
	ReasonIdle     = "GPUIdle"
	ReasonBusy     = "InUse"
)

// idleMark is a device's Idle condition: idle with its message, or busy again.
type idleMark struct {
	idle    bool
	message string
	since   time.Time
}

// statusWriter writes claim device status in the background, so Prepare never waits for the API
// server: one server-side apply per claim, by a field manager per node, so entries of other drivers
// and nodes are left alone; an empty apply removes ours again at Unprepare. A status is written
// statusDelay after Prepare; a claim unprepared before that costs no API call at all.
type statusWriter struct {
	client  kubernetes.Interface
	manager string
	delay   time.Duration
	queue   workqueue.TypedRateLimitingInterface[types.UID]

	mu       sync.Mutex
	pending  map[types.UID]*Checkpoint // nil devices: clear
	inflight map[types.UID]bool
	// idle holds the Idle conditions by claim and device; dropped when the claim's status is cleared.
	idle map[types.UID]map[string]idleMark
}

// statusDelay is how long after Prepare the claim's device status is written.
const statusDelay = 200 * time.Millisecond

func newStatusWriter(client kubernetes.Interface, node string) *statusWriter {
	return &statusWriter{
		client:  client,
		manager: DriverName + "/" + node,
		delay:   statusDelay,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.NewTypedItemExponentialFailureRateLimiter[types.UID](100*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[types.UID]{Name: "claim-status"}),
		pending:  map[types.UID]*Checkpoint{},
		inflight: map[types.UID]bool{},
		idle:     map[types.UID]map[string]idleMark{},
	}
}

// setIdle records a device's Idle condition and writes the claim's status again at once.
func (w *statusWriter) setIdle(c *Checkpoint, device string, idle bool, message string) {
	if w == nil {
		return
	}
	cp := *c
	w.mu.Lock()
	defer w.mu.Unlock()
	uid := c.Claim.UID
	if w.idle[uid] == nil {
		w.idle[uid] = map[string]idleMark{}
	}
	w.idle[uid][device] = idleMark{idle: idle, message: message, since: time.Now()}
	w.pending[uid] = &cp
	w.queue.Add(uid)
}

// set queues the status of a prepared claim (devices from the checkpoint) or, with cleared, the
// removal of ours.
func (w *statusWriter) set(c *Checkpoint, cleared bool) {
	if w == nil {
		return
	}
	cp := *c
	w.mu.Lock()
	defer w.mu.Unlock()
	uid := c.Claim.UID
	if cleared {
		cp.Devices = nil
		delete(w.idle, uid)
		if p := w.pending[uid]; p != nil && p.Devices != nil && !w.inflight[uid] {
			delete(w.pending, uid) // never written: nothing to remove
			return
		}
		w.pending[uid] = &cp
		w.queue.Add(uid)
		return
	}
	w.pending[uid] = &cp
	w.queue.AddAfter(uid, w.delay)
}

// maxStatusRetries bounds the retries of one claim's status.
const maxStatusRetries = 8

// run processes the queue with n workers until ctx ends.
func (w *statusWriter) run(ctx context.Context, n int) {
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for w.next(ctx) {
			}
		})
	}
	wg.Wait()
}

func (w *statusWriter) next(ctx context.Context) bool {
	uid, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(uid)
	w.mu.Lock()
	c := w.pending[uid]
	if c != nil {
		w.inflight[uid] = true
	}
	w.mu.Unlock()
	if c == nil {
		w.queue.Forget(uid)
		return true
	}
	err := w.apply(ctx, c)
	w.mu.Lock()
	delete(w.inflight, uid)
	w.mu.Unlock()
	logger := klog.FromContext(ctx)
	switch {
	case err == nil, apierrors.IsNotFound(err), apierrors.IsConflict(err), apierrors.IsInvalid(err):
		switch {
		case apierrors.IsInvalid(err):
			// The claim no longer has these devices allocated (or we wrote something wrong).
			logger.Error(err, "Claim device status refused by the API server", "claim", c.Claim.String())
		case err != nil:
			// The claim is gone or was replaced.
			logger.V(3).Info("Claim device status not written", "claim", c.Claim.String(), "err", err)
		default:
			logger.V(4).Info("Claim device status written", "claim", c.Claim.String(), "devices", len(c.Devices))
		}
		w.mu.Lock()
		if w.pending[uid] == c {
			delete(w.pending, uid)
		}
		w.mu.Unlock()
		w.queue.Forget(uid)
	case w.queue.NumRequeues(uid) < maxStatusRetries:
		w.queue.AddRateLimited(uid)
	default:
		logger.Error(err, "Giving up writing claim device status", "claim", c.Claim.String())
		w.queue.Forget(uid)
	}
	return true
}

func (w *statusWriter) apply(ctx context.Context, c *Checkpoint) error {
	st := resourceac.ResourceClaimStatus()
	now := metav1.NewTime(time.Now())
	w.mu.Lock()
	marks := maps.Clone(w.idle[c.Claim.UID])
	w.mu.Unlock()
	for _, d := range c.Devices {
		data, err := json.Marshal(DeviceData{UUID: d.CDI.UUID(), GPUUUID: d.CDI.GPU.UUID, GPUIndex: d.CDI.GPU.Index, CDIDeviceID: d.CDIDeviceID, Mode: string(d.Mode)})
		if err != nil {
			return err
		}
		ds := resourceac.AllocatedDeviceStatus().WithDriver(DriverName).WithPool(d.Pool).WithDevice(d.Device).
			WithConditions(metav1ac.Condition().WithType(ConditionReady).WithStatus(metav1.ConditionTrue).
				WithReason(ReasonPrepared).WithMessage(fmt.Sprintf("prepared %s for the claim's containers", d.CDI.UUID())).
				WithLastTransitionTime(now)).
			WithData(runtime.RawExtension{Raw: data})
		if m, ok := marks[d.Device]; ok {
			cond := metav1ac.Condition().WithType(ConditionIdle).WithLastTransitionTime(metav1.NewTime(m.since))
			if m.idle {
				cond.WithStatus(metav1.ConditionTrue).WithReason(ReasonIdle).WithMessage(m.message)
			} else {
				cond.WithStatus(metav1.ConditionFalse).WithReason(ReasonBusy).WithMessage("the claim's holder uses the device again")
			}
			ds.WithConditions(cond)
		}
		if d.ShareID != "" {
			ds.WithShareID(d.ShareID)
		}
		st.WithDevices(ds)
	}
	ac := resourceac.ResourceClaim(c.Claim.Name, c.Claim.Namespace).WithUID(c.Claim.UID).WithStatus(st)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := w.client.ResourceV1().ResourceClaims(c.Claim.Namespace).ApplyStatus(ctx, ac, metav1.ApplyOptions{FieldManager: w.manager, Force: true})
	return err
}
