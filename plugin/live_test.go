package plugin_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/profile"
)

const sp = "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\n"

// A profile change touches only what changed: an unchanged resource gets no new list and no new
// registration, a changed one a new list on its stream, a new one registers, an emptied one goes.
func TestLiveChangeTouchesOnlyChangedResources(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 30*time.Second)
	p := e.start(sp + `spec:
  rules:
  - {selector: {indices: [0, 1, 2, 3]}, owner: device-plugin, mode: whole}
  - {selector: {indices: [4, 5, 6, 7]}, owner: device-plugin, mode: time-sliced, resourceName: nvidia.com/gpu.shared, timeSlicing: {replicas: 2}}
`)
	e.waitResources(map[string]int{"nvidia.com/gpu": 4, "nvidia.com/gpu.shared": 8})
	gpuBefore, _ := e.kubelet.Resource("nvidia.com/gpu")
	sharedBefore, _ := e.kubelet.Resource("nvidia.com/gpu.shared")

	if err := p.Update(ctx, e.resolve(sp+`spec:
  rules:
  - {selector: {indices: [0, 1, 2, 3]}, owner: device-plugin, mode: whole}
  - {selector: {indices: [4, 5]}, owner: device-plugin, mode: time-sliced, resourceName: nvidia.com/gpu.shared, timeSlicing: {replicas: 2}}
  - {selector: {indices: [6, 7]}, owner: device-plugin, mode: mps, resourceName: nvidia.com/gpu.mps, mps: {replicas: 3}}
`)); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu": 4, "nvidia.com/gpu.shared": 4, "nvidia.com/gpu.mps": 6})
	gpuAfter, _ := e.kubelet.Resource("nvidia.com/gpu")
	sharedAfter, _ := e.kubelet.Resource("nvidia.com/gpu.shared")
	if gpuAfter.Lists != gpuBefore.Lists || gpuAfter.Registrations != 1 {
		t.Errorf("unchanged nvidia.com/gpu was touched: lists %d→%d, registrations %d", gpuBefore.Lists, gpuAfter.Lists, gpuAfter.Registrations)
	}
	if sharedAfter.Lists <= sharedBefore.Lists || sharedAfter.Registrations != 1 {
		t.Errorf("nvidia.com/gpu.shared: lists %d→%d, registrations %d; want a new list on the same registration", sharedBefore.Lists, sharedAfter.Lists, sharedAfter.Registrations)
	}
	if sts, _ := e.mps.List(); len(sts) != 2 {
		t.Errorf("MPS daemons: %d, want 2 (GPUs 6 and 7)", len(sts))
	}

	// The MPS GPUs go back to time-slicing and the whole GPUs to DRA: daemons stop, nvidia.com/gpu goes.
	if err := p.Update(ctx, e.resolve(sp+`spec:
  rules:
  - {selector: {indices: [0, 1, 2, 3]}, owner: dra, mode: whole}
  - {selector: {indices: [4, 5, 6, 7]}, owner: device-plugin, mode: time-sliced, resourceName: nvidia.com/gpu.shared, timeSlicing: {replicas: 2}}
`)); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu.shared": 8})
	if sts, _ := e.mps.List(); len(sts) != 0 {
		t.Errorf("MPS daemons left: %+v", sts)
	}
}

// Devices in use keep serving until they are released: the GPU whose replica a container holds
// keeps its old devices and changes after the kubelet's PodResources API stops listing them.
func TestLiveChangeWaitsForDevicesInUse(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 30*time.Second)
	const ts = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: %d\n"
	p := e.start(fmt.Sprintf(ts, 4))
	e.waitCount("nvidia.com/gpu", 32)
	u := e.uuids()
	held := u[2] + "::1"
	if _, err := e.kubelet.Allocate(ctx, "nvidia.com/gpu", held); err != nil {
		t.Fatal(err)
	}
	if err := p.Update(ctx, e.resolve(fmt.Sprintf(ts, 2))); err != nil {
		t.Fatal(err)
	}
	s := e.waitCount("nvidia.com/gpu", 7*2+4)
	for _, id := range replicaIDs(u[2:3], 4) {
		if !slices.Contains(s.IDs(), id) {
			t.Errorf("GPU 2's %s is gone while one of its replicas is in use", id)
		}
	}
	if pend := p.Pending(); len(pend) != 1 || !strings.Contains(pend[2], held) {
		t.Errorf("pending: %v", pend)
	}
	e.kubelet.Release("nvidia.com/gpu", held)
	e.waitCount("nvidia.com/gpu", 16)
	if pend := p.Pending(); len(pend) != 0 {
		t.Errorf("still pending: %v", pend)
	}
}

// A live change to a MIG layout: the plugin partitions the GPU (GPUs not in use only) and serves
// the new MIG devices.
func TestLiveChangeAppliesMIGLayout(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 30*time.Second)
	p := e.start("version: v1\n")
	e.waitCount("nvidia.com/gpu", 8)
	if err := p.Update(ctx, e.resolve(sp+`spec:
  migLayouts:
    halves: {"3g.40gb": 2}
  rules:
  - {selector: {indices: [0]}, owner: device-plugin, mode: mig-static, mig: {layout: all-1g.10gb}}
  - {selector: {indices: [1]}, owner: device-plugin, mode: mig-static, mig: {layout: halves}}
`)); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu": 6, "nvidia.com/mig-1g.10gb": 7, "nvidia.com/mig-3g.40gb": 2})
	devs, err := e.lib.MigDevices(1)
	if err != nil || len(devs) != 2 {
		t.Fatalf("GPU 1's MIG devices: %v %v", devs, err)
	}
}

type events struct {
	mu  sync.Mutex
	all []string
}

func (r *events) Event(typ, reason, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.all = append(r.all, typ+" "+reason+" "+msg)
}

func (r *events) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.all...)
}

// Through the profile watcher: a bad edit keeps the last good profile's resources, with an Event
// and an error naming the field; a good edit then changes them.
func TestBadChangeKeepsOldResources(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	ctx := ctxT(t, 30*time.Second)
	file := filepath.Join(t.TempDir(), "config.yaml")
	write := func(s string) {
		if err := os.WriteFile(file, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	ev := &events{}
	w, err := profile.NewWatcher(profile.Options{File: file, Events: ev,
		GPUs: func(ctx context.Context) ([]api.GPUInfo, error) { return profile.GPUsFromNVML(ctx, e.lib) }})
	if err != nil {
		t.Fatal(err)
	}
	cur, _, err := w.Reload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p := e.start("")
	if err := p.Update(ctx, cur.Resolution); err != nil {
		t.Fatal(err)
	}
	e.waitCount("nvidia.com/gpu", 32)
	before, _ := e.kubelet.Resource("nvidia.com/gpu")

	write("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 1\n")
	cur2, changed, err := w.Reload(ctx)
	if err == nil || changed || cur2 != cur || !strings.Contains(err.Error(), "sharing.timeSlicing.resources[0].replicas") {
		t.Fatalf("bad change: changed=%v err=%v", changed, err)
	}
	found := false
	for _, x := range ev.list() {
		found = found || (strings.HasPrefix(x, "Warning "+profile.ReasonProfileRejected) && strings.Contains(x, "replicas"))
	}
	if !found {
		t.Errorf("no Warning Event naming the field: %v", ev.list())
	}
	if after, _ := e.kubelet.Resource("nvidia.com/gpu"); after.Lists != before.Lists || len(after.Healthy()) != 32 {
		t.Errorf("a refused change touched the resource")
	}

	write("version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n")
	cur3, changed, err := w.Reload(ctx)
	if err != nil || !changed {
		t.Fatalf("good change: %v %v", changed, err)
	}
	if err := p.Update(ctx, cur3.Resolution); err != nil {
		t.Fatal(err)
	}
	e.waitResources(map[string]int{"nvidia.com/gpu.shared": 16})
	if s, _ := e.kubelet.Resource("nvidia.com/gpu"); s.Connected {
		t.Error("nvidia.com/gpu is still served")
	}
}
