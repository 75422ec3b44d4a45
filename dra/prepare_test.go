package dra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"

	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

func mixedEnv(t testing.TB, opts ...Option) *env {
	t.Helper()
	lib, node := openSim(t, "dgx-h100")
	applyMIG(t, lib, 2, map[string]int{"1g.10gb": 7})
	applyMIG(t, lib, 3, map[string]int{"3g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1})
	return newEnv(t, lib, node, mixedProfile, opts...)
}

func claimStatus(t testing.TB, e *env, c *resourceapi.ResourceClaim) []resourceapi.AllocatedDeviceStatus {
	t.Helper()
	got, err := e.client.ResourceV1().ResourceClaims(c.Namespace).Get(context.Background(), c.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got.Status.Devices
}

func TestPrepareUnprepare(t *testing.T) {
	e := mixedEnv(t)
	c := e.claim("one", []alloc{{"gpu", "gpu-0", false}, {"mig", "gpu-2-mig-" + migOf(t, e, 2), false}})
	devs := e.mustPrepare(c)
	if len(devs) != 2 {
		t.Fatalf("devices %+v", devs)
	}
	for i, want := range []string{"gpu-0", c.Status.Allocation.Devices.Results[1].Device} {
		d := devs[i]
		// A whole GPU and an existing MIG device: answered from the static spec, no claim spec.
		if d.PoolName != testNode || d.DeviceName != want || len(d.CDIDeviceIDs) != 1 || !strings.HasPrefix(d.CDIDeviceIDs[0], "tessera.dev/gpu=dra-") {
			t.Errorf("device %d: %+v", i, d)
		}
	}
	if e.hasSpec(c.UID) {
		t.Error("a claim of a whole GPU and an existing MIG device got a transient spec")
	}
	// The spec resolves as the runtime resolves it, and the GPU's node is in it.
	cache, err := cdi.NewCache(cdi.WithSpecDirs(e.gen.SpecDir()), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if dev := cache.GetDevice(devs[0].CDIDeviceIDs[0]); dev == nil {
		t.Fatalf("the runtime's CDI cache has no %s: %v", devs[0].CDIDeviceIDs[0], cache.GetErrors())
	}
	cp, err := e.checkpoint(c.UID)
	if err != nil || cp.Phase != PhaseCompleted || cp.BootID != e.d.BootID() || cp.Format != CheckpointFormat || len(cp.Devices) != 2 {
		t.Fatalf("checkpoint %+v %v", cp, err)
	}

	// Idempotent: the same answer, nothing written again.
	st, _ := os.Stat(filepath.Join(e.stateDir, "checkpoints", string(c.UID)+".json"))
	again := e.mustPrepare(c)
	if fmt.Sprint(again) != fmt.Sprint(devs) {
		t.Errorf("second Prepare %+v, first %+v", again, devs)
	}
	st2, _ := os.Stat(filepath.Join(e.stateDir, "checkpoints", string(c.UID)+".json"))
	if !st.ModTime().Equal(st2.ModTime()) {
		t.Error("a repeated Prepare wrote the checkpoint again")
	}

	// Claim device status: conditions and the device UUID.
	poll(t, "claim device status", func() (bool, error) { return len(claimStatus(t, e, c)) == 2, nil })
	for _, s := range claimStatus(t, e, c) {
		var data DeviceData
		if err := json.Unmarshal(s.Data.Raw, &data); err != nil {
			t.Fatal(err)
		}
		if s.Driver != DriverName || s.Pool != testNode || len(s.Conditions) != 1 || s.Conditions[0].Type != ConditionReady ||
			s.Conditions[0].Status != metav1.ConditionTrue || !strings.HasPrefix(data.UUID, map[bool]string{true: "MIG-", false: "GPU-"}[strings.Contains(s.Device, "mig")]) {
			t.Errorf("status %+v data %+v", s, data)
		}
	}

	if err := e.unprepare(c); err != nil {
		t.Fatal(err)
	}
	if e.hasSpec(c.UID) {
		t.Error("CDI spec left after Unprepare")
	}
	if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) {
		t.Errorf("checkpoint left after Unprepare: %v", err)
	}
	poll(t, "claim device status removed", func() (bool, error) { return len(claimStatus(t, e, c)) == 0, nil })
	if err := e.unprepare(c); err != nil {
		t.Errorf("a second Unprepare: %v", err)
	}
	if ok, failed := e.d.Metrics().Prepared(); ok != 2 || failed != 0 {
		t.Errorf("metrics: %d prepared, %d failed", ok, failed)
	}
}

// migOf returns "<gi>-<ci>" of GPU gpu's first MIG device.
func migOf(t testing.TB, e *env, gpu int) string {
	t.Helper()
	for _, d := range e.d.Inventory().Devices {
		if d.GPU.Index == gpu && d.MIG != nil {
			return fmt.Sprintf("%d-%d", d.MIG.GI, d.MIG.CI)
		}
	}
	t.Fatalf("GPU %d has no MIG device", gpu)
	return ""
}

func TestPrepareRefusesDeviceInUse(t *testing.T) {
	e := mixedEnv(t)
	a := e.claim("a", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(a)
	b := e.claim("b", []alloc{{"gpu", "gpu-0", false}})
	if r := e.prepare(b)[b.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "in use by claim ns/a") {
		t.Fatalf("a second claim on gpu-0: %v", r.Err)
	}
	if e.hasSpec(b.UID) {
		t.Error("the refused claim got a spec")
	}
	// A time-sliced GPU takes many claims.
	for i := range 3 {
		c := e.claim(fmt.Sprintf("ts-%d", i), []alloc{{"gpu", "gpu-5", true}})
		if devs := e.mustPrepare(c); devs[0].ShareID == nil {
			t.Errorf("time-sliced claim %d: no share ID in the result", i)
		}
	}
	// Unknown devices, foreign pools and share IDs on exclusive devices are refused.
	for _, tc := range []struct {
		a    alloc
		want string
	}{
		{alloc{"gpu", "gpu-7", false}, "not (or no longer) published"},
		{alloc{"gpu", "gpu-1", true}, "share ID"},
		{alloc{"gpu", "gpu-5", false}, "share ID"},
	} {
		c := e.claim("bad-"+tc.a.device+fmt.Sprint(tc.a.share), []alloc{tc.a})
		if r := e.prepare(c)[c.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.a, r.Err, tc.want)
		}
	}
	// After a is unprepared, b gets gpu-0.
	if err := e.unprepare(a); err != nil {
		t.Fatal(err)
	}
	e.mustPrepare(b)
}

func TestOpaqueParametersValidatedAtPrepare(t *testing.T) {
	e := mixedEnv(t)
	ts := func(iv string) string {
		return `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"TimeSlicing","timeSlicing":{"interval":"` + iv + `"}}}`
	}
	mig := "gpu-2-mig-" + migOf(t, e, 2)
	for _, tc := range []struct {
		name string
		a    alloc
		cfg  string
		want string // "" for success
	}{
		{"whole-long", alloc{"gpu", "gpu-0", false}, ts("Long"), ""},
		{"bad-kind", alloc{"gpu", "gpu-1", false}, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"Nope"}`, "kind"},
		{"unknown-field", alloc{"gpu", "gpu-1", false}, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","bogus":1}`, "bogus"},
		{"mps", alloc{"gpu", "gpu-1", false}, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS"}}`, "MPS is not served"},
		{"mig-interval", alloc{"gpu", mig, false}, ts("Short"), "does not apply to MIG"},
		{"ts-other-interval", alloc{"gpu", "gpu-4", true}, ts("Long"), "interval Medium by the sharing profile"},
		{"ts-same-interval", alloc{"gpu", "gpu-4", true}, ts("Medium"), ""},
		{"config-for-other-request", alloc{"gpu", "gpu-1", false}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfgs []resourceapi.DeviceAllocationConfiguration
			switch tc.name {
			case "config-for-other-request":
				cfgs = append(cfgs, gpuConfig([]string{"other"}, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS"}}`))
			default:
				cfgs = append(cfgs, gpuConfig([]string{"gpu"}, tc.cfg))
			}
			c := e.claim(tc.name, []alloc{tc.a}, cfgs...)
			r := e.prepare(c)[c.UID]
			switch {
			case tc.want == "" && r.Err != nil:
				t.Fatalf("refused: %v", r.Err)
			case tc.want != "" && (r.Err == nil || !strings.Contains(r.Err.Error(), tc.want)):
				t.Fatalf("got %v, want an error with %q", r.Err, tc.want)
			}
			if r.Err == nil {
				if err := e.unprepare(c); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	// The whole GPU got the claim's interval at Prepare, and Default back at Unprepare; the profile's
	// time-sliced GPUs got theirs at start.
	calls := e.slicer.Calls()
	for _, want := range []string{"4=Medium", "5=Default", "0=Long", "0=Default"} {
		if !slices.Contains(calls, want) {
			t.Errorf("time-slice calls %v lack %s", calls, want)
		}
	}
	if i, j := slices.Index(calls, "0=Long"), slices.Index(calls, "0=Default"); i > j {
		t.Errorf("interval restored before it was set: %v", calls)
	}
}

// A claim prepared by one driver instance unprepares in the next, after the claim was deleted.
func TestUnprepareWithoutClaimAfterRestart(t *testing.T) {
	e := mixedEnv(t, WithVersion("0.1.0"))
	c := e.claim("gone", []alloc{{"gpu", "gpu-1", false}})
	e.mustPrepare(c)
	if cp, _ := e.checkpoint(c.UID); cp.DriverVersion != "0.1.0" {
		t.Fatalf("checkpoint written by %q", cp.DriverVersion)
	}
	if err := e.client.ResourceV1().ResourceClaims("ns").Delete(context.Background(), c.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.start(WithVersion("0.2.0")) // the next release
	if !e.resolves(c.UID) {
		t.Fatal("a prepared claim's CDI device does not resolve after a restart")
	}
	// gpu-1 is still in use for the new instance.
	other := e.claim("other", []alloc{{"gpu", "gpu-1", false}})
	if r := e.prepare(other)[other.UID]; r.Err == nil {
		t.Fatal("the new instance handed out a GPU prepared by the old one")
	}
	if err := e.unprepare(c); err != nil {
		t.Fatal(err)
	}
	if e.hasSpec(c.UID) {
		t.Error("spec left")
	}
	e.mustPrepare(other)
}

// A checkpoint of format 1, as this release writes it, stays readable by later releases: this file
// is frozen; a new format adds a conversion, never breaks it.
func TestCheckpointFormat1Frozen(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "checkpoint-format1.json"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := decodeCheckpoint(data)
	if err != nil {
		t.Fatal(err)
	}
	if c.Claim.Name != "frozen" || c.Phase != PhaseCompleted || len(c.Devices) != 1 || c.Devices[0].CDI.GPU.Index != 0 || c.Devices[0].Interval != "Long" {
		t.Fatalf("decoded %+v", c)
	}
	// Damage and a newer format are refused, not trusted.
	if _, err := decodeCheckpoint([]byte(strings.Replace(string(data), `"frozen"`, `"frozen2"`, 1))); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("tampered checkpoint: %v", err)
	}
	s := &checkpoints{dir: t.TempDir()}
	c.Format = CheckpointFormat + 1
	if err := s.write(c); err != nil {
		t.Fatal(err)
	}
	if _, err := s.read(c.Claim.UID); err == nil || !strings.Contains(err.Error(), "newer driver") {
		t.Errorf("newer format: %v", err)
	}

	// Unprepare from the frozen file: its interval is restored and the checkpoint removed.
	e := mixedEnv(t)
	if err := os.WriteFile(filepath.Join(e.stateDir, "checkpoints", string(c.Claim.UID)+".json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	obj := &resourceapi.ResourceClaim{ObjectMeta: metav1.ObjectMeta{Namespace: c.Claim.Namespace, Name: c.Claim.Name, UID: c.Claim.UID}}
	if err := e.unprepare(obj); err != nil {
		t.Fatal(err)
	}
	if _, err := e.checkpoint(c.Claim.UID); !errors.Is(err, ErrNoCheckpoint) || !slices.Contains(e.slicer.Calls(), "0=Default") {
		t.Errorf("after unprepare: %v, calls %v", err, e.slicer.Calls())
	}
}

// A crash between the two checkpoint phases: at the next start the prepare is rolled back (spec
// removed, interval restored), and the kubelet's retry prepares it cleanly.
func TestCrashBetweenPhases(t *testing.T) {
	for _, point := range []string{"afterStarted", "beforeCompleted"} {
		t.Run(point, func(t *testing.T) {
			e := mixedEnv(t)
			crash := errors.New("simulated crash")
			switch point {
			case "afterStarted":
				e.d.hooks.afterStarted = func(ClaimRef) error { return crash }
			default:
				e.d.hooks.beforeCompleted = func(ClaimRef) error { return crash }
			}
			c := e.claim("crashy", []alloc{{"gpu", "gpu-0", false}}, gpuConfig(nil, `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"TimeSlicing","timeSlicing":{"interval":"Short"}}}`))
			if r := e.prepare(c)[c.UID]; !errors.Is(r.Err, crash) {
				t.Fatalf("prepare: %v", r.Err)
			}
			cp, err := e.checkpoint(c.UID)
			if err != nil || cp.Phase != PhaseStarted {
				t.Fatalf("after the crash: checkpoint %+v %v", cp, err)
			}
			if e.hasSpec(c.UID) {
				t.Fatal("a whole GPU got a claim spec (it is answered from the static spec)")
			}
			e.start()
			if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) {
				t.Errorf("half-done checkpoint not rolled back: %v", err)
			}
			if e.hasSpec(c.UID) {
				t.Error("half-done spec not removed")
			}
			if point == "beforeCompleted" && !slices.Contains(e.slicer.Calls(), "0=Default") {
				t.Errorf("interval not restored: %v", e.slicer.Calls())
			}
			e.mustPrepare(c)
			if cp, _ := e.checkpoint(c.UID); cp.Phase != PhaseCompleted {
				t.Errorf("retry: phase %s", cp.Phase)
			}
		})
	}
}

// A claim whose Prepare changes nothing on the node (a whole GPU, no interval) writes no
// PrepareStarted checkpoint and, answered from the static spec, no claim spec: a crash before
// PrepareCompleted leaves nothing behind, and the retry prepares the claim cleanly.
func TestCrashWithoutNodeChangesLeavesNothing(t *testing.T) {
	e := mixedEnv(t)
	crash := errors.New("simulated crash")
	var atStarted error
	e.d.hooks.afterStarted = func(ref ClaimRef) error {
		_, atStarted = e.checkpoint(ref.UID)
		return nil
	}
	e.d.hooks.beforeCompleted = func(ClaimRef) error { return crash }
	c := e.claim("plain", []alloc{{"gpu", "gpu-0", false}})
	if r := e.prepare(c)[c.UID]; !errors.Is(r.Err, crash) {
		t.Fatalf("prepare: %v", r.Err)
	}
	if !errors.Is(atStarted, ErrNoCheckpoint) {
		t.Errorf("a whole-GPU claim wrote a PrepareStarted checkpoint: %v", atStarted)
	}
	if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) || e.hasSpec(c.UID) {
		t.Fatalf("after the crash: checkpoint %v, claim spec %v", err, e.hasSpec(c.UID))
	}
	e.d.hooks.afterStarted, e.d.hooks.beforeCompleted = nil, nil
	e.start()
	e.mustPrepare(c)
	if cp, err := e.checkpoint(c.UID); err != nil || cp.Phase != PhaseCompleted || !e.resolves(c.UID) {
		t.Errorf("retry: %+v %v", cp, err)
	}
}

// A simulated reboot (new boot ID, MIG instances gone): prepares of the earlier boot are dropped at
// start and the claims prepare again; a missing spec of this boot is written again.
func TestRebootAndMissingSpec(t *testing.T) {
	e := mixedEnv(t)
	whole := e.claim("whole", []alloc{{"gpu", "gpu-0", false}})
	mig := e.claim("mig", []alloc{{"gpu", "gpu-2-mig-" + migOf(t, e, 2), false}})
	e.mustPrepare(whole)
	e.mustPrepare(mig)

	// Same boot, spec deleted behind our back: written again at start (NVIDIA's #1380-like loss).
	if err := os.Remove(e.staticSpecPath()); err != nil {
		t.Fatal(err)
	}
	e.start()
	if !e.resolves(whole.UID) || !e.resolves(mig.UID) {
		t.Fatal("devices of prepared claims do not resolve after a restart")
	}
	// Also on the Prepare path (the kubelet prepares again after its own restart).
	_ = os.Remove(e.staticSpecPath())
	e.mustPrepare(whole)
	if !e.resolves(whole.UID) {
		t.Fatal("Prepare of a prepared claim did not restore its spec")
	}

	old := e.d.BootID()
	if err := e.node.Reboot(); err != nil {
		t.Fatal(err)
	}
	e.start()
	if e.d.BootID() == old {
		t.Fatal("boot ID did not change")
	}
	for _, c := range []*resourceapi.ResourceClaim{whole, mig} {
		if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) {
			t.Errorf("%s: checkpoint of the earlier boot kept: %v", c.Name, err)
		}
		if e.hasSpec(c.UID) {
			t.Errorf("%s: spec of the earlier boot kept", c.Name)
		}
	}
	// The whole GPU prepares again; the MIG device is gone with the reboot, and Prepare says so.
	e.mustPrepare(whole)
	if r := e.prepare(mig)[mig.UID]; r.Err == nil || !strings.Contains(r.Err.Error(), "no longer") {
		t.Errorf("MIG claim after reboot: %v", r.Err)
	}
	if err := e.unprepare(mig); err != nil {
		t.Errorf("unprepare of a claim the reboot dropped: %v", err)
	}
}

// 100 claims on 100 different devices prepared at once (15 A100s cut into 1g.5gb: 105 MIG devices),
// each with its own spec; then unprepared at once.
func TestHundredParallelPrepares(t *testing.T) {
	spec, err := sim.ParseNodeSpec([]byte("name: big\ngpus:\n  - {model: a100-sxm4-40gb, count: 15}\n"), "test")
	if err != nil {
		t.Fatal(err)
	}
	node, err := sim.Open(spec, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	cfg := "version: v1\nmig-configs:\n  c:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.5gb\": 7}\n"
	applyLayout(t, lib, cfg)
	e := newEnv(t, lib, node, "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: dra, mode: mig-static, mig: {layout: existing}}\n")
	devs := e.d.Inventory().Devices
	if len(devs) != 105 {
		t.Fatalf("%d devices", len(devs))
	}
	var claims []*resourceapi.ResourceClaim
	for i := range 100 {
		claims = append(claims, e.claim(fmt.Sprintf("p%d", i), []alloc{{"gpu", devs[i].Name, false}}))
	}
	var wg sync.WaitGroup
	errs := make([]error, len(claims))
	ids := make([]string, len(claims))
	for i, c := range claims {
		wg.Go(func() {
			r, err := e.d.PrepareResourceClaims(context.Background(), []*resourceapi.ResourceClaim{c})
			if err == nil {
				err = r[c.UID].Err
			}
			errs[i] = err
			if err == nil {
				ids[i] = r[c.UID].Devices[0].CDIDeviceIDs[0]
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if len(slices.Compact(slices.Sorted(slices.Values(ids)))) != 100 {
		t.Fatal("CDI device IDs are not distinct")
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(e.gen.SpecDir()), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if cache.GetDevice(id) == nil {
			t.Fatalf("the runtime cannot resolve %s: %v", id, cache.GetErrors())
		}
	}
	var objs []*resourceapi.ResourceClaim
	objs = append(objs, claims...)
	for _, c := range objs {
		wg.Go(func() {
			if err := e.unprepare(c); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	left, _ := os.ReadDir(filepath.Join(e.stateDir, "checkpoints"))
	specs, _ := filepath.Glob(filepath.Join(e.gen.SpecDir(), e.gen.ClaimSpecName("*")))
	if len(left) != 0 || len(specs) != 0 {
		t.Errorf("%d checkpoints and %d claim specs left", len(left), len(specs))
	}
}

func applyLayout(t testing.TB, lib nvmlib.Interface, doc string) {
	t.Helper()
	cfg, err := mig.ParseConfig([]byte(doc), "test")
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := mig.Apply(context.Background(), lib, cfg, "c", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("mig apply: %v %+v", err, rep)
	}
}

// No node-wide lock: while GPU 0's lock is held (a slow Prepare there, or another driver instance in
// a rolling update), a claim on GPU 1 prepares; the claim on GPU 0 waits and then prepares.
func TestNoNodeWideLock(t *testing.T) {
	e := mixedEnv(t)
	gpu0 := e.d.Inventory().Devices[0].GPU.UUID
	// A second lock set on the same directory stands for another driver instance: file locks.
	other, err := newGPULocks(filepath.Join(e.stateDir, "locks"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	unlock, err := other.Lock(context.Background(), []string{gpu0})
	if err != nil {
		t.Fatal(err)
	}
	c0 := e.claim("on-0", []alloc{{"gpu", "gpu-0", false}})
	c1 := e.claim("on-1", []alloc{{"gpu", "gpu-1", false}})
	done0 := make(chan error, 1)
	go func() { done0 <- e.prepare(c0)[c0.UID].Err }()
	e.mustPrepare(c1) // would hang behind a node-wide lock
	select {
	case err := <-done0:
		t.Fatalf("the claim on GPU 0 prepared while another instance held GPU 0's lock: %v", err)
	default:
	}
	unlock()
	select {
	case err := <-done0:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the claim on GPU 0 did not prepare after the lock was released")
	}
}

// Unprepare takes the locks of the GPUs the checkpoint file names, even when this instance's index
// remembers the claim on other GPUs (another instance prepared it again meanwhile): while another
// instance holds GPU 0's lock, the Unprepare of a claim now on GPU 0 waits.
func TestUnprepareLocksTheGPUsOnDisk(t *testing.T) {
	e := mixedEnv(t)
	c := e.claim("moved", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(c)
	// This instance's index says GPU 1: stale.
	stale := *e.d.indexed(c.UID)
	stale.Devices = slices.Clone(stale.Devices)
	stale.Devices[0].CDI.GPU.UUID = e.d.Inventory().Devices[1].GPU.UUID
	e.d.idxMu.Lock()
	e.d.index[c.UID] = &stale
	e.d.idxMu.Unlock()

	other, err := newGPULocks(filepath.Join(e.stateDir, "locks"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	unlock, err := other.Lock(context.Background(), []string{e.d.Inventory().Devices[0].GPU.UUID})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.unprepare(c) }()
	select {
	case err := <-done:
		t.Fatalf("unprepared while another instance held the lock of the GPU the checkpoint names: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	unlock()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the Unprepare did not finish after the lock was released")
	}
	if _, err := e.checkpoint(c.UID); !errors.Is(err, ErrNoCheckpoint) {
		t.Errorf("checkpoint after unprepare: %v", err)
	}
}

// A claim deallocated and allocated again (same UID, another device) without an Unprepare in
// between: the earlier preparation is undone, the new one made.
func TestReallocatedClaim(t *testing.T) {
	e := mixedEnv(t)
	c := e.claim("again", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(c)
	c.Status.Allocation.Devices.Results[0].Device = "gpu-1"
	devs := e.mustPrepare(c)
	if devs[0].DeviceName != "gpu-1" {
		t.Fatalf("prepared %+v", devs)
	}
	cp, err := e.checkpoint(c.UID)
	if err != nil || len(cp.Devices) != 1 || cp.Devices[0].Device != "gpu-1" {
		t.Fatalf("checkpoint %+v %v", cp, err)
	}
	other := e.claim("takes-0", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(other) // gpu-0 is free again
}

// One claim given a time-sliced GPU twice (two share IDs) gets one CDI device for both; an
// admin-access allocation of a device in use is not refused.
func TestSharedTwiceAndAdminAccess(t *testing.T) {
	e := mixedEnv(t)
	c := e.claim("twice", []alloc{{"a", "gpu-5", true}, {"b", "gpu-5", true}})
	devs := e.mustPrepare(c)
	if len(devs) != 2 || devs[0].CDIDeviceIDs[0] != devs[1].CDIDeviceIDs[0] || *devs[0].ShareID == *devs[1].ShareID {
		t.Fatalf("devices %+v", devs)
	}
	user := e.claim("user", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(user)
	admin := e.claim("admin", []alloc{{"gpu", "gpu-0", false}})
	admin.Status.Allocation.Devices.Results[0].AdminAccess = ptrTo(true)
	e.mustPrepare(admin)
}

func ptrTo[T any](v T) *T { return &v }

// Two driver instances on one state directory, as in a rolling update: each sees what the other
// prepared (per-GPU file locks, the checkpoint directory), and either can unprepare it.
func TestRollingUpdateInstancesShareState(t *testing.T) {
	e := mixedEnv(t)
	a := e.d
	ctx := context.Background()
	b, err := New(ctx, e.lib, WithNodeName(testNode), WithStateDir(e.stateDir), WithCDI(e.gen), WithBootID(e.node.BootID),
		WithTimeSlicer(e.slicer), WithResyncInterval(0), WithVersion("next"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	if err := b.SetResolution(ctx, e.res); err != nil {
		t.Fatal(err)
	}
	prep := func(d *Driver, c *resourceapi.ResourceClaim) error {
		r, err := d.PrepareResourceClaims(ctx, []*resourceapi.ResourceClaim{c})
		if err != nil {
			return err
		}
		return r[c.UID].Err
	}
	c1 := e.claim("by-a", []alloc{{"gpu", "gpu-1", false}})
	if err := prep(a, c1); err != nil {
		t.Fatal(err)
	}
	c2 := e.claim("by-b", []alloc{{"gpu", "gpu-1", false}})
	if err := prep(b, c2); err == nil || !strings.Contains(err.Error(), "in use by claim ns/by-a") {
		t.Fatalf("instance b handed out a GPU instance a prepared: %v", err)
	}
	r, err := b.UnprepareResourceClaims(ctx, []kubeletplugin.NamespacedObject{{NamespacedName: types.NamespacedName{Namespace: "ns", Name: "by-a"}, UID: c1.UID}})
	if err != nil || r[c1.UID] != nil {
		t.Fatalf("b unpreparing a's claim: %v %v", err, r[c1.UID])
	}
	if e.hasSpec(c1.UID) {
		t.Fatal("spec left")
	}
	if err := prep(a, c2); err != nil { // a learns from the directory that gpu-1 is free
		t.Fatalf("a after b unprepared: %v", err)
	}
}
