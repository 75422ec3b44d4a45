package dra

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// sharedEnv is a driver on a simulated dgx-h100 with sharedProfile (GPU 0 shared time-sliced, GPU
// 1 shared through MPS) and an MPS manager on the simulator's stand-in control program.
func sharedEnv(t *testing.T) (*env, *mps.Manager) {
	t.Helper()
	lib, node := openSim(t, "dgx-h100")
	root, err := os.MkdirTemp("", "tmps") // MPS socket paths must stay short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	m := mps.NewManager(lib, mps.WithRoot(root), mps.ForSimulatedHost(node.Host()), mps.WithTimeouts(0, 100*time.Millisecond, 0))
	t.Cleanup(func() {
		sts, _ := m.List()
		for _, s := range sts {
			_ = m.Stop(context.Background(), s.GPUUUID, mps.StopOptions{Force: true})
		}
	})
	return newEnv(t, lib, node, sharedProfile, WithMPS(m)), m
}

// shareClaim makes a claim allocated one share of a shared device with the capacity the scheduler
// would have consumed (nothing: the device's defaults apply).
func (e *env) shareClaim(name, device string, kv ...string) *resourceapi.ResourceClaim {
	e.t.Helper()
	c := e.claim(name, []alloc{{"gpu", device, true}})
	r := &c.Status.Allocation.Devices.Results[0]
	if len(kv) > 0 {
		r.ConsumedCapacity = map[resourceapi.QualifiedName]resource.Quantity{}
		for i := 0; i < len(kv); i += 2 {
			r.ConsumedCapacity[resourceapi.QualifiedName(kv[i])] = resource.MustParse(kv[i+1])
		}
	}
	if _, err := e.client.ResourceV1().ResourceClaims(c.Namespace).Update(context.Background(), c, metav1.UpdateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	return c
}

// mpsCommands are the command lines control clients sent to MPS daemons, in order.
func mpsCommands(t *testing.T, e *env) []string {
	t.Helper()
	recs, err := e.node.Host().Records(host.ToolMPSControl)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range recs {
		if r.Kind == "stdin" {
			out = append(out, r.Fields[0])
		}
	}
	return out
}

func daemonStarts(t *testing.T, e *env) int {
	t.Helper()
	recs, err := e.node.Host().Records(host.ToolMPSControl)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range recs {
		if r.Kind == "argv" && slices.Contains(r.Fields, "-f") {
			n++
		}
	}
	return n
}

// deviceEdits resolves a prepared claim's device as the runtime's CDI cache does and returns its
// environment and mounts (container path ← host path).
func deviceEdits(t *testing.T, e *env, id string) ([]string, map[string]string) {
	t.Helper()
	cache, err := cdi.NewCache(cdi.WithSpecDirs(e.gen.SpecDir()), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	dev := cache.GetDevice(id)
	if dev == nil {
		t.Fatalf("the runtime's CDI cache has no %s: %v", id, cache.GetErrors())
	}
	mounts := map[string]string{}
	for _, m := range dev.ContainerEdits.Mounts {
		mounts[m.ContainerPath] = m.HostPath
	}
	return dev.ContainerEdits.Env, mounts
}

func computeMode(t *testing.T, e *env, gpu int) nvmlib.ComputeMode {
	t.Helper()
	g, err := e.lib.GPU(gpu)
	if err != nil {
		t.Fatal(err)
	}
	return g.ComputeMode
}

func clientsOf(t *testing.T, m *mps.Manager, gpu string) map[string]mps.Client {
	t.Helper()
	d, err := m.Attach(context.Background(), gpu)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]mps.Client{}
	for _, c := range d.Clients() {
		out[c.ID] = c
	}
	return out
}

// Two claims of 10Gi/20% and 20Gi/40% on a shared MPS GPU: the daemon is held server-side to the
// larger, the smaller is cooperative below it; each container gets its own limits; the ceiling comes
// down when the larger goes; the daemon stops and the compute mode comes back after the last.
func TestSharedMPSPrepareUnprepare(t *testing.T) {
	e, m := sharedEnv(t)
	gpu1, _ := e.lib.GPU(1)
	if computeMode(t, e, 1) != nvmlib.ComputeModeDefault {
		t.Fatalf("GPU 1 starts in %s", computeMode(t, e, 1))
	}
	a := e.shareClaim("small", "gpu-1", "memory", "10Gi", "computePercent", "20")
	b := e.shareClaim("large", "gpu-1", "memory", "20Gi", "computePercent", "40")
	devA := e.mustPrepare(a)
	if got, want := mpsCommands(t, e), []string{"set_default_active_thread_percentage 20", "set_default_device_pinned_mem_limit 0 10240M"}; !slices.Equal(got, want) {
		t.Fatalf("after the first claim the daemon was told %q, want %q", got, want)
	}
	if computeMode(t, e, 1) != nvmlib.ComputeModeExclusiveProcess || daemonStarts(t, e) != 1 {
		t.Fatalf("GPU 1 in %s with %d daemon starts", computeMode(t, e, 1), daemonStarts(t, e))
	}
	// One claim alone: its limits are the daemon's, so everything is server-side.
	ca := clientsOf(t, m, gpu1.UUID)[string(a.UID)+"/"+string(*a.Status.Allocation.Devices.Results[0].ShareID)]
	if ca.Enforcement.Memory != mps.LevelServerSide || ca.Enforcement.Compute != mps.LevelServerSide {
		t.Errorf("a claim alone: %+v, want server-side", ca.Enforcement)
	}

	devB := e.mustPrepare(b)
	if got, want := mpsCommands(t, e)[2:], []string{"get_server_list", "set_default_active_thread_percentage 40", "set_default_device_pinned_mem_limit 0 20480M"}; !slices.Equal(got, want) {
		t.Fatalf("the second claim raised the daemon with %q, want %q", got, want)
	}
	if n := daemonStarts(t, e); n != 1 {
		t.Errorf("%d daemon starts, want 1 (adopted)", n)
	}
	clients := clientsOf(t, m, gpu1.UUID)
	idA := string(a.UID) + "/" + string(*a.Status.Allocation.Devices.Results[0].ShareID)
	idB := string(b.UID) + "/" + string(*b.Status.Allocation.Devices.Results[0].ShareID)
	if len(clients) != 2 {
		t.Fatalf("clients %v", clients)
	}
	// The larger claim is held server-side; the smaller runs with its own limits cooperatively and
	// can reach the daemon's, not more.
	if en := clients[idB].Enforcement; en.Memory != mps.LevelServerSide || en.Compute != mps.LevelServerSide || en.MemoryLimitMiB != 20480 {
		t.Errorf("larger claim: %+v", en)
	}
	if en := clients[idA].Enforcement; en.Memory != mps.LevelCooperative || en.Compute != mps.LevelCooperative ||
		en.MemoryLimitMiB != 10240 || en.MemoryCeilingMiB != 20480 || en.ActiveThreadPercentage != 20 || en.ThreadCeiling != 40 || en.Faults != mps.LevelNone {
		t.Errorf("smaller claim: %+v", en)
	}
	// What each container gets, from its claim's CDI spec as the runtime reads it.
	pipe := m.PathsFor(gpu1.UUID).Pipe
	for _, tc := range []struct {
		devs     []string
		mem, pct string
	}{{devA[0].CDIDeviceIDs, "10240", "20"}, {devB[0].CDIDeviceIDs, "20480", "40"}} {
		env, mounts := deviceEdits(t, e, tc.devs[0])
		for _, kv := range []string{"CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=" + tc.pct,
			"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=" + tc.mem + "M", EnvMemoryLimitMiB + "=" + tc.mem, EnvComputePercent + "=" + tc.pct} {
			if !slices.Contains(env, kv) {
				t.Errorf("%s: env %v lacks %s", tc.devs[0], env, kv)
			}
		}
		if mounts["/tmp/nvidia-mps"] != pipe || mounts["/dev/shm"] == "" {
			t.Errorf("%s: mounts %v, want the pipe directory %s and shm", tc.devs[0], mounts, pipe)
		}
	}
	cp, err := e.checkpoint(b.UID)
	if err != nil || cp.Devices[0].MemoryMiB != 20480 || cp.Devices[0].ComputePercent != 40 || cp.Devices[0].MPSClient != idB || cp.Devices[0].Isolation != "mps" {
		t.Fatalf("checkpoint of the larger claim: %+v %v", cp, err)
	}

	// The larger claim goes: the daemon comes down to the smaller.
	if err := e.unprepare(b); err != nil {
		t.Fatal(err)
	}
	if got, want := mpsCommands(t, e)[5:], []string{"get_server_list", "set_default_active_thread_percentage 20", "set_default_device_pinned_mem_limit 0 10240M"}; !slices.Equal(got, want) {
		t.Fatalf("after the larger claim went the daemon was told %q, want %q", got, want)
	}
	if cl := clientsOf(t, m, gpu1.UUID); len(cl) != 1 || cl[idA].Enforcement.Memory != mps.LevelServerSide {
		t.Errorf("remaining clients %+v", cl)
	}
	// The last claim goes: the daemon is told to quit, stopped, and the compute mode restored.
	if err := e.unprepare(a); err != nil {
		t.Fatal(err)
	}
	if got := mpsCommands(t, e)[8:]; !slices.Equal(got, []string{"quit"}) {
		t.Errorf("after the last claim: %q, want quit", got)
	}
	if _, err := m.Attach(context.Background(), gpu1.UUID); !errors.Is(err, mps.ErrNotRunning) {
		t.Errorf("the daemon still runs: %v", err)
	}
	if computeMode(t, e, 1) != nvmlib.ComputeModeDefault {
		t.Errorf("compute mode %s after the last claim, want Default", computeMode(t, e, 1))
	}
	if e.hasSpec(a.UID) || e.hasSpec(b.UID) {
		t.Error("CDI specs left")
	}
}

// Equal claims: the daemon's limits are each claim's, so every claim is held server-side.
func TestSharedMPSEqualClaimsServerSide(t *testing.T) {
	e, m := sharedEnv(t)
	gpu1, _ := e.lib.GPU(1)
	for i := range 2 {
		e.mustPrepare(e.shareClaim(fmt.Sprintf("eq-%d", i), "gpu-1", "memory", "10Gi", "computePercent", "20"))
	}
	cl := clientsOf(t, m, gpu1.UUID)
	if len(cl) != 2 {
		t.Fatalf("clients %v", cl)
	}
	for id, c := range cl {
		if c.Enforcement.Memory != mps.LevelServerSide || c.Enforcement.Compute != mps.LevelServerSide || c.Enforcement.MemoryLimitMiB != 10240 {
			t.Errorf("%s: %+v, want server-side at 10240 MiB", id, c.Enforcement)
		}
	}
	// The second claim changed nothing on the daemon.
	if got := mpsCommands(t, e); len(got) != 2 {
		t.Errorf("commands %q, want only the first claim's two", got)
	}
}

// A crash between the checkpoint's phases is rolled back at restart: after PrepareStarted nothing
// was done; before PrepareCompleted the client was added and the daemon raised, and both are undone.
func TestSharedMPSCrashRolledBack(t *testing.T) {
	for _, point := range []string{"afterStarted", "beforeCompleted"} {
		t.Run(point, func(t *testing.T) {
			e, m := sharedEnv(t)
			gpu1, _ := e.lib.GPU(1)
			keep := e.shareClaim("keep", "gpu-1", "memory", "10Gi", "computePercent", "20")
			e.mustPrepare(keep)
			crash := errors.New("simulated crash")
			if point == "afterStarted" {
				e.d.hooks.afterStarted = func(ClaimRef) error { return crash }
			} else {
				e.d.hooks.beforeCompleted = func(ClaimRef) error { return crash }
			}
			c := e.shareClaim("crashy", "gpu-1", "memory", "30Gi", "computePercent", "50")
			if r := e.prepare(c)[c.UID]; !errors.Is(r.Err, crash) {
				t.Fatalf("prepare: %v", r.Err)
			}
			d, _ := m.Attach(context.Background(), gpu1.UUID)
			wantRaised := point == "beforeCompleted"
			if raised := d.Limits().PinnedMemoryMiB == 30720; raised != wantRaised || len(d.Clients()) != map[bool]int{true: 2, false: 1}[wantRaised] {
				t.Fatalf("after the crash: daemon %s with %d clients", d.Limits(), len(d.Clients()))
			}
			e.start(WithMPS(m)) // the restart reconciles
			if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) {
				t.Errorf("checkpoint of the crashed prepare: %v", err)
			}
			d, err := m.Attach(context.Background(), gpu1.UUID)
			if err != nil {
				t.Fatal(err)
			}
			cl := d.Clients()
			if d.Limits() != (mps.Limits{ActiveThreadPercentage: 20, PinnedMemoryMiB: 10240}) || len(cl) != 1 || !strings.HasPrefix(cl[0].ID, string(keep.UID)+"/") {
				t.Errorf("after the restart: daemon %s, clients %+v", d.Limits(), cl)
			}
			// The crashed claim prepares from scratch, then both unprepare and the daemon stops.
			e.mustPrepare(c)
			for _, x := range []*resourceapi.ResourceClaim{c, keep} {
				if err := e.unprepare(x); err != nil {
					t.Fatal(err)
				}
			}
			if computeMode(t, e, 1) != nvmlib.ComputeModeDefault {
				t.Errorf("compute mode %s", computeMode(t, e, 1))
			}
		})
	}
}

// Isolation time-sliced: the container gets the whole GPU and, for information, its share; nothing
// is told to MPS and the compute mode stays.
func TestSharedTimeSlicedPrepare(t *testing.T) {
	e, _ := sharedEnv(t)
	gpu0, _ := e.lib.GPU(0)
	c := e.shareClaim("ts", "gpu-0", "memory", "12Gi", "computePercent", "30")
	devs := e.mustPrepare(c)
	if len(devs) != 1 || devs[0].ShareID == nil || len(devs[0].CDIDeviceIDs) != 1 || !strings.HasSuffix(devs[0].CDIDeviceIDs[0], "_"+gpu0.UUID) {
		t.Fatalf("devices %+v", devs)
	}
	env, mounts := deviceEdits(t, e, devs[0].CDIDeviceIDs[0])
	for _, kv := range []string{EnvMemoryLimitMiB + "=12288", EnvComputePercent + "=30"} {
		if !slices.Contains(env, kv) {
			t.Errorf("env %v lacks %s", env, kv)
		}
	}
	for _, kv := range env {
		if strings.HasPrefix(kv, "CUDA_MPS_") {
			t.Errorf("a time-sliced share got %s", kv)
		}
	}
	if len(mounts) != 0 {
		t.Errorf("mounts %v", mounts)
	}
	cache, _ := cdi.NewCache(cdi.WithSpecDirs(e.gen.SpecDir()), cdi.WithAutoRefresh(false))
	nodes := cache.GetDevice(devs[0].CDIDeviceIDs[0]).ContainerEdits.DeviceNodes
	if len(nodes) != 1 || nodes[0].Path != fmt.Sprintf("/dev/nvidia%d", gpu0.Minor) {
		t.Errorf("device nodes %+v, want the GPU's", nodes)
	}
	// Defaults when the allocation names no consumed capacity.
	d := e.shareClaim("ts-default", "gpu-0")
	e.mustPrepare(d)
	if cp, err := e.checkpoint(d.UID); err != nil || cp.Devices[0].MemoryMiB != 1024 || cp.Devices[0].ComputePercent != 10 || cp.Devices[0].MPSClient != "" {
		t.Errorf("default share checkpoint %+v %v", cp, err)
	}
	if got := mpsCommands(t, e); len(got) != 0 || daemonStarts(t, e) != 0 || computeMode(t, e, 0) != nvmlib.ComputeModeDefault {
		t.Errorf("time-sliced shares reached MPS: %q", got)
	}
	if err := e.unprepare(c); err != nil || e.hasSpec(c.UID) {
		t.Errorf("unprepare: %v", err)
	}
}

// The driver's own accounting refuses what the scheduler should not have allocated, and claim
// parameters may only lower a share's MPS limits.
func TestSharedRefusals(t *testing.T) {
	e, m := sharedEnv(t)
	gpu1, _ := e.lib.GPU(1)
	e.mustPrepare(e.shareClaim("big", "gpu-0", "memory", "70Gi"))
	over := e.shareClaim("over", "gpu-0", "memory", "10Gi")
	if r := e.prepare(over)[over.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "more than its 80535 MiB") {
		t.Errorf("over the memory: %v", r.Err)
	}
	mpsCfg := func(doc string) resourceapi.DeviceAllocationConfiguration {
		return gpuConfig(nil, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":`+doc+`}`)
	}
	withCfg := func(name, doc string) *resourceapi.ResourceClaim {
		c := e.shareClaim(name, "gpu-1", "memory", "8Gi", "computePercent", "20")
		c.Status.Allocation.Devices.Config = []resourceapi.DeviceAllocationConfiguration{mpsCfg(doc)}
		return c
	}
	for _, tc := range []struct{ doc, msg string }{
		{`{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":50}}`, "sharing.mps.defaultActiveThreadPercentage 50 is above the claim's computePercent 20"},
		{`{"strategy":"MPS","mps":{"defaultPerDevicePinnedMemoryLimit":{"1":"9Gi"}}}`, "sharing.mps.defaultPerDevicePinnedMemoryLimit[1] 9Gi is above the claim's memory 8192 MiB"},
		{`{"strategy":"TimeSlicing"}`, "strategy TimeSlicing does not apply"},
	} {
		c := withCfg(fmt.Sprintf("bad-%d", len(tc.msg)), tc.doc)
		if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), tc.msg) {
			t.Errorf("%s: %v, want …%s…", tc.doc, r.Err, tc.msg)
		}
	}
	// Lowering is honoured: the container and the MPS client get the lower limits.
	low := withCfg("low", `{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":10,"defaultPinnedDeviceMemoryLimit":"4Gi"}}`)
	devs := e.mustPrepare(low)
	env, _ := deviceEdits(t, e, devs[0].CDIDeviceIDs[0])
	if !slices.Contains(env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=10") || !slices.Contains(env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=4096M") {
		t.Errorf("lowered share env %v", env)
	}
	d, err := m.Attach(context.Background(), gpu1.UUID)
	if err != nil || d.Limits() != (mps.Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 4096}) {
		t.Errorf("daemon %v %v", d.Limits(), err)
	}
	for i := range 2 {
		e.mustPrepare(e.shareClaim(fmt.Sprintf("c%d", i), "gpu-1", "memory", "1Gi"))
	}
	if c := e.shareClaim("fourth", "gpu-1", "memory", "1Gi"); e.prepare(c)[c.UID].Err == nil {
		t.Error("a fourth claim on a GPU with maxClients 3 was prepared")
	}
	// One claim given the same shared GPU twice is refused: one container, one share.
	twice := e.claim("twice", []alloc{{"a", "gpu-0", true}, {"b", "gpu-0", true}})
	if r := e.prepare(twice)[twice.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "given to this claim twice") {
		t.Errorf("twice: %v", r.Err)
	}
}

// The MPS daemon dies (with the container that ran it) while a claim is prepared: the claim still
// unprepares, and the daemon's record is cleared with the GPU's compute mode put back.
func TestSharedMPSDeadDaemonStillUnprepares(t *testing.T) {
	e, m := sharedEnv(t)
	gpu1, _ := e.lib.GPU(1)
	a := e.shareClaim("a", "gpu-1", "memory", "10Gi", "computePercent", "20")
	e.mustPrepare(a)
	dm, err := m.Attach(e.ctx, gpu1.UUID)
	if err != nil {
		t.Fatal(err)
	}
	p, err := os.FindProcess(dm.PID())
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	poll(t, "the daemon gone", func() (bool, error) {
		_, err := m.Attach(e.ctx, gpu1.UUID)
		return errors.Is(err, mps.ErrNotRunning), nil
	})
	if err := e.unprepare(a); err != nil {
		t.Fatalf("unprepare with the daemon gone: %v", err)
	}
	if _, err := e.checkpoint(a.UID); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("checkpoint left: %v", err)
	}
	if cm := computeMode(t, e, 1); cm != nvmlib.ComputeModeDefault {
		t.Fatalf("GPU 1 left in %s", cm)
	}
}
