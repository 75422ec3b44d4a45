package dra

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

// recordingSlicer records the intervals set, per GPU.
type recordingSlicer struct {
	mu    sync.Mutex
	calls []string
	fail  error
}

func (r *recordingSlicer) SetTimeSlice(_ context.Context, gpu int, iv api.TimeSliceInterval) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return r.fail
	}
	r.calls = append(r.calls, fmt.Sprintf("%d=%s", gpu, iv))
	return nil
}

func (r *recordingSlicer) Calls() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.calls...)
}

// memPublisher keeps what was published.
type memPublisher struct {
	mu  sync.Mutex
	got []resourceslice.DriverResources
}

func (p *memPublisher) PublishResources(_ context.Context, r resourceslice.DriverResources) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, *r.DeepCopy())
	return nil
}

func (p *memPublisher) last() resourceslice.DriverResources {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.got) == 0 {
		return resourceslice.DriverResources{}
	}
	return p.got[len(p.got)-1]
}

// env is a driver on a simulated node with a fake API server.
type env struct {
	t        testing.TB
	lib      nvmlib.Interface
	node     *sim.Node
	client   *fake.Clientset
	gen      *cdi.Generator
	stateDir string
	slicer   *recordingSlicer
	res      *api.Resolution
	d        *Driver
	pub      *memPublisher
	ctx      context.Context
	cancel   context.CancelFunc
}

func newEnv(t testing.TB, lib nvmlib.Interface, node *sim.Node, profileDoc string, opts ...Option) *env {
	t.Helper()
	h := node.Host()
	gen, err := cdi.New(cdi.WithDriverRoot(h.DriverRoot()), cdi.WithDevRoot(h.DevRoot()), cdi.WithProcRoot(h.ProcRoot()),
		cdi.WithSpecDir(t.TempDir()), cdi.WithHookPath(h.ToolPath("nvidia-cdi-hook")))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, lib: lib, node: node, gen: gen, stateDir: t.TempDir(), slicer: &recordingSlicer{},
		res: resolve(t, lib, profileDoc)}
	e.client = fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode, UID: "node-uid"}})
	e.start(opts...)
	return e
}

// start runs a (new) driver instance on the env's state, as after a restart.
func (e *env) start(opts ...Option) *Driver {
	e.t.Helper()
	if e.d != nil {
		e.stop()
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	base := []Option{WithNodeName(testNode), WithStateDir(e.stateDir), WithCDI(e.gen), WithBootID(e.node.BootID),
		WithTimeSlicer(e.slicer), WithKubeClient(e.client), WithResyncInterval(0), WithSysfsRoot(e.node.Host().SysRoot())}
	d, err := New(e.ctx, e.lib, append(base, opts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := d.SetResolution(e.ctx, e.res); err != nil {
		e.t.Fatal(err)
	}
	e.pub = &memPublisher{}
	if err := d.SetPublisher(e.ctx, e.pub); err != nil {
		e.t.Fatal(err)
	}
	d.Run(e.ctx)
	e.d = d
	e.t.Cleanup(e.stop)
	return d
}

func (e *env) stop() {
	if e.d != nil {
		e.cancel()
		e.d.Stop()
		e.d = nil
	}
}

type alloc struct {
	request, device string
	share           bool
}

var claimSeq int

// claim makes an allocated claim (and stores it in the fake API server).
func (e *env) claim(name string, allocs []alloc, configs ...resourceapi.DeviceAllocationConfiguration) *resourceapi.ResourceClaim {
	e.t.Helper()
	claimSeq++
	c := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID(fmt.Sprintf("c1a1a000-0000-4000-8000-%012d", claimSeq))},
		Status:     resourceapi.ResourceClaimStatus{Allocation: &resourceapi.AllocationResult{}},
	}
	for i, a := range allocs {
		r := resourceapi.DeviceRequestAllocationResult{Request: a.request, Driver: DriverName, Pool: testNode, Device: a.device}
		if a.share {
			id := types.UID(fmt.Sprintf("5a5a5a5a-0000-4000-8000-%06d%06d", claimSeq, i))
			r.ShareID = &id
		}
		c.Status.Allocation.Devices.Results = append(c.Status.Allocation.Devices.Results, r)
	}
	c.Status.Allocation.Devices.Config = configs
	if _, err := e.client.ResourceV1().ResourceClaims("ns").Create(context.Background(), c, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	return c
}

func gpuConfig(requests []string, doc string) resourceapi.DeviceAllocationConfiguration {
	return resourceapi.DeviceAllocationConfiguration{Source: resourceapi.AllocationConfigSourceClaim, Requests: requests,
		DeviceConfiguration: resourceapi.DeviceConfiguration{Opaque: &resourceapi.OpaqueDeviceConfiguration{
			Driver: DriverName, Parameters: runtime.RawExtension{Raw: []byte(doc)}}}}
}

func (e *env) prepare(claims ...*resourceapi.ResourceClaim) map[types.UID]kubeletplugin.PrepareResult {
	e.t.Helper()
	out, err := e.d.PrepareResourceClaims(context.Background(), claims)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *env) mustPrepare(c *resourceapi.ResourceClaim) []kubeletplugin.Device {
	e.t.Helper()
	r := e.prepare(c)[c.UID]
	if r.Err != nil {
		e.t.Fatalf("prepare %s: %v", c.Name, r.Err)
	}
	return r.Devices
}

func (e *env) unprepare(c *resourceapi.ResourceClaim) error {
	e.t.Helper()
	out, err := e.d.UnprepareResourceClaims(context.Background(), []kubeletplugin.NamespacedObject{{
		NamespacedName: types.NamespacedName{Namespace: c.Namespace, Name: c.Name}, UID: c.UID}})
	if err != nil {
		e.t.Fatal(err)
	}
	return out[c.UID]
}

func (e *env) specPath(uid types.UID) string {
	return filepath.Join(e.gen.SpecDir(), e.gen.ClaimSpecName(string(uid)))
}

// hasSpec reports whether the claim has a transient claim spec (whole GPUs and existing MIG devices
// are answered from the static spec and have none).
func (e *env) hasSpec(uid types.UID) bool {
	_, err := os.Stat(e.specPath(uid))
	return err == nil
}

func (e *env) staticSpecPath() string { return filepath.Join(e.gen.SpecDir(), e.gen.StaticSpecName()) }

// resolves reports whether every CDI device the claim's checkpoint answered with resolves as a
// container runtime resolves it (a CDI cache over the spec directory), whichever spec holds it.
func (e *env) resolves(uid types.UID) bool {
	e.t.Helper()
	cp, err := e.checkpoint(uid)
	if err != nil || len(cp.Devices) == 0 {
		return false
	}
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(e.gen.SpecDir()), cdiapi.WithAutoRefresh(false))
	if err != nil {
		e.t.Fatal(err)
	}
	for _, pd := range cp.Devices {
		if cache.GetDevice(pd.CDIDeviceID) == nil {
			return false
		}
	}
	return true
}

func (e *env) checkpoint(uid types.UID) (*Checkpoint, error) {
	s := &checkpoints{dir: filepath.Join(e.stateDir, "checkpoints")}
	return s.read(uid)
}

// poll waits (up to 10s) for cond.
func poll(t testing.TB, what string, cond func() (bool, error)) {
	t.Helper()
	if err := wait.PollUntilContextTimeout(context.Background(), 5*time.Millisecond, 10*time.Second, true,
		func(context.Context) (bool, error) { return cond() }); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
