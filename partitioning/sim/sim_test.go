package sim_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

// open opens a built-in node in a fresh (or given) state directory through the same adapter the
// binaries use.
func open(t *testing.T, node, dir string) (nvmlib.Interface, *sim.Node) {
	t.Helper()
	spec, err := sim.BuiltinNode(node)
	if err != nil {
		t.Fatal(err)
	}
	if dir == "" {
		dir = t.TempDir()
	}
	n, err := sim.Open(spec, dir)
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvmlib.Wrap(n.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	return lib, n
}

func enableMIG(t *testing.T, lib nvmlib.Interface, gpu int) {
	t.Helper()
	ch, err := lib.SetMigMode(gpu, true)
	if err != nil || ch.Pending {
		t.Fatalf("enabling MIG on GPU %d: %+v, %v", gpu, ch, err)
	}
}

func profileID(t *testing.T, lib nvmlib.Interface, gpu int, name string) nvmlib.MigProfile {
	t.Helper()
	ps, err := lib.MigProfiles(gpu)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("GPU %d has no profile %q", gpu, name)
	return nvmlib.MigProfile{}
}

// create places profiles in order at the first free placement from the end (as the driver does
// without a placement) and returns the error of the first refusal.
func create(lib nvmlib.Interface, gpu int, profs []nvmlib.MigProfile) error {
	gis, _ := lib.GpuInstances(gpu)
	for _, p := range profs {
		var err error
		placed := false
		for i := len(p.Placements) - 1; i >= 0 && !placed; i-- {
			pl := p.Placements[i]
			overlap := false
			for _, gi := range gis {
				overlap = overlap || gi.Placement.Overlaps(pl)
			}
			if overlap {
				continue
			}
			var id int
			id, err = lib.CreateGpuInstance(gpu, p.ID, pl)
			if err == nil {
				placed = true
				gis = append(gis, nvmlib.GpuInstance{ID: id, Placement: pl})
			}
		}
		if !placed {
			if err == nil {
				// Every placement overlaps: ask NVML for one anyway to get its answer.
				_, err = lib.CreateGpuInstance(gpu, p.ID, p.Placements[0])
			}
			return fmt.Errorf("%s: %w", p.Name, err)
		}
	}
	return nil
}

// TestMIGLayouts checks allowed and refused layouts per GPU model against NVIDIA's published rules.
func TestMIGLayouts(t *testing.T) {
	cases := []struct {
		node    string
		layout  []string
		refused string // "" if the layout is allowed; else the profile NVML refuses
		code    error
	}{
		{"dgx-a100", []string{"7g.40gb"}, "", nil},
		{"dgx-a100", []string{"4g.20gb", "2g.10gb", "1g.5gb"}, "", nil},
		{"dgx-a100", []string{"3g.20gb", "3g.20gb"}, "", nil},
		{"dgx-a100", []string{"3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"}, "", nil},
		{"dgx-a100", []string{"2g.10gb", "2g.10gb", "2g.10gb", "1g.5gb"}, "", nil},
		{"dgx-a100", []string{"1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"}, "", nil},
		{"dgx-a100", []string{"1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb"}, "", nil},
		// The stock mock allows an 8th 1g.5gb and a 7g on top of 4g+3g; hardware does not.
		{"dgx-a100", []string{"1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb", "1g.5gb"}, "1g.5gb", nvmlib.ErrInsufficientResources},
		{"dgx-a100", []string{"4g.20gb", "3g.20gb", "7g.40gb"}, "7g.40gb", nvmlib.ErrInsufficientResources},
		{"dgx-a100", []string{"3g.20gb", "3g.20gb", "3g.20gb"}, "3g.20gb", nvmlib.ErrInsufficientResources},
		{"dgx-a100", []string{"4g.20gb", "4g.20gb"}, "4g.20gb", nvmlib.ErrInsufficientResources},
		{"dgx-a100", []string{"1g.5gb+me", "1g.5gb+me"}, "1g.5gb+me", nvmlib.ErrInsufficientResources},
		{"dgx-a100", []string{"2g.10gb", "2g.10gb", "2g.10gb", "1g.10gb", "1g.5gb"}, "1g.5gb", nvmlib.ErrInsufficientResources},
		{"dgx-h100", []string{"3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"}, "", nil},
		{"dgx-h100", []string{"1g.20gb", "1g.20gb", "1g.20gb", "1g.20gb"}, "", nil},
		{"dgx-h100", []string{"1g.20gb", "1g.20gb", "1g.20gb", "1g.20gb", "1g.10gb"}, "1g.10gb", nvmlib.ErrInsufficientResources},
		{"dgx-h100", []string{"7g.80gb", "1g.10gb"}, "1g.10gb", nvmlib.ErrInsufficientResources},
		{"dgx-h100", []string{"3g.40gb", "3g.40gb", "1g.10gb"}, "1g.10gb", nvmlib.ErrInsufficientResources},
		{"mixed", []string{"2g.12gb", "1g.6gb", "1g.6gb"}, "", nil}, // GPU 2 is an A30 on the mixed node
		{"mixed", []string{"4g.24gb", "1g.6gb"}, "1g.6gb", nvmlib.ErrInsufficientResources},
	}
	for _, tc := range cases {
		t.Run(tc.node+"/"+strings.Join(tc.layout, "+"), func(t *testing.T) {
			lib, _ := open(t, tc.node, "")
			gpu := 0
			if tc.node == "mixed" {
				gpu = 2
			}
			enableMIG(t, lib, gpu)
			var profs []nvmlib.MigProfile
			for _, name := range tc.layout {
				profs = append(profs, profileID(t, lib, gpu, name))
			}
			err := create(lib, gpu, profs)
			if tc.refused == "" {
				if err != nil {
					t.Fatalf("layout refused: %v", err)
				}
				gis, err := lib.GpuInstances(gpu)
				if err != nil || len(gis) != len(tc.layout) {
					t.Fatalf("got %d GPU instances (%v), want %d", len(gis), err, len(tc.layout))
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tc.refused+":") || !errors.Is(err, tc.code) {
				t.Fatalf("got %v, want %s refused with %v", err, tc.refused, tc.code)
			}
		})
	}
}

// TestMIGRulesEveryModel runs the rules that hold for every MIG-capable model.
func TestMIGRulesEveryModel(t *testing.T) {
	all, err := models.All()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range all {
		if m.MIG == nil {
			continue
		}
		t.Run(m.ID, func(t *testing.T) {
			dir := t.TempDir()
			spec := sim.NodeSpec{Name: "one-" + m.ID, GPUs: []sim.GPUGroup{{Model: m.ID, Count: 1}}}
			spec, err := sim.ParseNodeSpec([]byte(fmt.Sprintf("name: %s\ngpus: [{model: %s, count: 1}]\n", spec.Name, m.ID)), "test")
			if err != nil {
				t.Fatal(err)
			}
			n, err := sim.Open(spec, dir)
			if err != nil {
				t.Fatal(err)
			}
			lib, err := nvmlib.Wrap(n.NVML())
			if err != nil {
				t.Fatal(err)
			}
			defer lib.Shutdown()

			// Names derived from NVML's numbers, as on hardware, match the published names.
			ps, err := lib.MigProfiles(0)
			if err != nil {
				t.Fatal(err)
			}
			if len(ps) != len(m.MIG.Profiles) {
				t.Fatalf("NVML lists %d profiles, the table %d", len(ps), len(m.MIG.Profiles))
			}
			for _, p := range ps {
				want, ok := m.ProfileByID(p.ID)
				if !ok || want.Name != p.Name {
					t.Errorf("profile %d: NVML-derived name %q, published %q", p.ID, p.Name, want.Name)
				}
				if p.Placements != nil {
					t.Errorf("profile %s: placements listed with MIG mode off", p.Name)
				}
			}
			full := ps[0]
			for _, p := range ps {
				if p.ComputeSlices > full.ComputeSlices {
					full = p
				}
			}
			// MIG mode off: creating an instance is refused with ERROR_NOT_SUPPORTED.
			if _, err := lib.CreateGpuInstance(0, full.ID, nvmlib.Placement{Start: 0, Size: m.MIG.MemorySlices}); !errors.Is(err, nvmlib.ErrNotSupported) {
				t.Fatalf("create with MIG off: %v, want ERROR_NOT_SUPPORTED", err)
			}
			enableMIG(t, lib, 0)
			full = profileID(t, lib, 0, full.Name)
			gi, err := lib.CreateGpuInstance(0, full.ID, full.Placements[0])
			if err != nil {
				t.Fatalf("full-GPU instance: %v", err)
			}
			// Nothing else fits beside the full GPU.
			for _, p := range ps {
				p = profileID(t, lib, 0, p.Name)
				for _, pl := range p.Placements {
					if _, err := lib.CreateGpuInstance(0, p.ID, pl); !errors.Is(err, nvmlib.ErrInsufficientResources) {
						t.Fatalf("%s at %v beside the full GPU: %v, want ERROR_INSUFFICIENT_RESOURCES", p.Name, pl, err)
					}
				}
			}
			// A placement not in the table is an invalid argument.
			if _, err := lib.CreateGpuInstance(0, full.ID, nvmlib.Placement{Start: 1, Size: full.Placements[0].Size}); !errors.Is(err, nvmlib.ErrInvalidArgument) {
				t.Fatalf("bad placement: %v, want ERROR_INVALID_ARGUMENT", err)
			}
			// A GPU instance with a compute instance cannot be destroyed; MIG mode cannot be turned off.
			ci, err := lib.CreateComputeInstance(0, gi, full.ComputeSlices)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := lib.CreateComputeInstance(0, gi, 1); !errors.Is(err, nvmlib.ErrInsufficientResources) {
				t.Fatalf("second compute instance in a full GI: %v, want ERROR_INSUFFICIENT_RESOURCES", err)
			}
			if err := lib.DestroyGpuInstance(0, gi); !errors.Is(err, nvmlib.ErrInUse) {
				t.Fatalf("destroy GI with CI: %v, want ERROR_IN_USE", err)
			}
			if _, err := lib.SetMigMode(0, false); !errors.Is(err, nvmlib.ErrInUse) {
				t.Fatalf("MIG off with instances: %v, want ERROR_IN_USE", err)
			}
			devs, err := lib.MigDevices(0)
			if err != nil || len(devs) != 1 || devs[0].Profile != full.Name || !strings.HasPrefix(devs[0].UUID, "MIG-") {
				t.Fatalf("MIG devices: %+v, %v", devs, err)
			}
			if err := lib.DestroyComputeInstance(0, gi, ci); err != nil {
				t.Fatal(err)
			}
			if err := lib.DestroyGpuInstance(0, gi); err != nil {
				t.Fatal(err)
			}
			// The 1-slice profile fits once per compute slice, never more.
			one := ps[0]
			for _, p := range ps {
				if p.ID == 0 {
					one = profileID(t, lib, 0, p.Name)
				}
			}
			var profs []nvmlib.MigProfile
			for range m.MIG.ComputeSlices + 1 {
				profs = append(profs, one)
			}
			if err := create(lib, 0, profs); !errors.Is(err, nvmlib.ErrInsufficientResources) {
				t.Fatalf("%d x %s: %v, want the last refused", len(profs), one.Name, err)
			}
			gis, _ := lib.GpuInstances(0)
			if len(gis) != m.MIG.ComputeSlices {
				t.Fatalf("%s instances: %d, want %d", one.Name, len(gis), m.MIG.ComputeSlices)
			}
		})
	}
}

func TestComputeInstances(t *testing.T) {
	lib, _ := open(t, "dgx-a100", "")
	enableMIG(t, lib, 0)
	p := profileID(t, lib, 0, "3g.20gb")
	gi, err := lib.CreateGpuInstance(0, p.ID, nvmlib.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	if gi != 2 {
		t.Errorf("3g.20gb at slice 4 has GI ID %d, want 2 (as the driver numbers it)", gi)
	}
	for i := range 3 {
		if _, err := lib.CreateComputeInstance(0, gi, 1); err != nil {
			t.Fatalf("1c #%d: %v", i, err)
		}
	}
	if _, err := lib.CreateComputeInstance(0, gi, 1); !errors.Is(err, nvmlib.ErrInsufficientResources) {
		t.Fatalf("4th 1c in a 3g: %v", err)
	}
	if _, err := lib.CreateComputeInstance(0, gi, 4); err == nil {
		t.Fatal("a 4-slice CI in a 3g GI was accepted")
	}
	devs, err := lib.MigDevices(0)
	if err != nil || len(devs) != 3 {
		t.Fatalf("MIG devices: %+v, %v", devs, err)
	}
	for _, d := range devs {
		if d.Profile != "1c.3g.20gb" || d.SMCount != 14 {
			t.Errorf("device %+v: want profile 1c.3g.20gb with 14 SMs", d)
		}
	}
}

func TestStateSurvivesRestartAndReboot(t *testing.T) {
	dir := t.TempDir()
	lib, node := open(t, "dgx-h100", dir)
	enableMIG(t, lib, 1)
	p := profileID(t, lib, 1, "3g.40gb")
	gi, err := lib.CreateGpuInstance(1, p.ID, p.Placements[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lib.CreateComputeInstance(1, gi, 3); err != nil {
		t.Fatal(err)
	}
	before, _ := lib.MigDevices(1)
	boot1, _ := node.BootID()

	// A restarted process sees the same GPU instances and UUIDs.
	lib2, node2 := open(t, "dgx-h100", dir)
	after, err := lib2.MigDevices(1)
	if err != nil || len(after) != 1 || after[0].UUID != before[0].UUID {
		t.Fatalf("after restart: %+v (%v), before %+v", after, err, before)
	}
	if b, _ := node2.BootID(); b != boot1 {
		t.Fatal("boot ID changed without a reboot")
	}

	// A reboot keeps MIG mode and clears instances, with a new boot ID.
	if err := node2.Reboot(); err != nil {
		t.Fatal(err)
	}
	g, err := lib2.GPU(1)
	if err != nil || !g.MigEnabled {
		t.Fatalf("MIG mode after reboot: %+v %v", g, err)
	}
	if devs, _ := lib2.MigDevices(1); len(devs) != 0 {
		t.Fatalf("MIG devices survived a reboot: %+v", devs)
	}
	if b, _ := node2.BootID(); b == boot1 || b == "" {
		t.Fatalf("boot ID %q after reboot, was %q", b, boot1)
	}
	// A recreated MIG device gets a new UUID.
	gi, err = lib2.CreateGpuInstance(1, p.ID, p.Placements[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lib2.CreateComputeInstance(1, gi, 3); err != nil {
		t.Fatal(err)
	}
	again, _ := lib2.MigDevices(1)
	if len(again) != 1 || again[0].UUID == before[0].UUID {
		t.Fatalf("recreated MIG device kept UUID %s", before[0].UUID)
	}
}

func TestDeterministicUUIDs(t *testing.T) {
	run := func() (string, []string) {
		lib, _ := open(t, "dgx-a100", "")
		g, _ := lib.GPU(3)
		enableMIG(t, lib, 3)
		p := profileID(t, lib, 3, "1g.5gb")
		var uuids []string
		for i := range 3 {
			gi, err := lib.CreateGpuInstance(3, p.ID, p.Placements[i])
			if err != nil {
				t.Fatal(err)
			}
			if _, err := lib.CreateComputeInstance(3, gi, 1); err != nil {
				t.Fatal(err)
			}
		}
		devs, _ := lib.MigDevices(3)
		for _, d := range devs {
			uuids = append(uuids, d.UUID)
		}
		return g.UUID, uuids
	}
	u1, m1 := run()
	u2, m2 := run()
	if u1 != u2 || strings.Join(m1, ",") != strings.Join(m2, ",") || len(m1) != 3 {
		t.Fatalf("two identical runs differ: %s %v / %s %v", u1, m1, u2, m2)
	}
	seen := map[string]bool{}
	for _, u := range m1 {
		if seen[u] {
			t.Fatalf("duplicate MIG UUID %s", u)
		}
		seen[u] = true
	}
}

func TestPendingMigModeWithProcesses(t *testing.T) {
	lib, node := open(t, "dgx-a100", "")
	if err := node.AddProcess(0, 4242, 1024, -1, -1); err != nil {
		t.Fatal(err)
	}
	ch, err := lib.SetMigMode(0, true)
	if err != nil || !ch.Pending {
		t.Fatalf("MIG on with a process running: %+v %v, want pending", ch, err)
	}
	g, _ := lib.GPU(0)
	if g.MigEnabled || !g.MigPending {
		t.Fatalf("GPU %+v: want disabled, pending enable", g)
	}
	if ps, _ := lib.Processes(0); len(ps) != 1 || ps[0].PID != 4242 || ps[0].UsedMemoryMiB != 1024 {
		t.Fatalf("processes: %+v", ps)
	}
	if err := node.ResetGPU(0); err != nil {
		t.Fatal(err)
	}
	g, _ = lib.GPU(0)
	if !g.MigEnabled {
		t.Fatal("pending MIG mode did not apply at reset")
	}
}

func TestLostGPU(t *testing.T) {
	lib, node := open(t, "dgx-h100", "")
	if err := node.InjectGPULost(5); err != nil {
		t.Fatal(err)
	}
	if _, err := lib.GPU(5); !errors.Is(err, nvmlib.ErrGPULost) {
		t.Fatalf("GPU 5: %v, want ERROR_GPU_IS_LOST", err)
	}
	if _, err := lib.GPU(4); err != nil {
		t.Fatalf("GPU 4 affected by GPU 5: %v", err)
	}
	// A process started after the loss still opens: the lost GPU is skipped, not fatal.
	lib2, _ := open(t, "dgx-h100", node.Dir())
	if n, _ := lib2.DeviceCount(); n != 8 {
		t.Fatalf("device count %d", n)
	}
	if _, err := lib2.GPU(5); !errors.Is(err, nvmlib.ErrGPULost) {
		t.Fatalf("GPU 5 in a new process: %v", err)
	}
	if err := node.Clear(5); err != nil {
		t.Fatal(err)
	}
	if _, err := lib2.GPU(5); err != nil {
		t.Fatalf("GPU 5 after clear: %v", err)
	}
}

func TestReadings(t *testing.T) {
	lib, node := open(t, "dgx-h100", "")
	u, mem, pw, temp, clk := 85, uint64(40000), 550000, 71, 1980
	if err := node.Set(2, sim.Settings{UtilizationGPU: &u, MemoryUsedMiB: &mem, PowerMilliwatts: &pw, TemperatureC: &temp, SMClockMHz: &clk}); err != nil {
		t.Fatal(err)
	}
	tm, err := lib.Telemetry(2)
	if err != nil {
		t.Fatal(err)
	}
	want := nvmlib.Telemetry{UtilizationGPU: 85, MemoryUsedMiB: 40000, MemoryTotalMiB: 81559, PowerMilliwatts: 550000, TemperatureC: 71, SMClockMHz: 1980}
	if tm != want {
		t.Fatalf("telemetry %+v, want %+v", tm, want)
	}
	bad := 101
	if err := node.Set(2, sim.Settings{UtilizationGPU: &bad}); err == nil || !strings.Contains(err.Error(), "--utilization") {
		t.Fatalf("utilization 101: %v", err)
	}
	if err := lib.SetComputeMode(2, nvmlib.ComputeModeExclusiveProcess); err != nil {
		t.Fatal(err)
	}
	if g, _ := lib.GPU(2); g.ComputeMode != nvmlib.ComputeModeExclusiveProcess {
		t.Fatalf("compute mode %s", g.ComputeMode)
	}
}

// TestEventFromAnotherProcess injects an XID with a separate process and receives it here.
func TestEventFromAnotherProcess(t *testing.T) {
	if os.Getenv("SIM_TEST_INJECT_DIR") != "" {
		return // the child's work is in TestMain
	}
	lib, node := open(t, "dgx-h100", "")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got := make(chan nvmlib.Event, 4)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := lib.WatchEvents(ctx, func(e nvmlib.Event) { got <- e }); err != nil {
			t.Error(err)
		}
	}()
	time.Sleep(100 * time.Millisecond) // let the watcher register before the event is written
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "SIM_TEST_INJECT_DIR="+node.Dir(), "SIM_TEST_INJECT_GPU=6", "SIM_TEST_INJECT_XID=48")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("injector: %v\n%s", err, out)
	}
	select {
	case e := <-got:
		g, _ := lib.GPU(6)
		if e.Type != nvmlib.EventXID || e.XID != 48 || e.GPUIndex != 6 || e.GPUUUID != g.UUID || e.GI != -1 {
			t.Fatalf("event %+v", e)
		}
	case <-ctx.Done():
		t.Fatal("no event within 20s")
	}
	cancel()
	wg.Wait()
}

func TestMain(m *testing.M) {
	if dir := os.Getenv("SIM_TEST_INJECT_DIR"); dir != "" {
		spec, err := sim.BuiltinNode("dgx-h100")
		if err == nil {
			var n *sim.Node
			if n, err = sim.Open(spec, dir); err == nil {
				gpu, _ := strconv.Atoi(os.Getenv("SIM_TEST_INJECT_GPU"))
				xid, _ := strconv.ParseUint(os.Getenv("SIM_TEST_INJECT_XID"), 10, 64)
				err = n.InjectXID(gpu, xid, -1, -1)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestConcurrentCreatesNeverOverbook(t *testing.T) {
	lib, _ := open(t, "dgx-a100", "")
	for g := range 8 {
		enableMIG(t, lib, g)
	}
	p := profileID(t, lib, 0, "1g.5gb")
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := map[int]int{}
	for g := range 8 {
		for range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, pl := range p.Placements {
					if _, err := lib.CreateGpuInstance(g, p.ID, pl); err == nil {
						mu.Lock()
						ok[g]++
						mu.Unlock()
					}
				}
			}()
		}
	}
	wg.Wait()
	for g := range 8 {
		gis, err := lib.GpuInstances(g)
		if err != nil || len(gis) != 7 || ok[g] != 7 {
			t.Fatalf("GPU %d: %d instances, %d successful creates (%v); want 7 and 7", g, len(gis), ok[g], err)
		}
	}
}

func TestNodeFileErrors(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"name: n\ngpus:\n  - model: h100-sxm5-80gb\n    count: 2\n    colour: red\n", "line 5: field colour not found"},
		{"name: n\ngpus:\n  - model: h100-sxm5-80gb\n    count: 2\n  - model: v100\n    count: 1\n", "line 5: field gpus[1].model"},
		{"name: n\ngpus:\n  - model: h100-sxm5-80gb\n    count: 0\n", "line 4: field gpus[0].count"},
		{"name: Bad_Name\ngpus: [{model: l4, count: 1}]\n", "line 1: field name"},
		{"name: n\ngpus: [{model: l4, count: 2}]\nnvlink:\n  pairs: [[0, 2]]\n", "field nvlink.pairs[0]"},
		{"name: n\ngpus: [{model: l4, count: 2}]\npciBusIDs: [\"0000:18:00.0\", \"00000000:19:00.0\"]\n", "field pciBusIDs[0]"},
		{"name: n\n", "field gpus"},
		{"name: [\n", "yaml:"},
		{"name: n\ngpus: [{model: l4, count: 2}]\ndriverVersion: latest\n", "line 3: field driverVersion"},
	}
	for _, tc := range cases {
		_, err := sim.ParseNodeSpec([]byte(tc.yaml), "node.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "node.yaml:") {
			t.Errorf("%q: error %v, want it to contain %q", tc.yaml, err, tc.want)
		}
	}
	if _, err := sim.BuiltinNode("dgx-z9"); err == nil || !strings.Contains(err.Error(), "dgx-h100") {
		t.Errorf("unknown node: %v, want the list of nodes", err)
	}
}

func TestStateDirOfAnotherNode(t *testing.T) {
	dir := t.TempDir()
	open(t, "dgx-h100", dir)
	spec, _ := sim.BuiltinNode("dgx-a100")
	if _, err := sim.Open(spec, dir); err == nil || !strings.Contains(err.Error(), "tessera sim wipe") {
		t.Fatalf("opening a dgx-h100 state dir as dgx-a100: %v", err)
	}
}

func TestEveryBuiltinNode(t *testing.T) {
	for _, name := range sim.BuiltinNodes() {
		t.Run(name, func(t *testing.T) {
			lib, _ := open(t, name, "")
			n, err := lib.DeviceCount()
			if err != nil || n == 0 {
				t.Fatalf("%d GPUs, %v", n, err)
			}
			uuids := map[string]bool{}
			for i := range n {
				g, err := lib.GPU(i)
				if err != nil {
					t.Fatal(err)
				}
				if uuids[g.UUID] || !strings.HasPrefix(g.UUID, "GPU-") {
					t.Fatalf("GPU %d UUID %q duplicate or malformed", i, g.UUID)
				}
				uuids[g.UUID] = true
			}
		})
	}
}

func TestComputeInstanceSizesFromGI(t *testing.T) {
	lib, _ := open(t, "dgx-a100", "")
	enableMIG(t, lib, 0)
	want := map[string]string{"4g.20gb": "[1 2 4]", "3g.20gb": "[1 2 3]"}
	for name, sizes := range want {
		p := profileID(t, lib, 0, name)
		gi, err := lib.CreateGpuInstance(0, p.ID, p.Placements[0])
		if err != nil {
			t.Fatal(err)
		}
		got, err := lib.ComputeInstanceSizes(0, gi)
		if err != nil || fmt.Sprint(got) != sizes {
			t.Errorf("%s offers CIs %v (%v), want %s", name, got, err, sizes)
		}
		if err := lib.DestroyGpuInstance(0, gi); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHostFollowsMIG: the simulated host's MIG capability files follow GPU-instance changes made
// through NVML, as the driver's do.
func TestHostFollowsMIG(t *testing.T) {
	lib, node := open(t, "dgx-a100", "")
	h := node.Host()
	if _, err := os.Stat(filepath.Join(h.DevRoot(), "nvidia7")); err != nil {
		t.Fatalf("no /dev/nvidia7 on the simulated host: %v", err)
	}
	enableMIG(t, lib, 1)
	p := profileID(t, lib, 1, "3g.20gb")
	gi, err := lib.CreateGpuInstance(1, p.ID, nvmlib.Placement{Start: 4, Size: 4})
	if err != nil {
		t.Fatal(err)
	}
	ci, err := lib.CreateComputeInstance(1, gi, 3)
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]int{h.GIAccessPath(1, gi): host.GIMinor(1, gi), h.CIAccessPath(1, gi, ci): host.CIMinor(1, gi, ci)} {
		got, err := host.ReadCapMinor(path)
		if err != nil || got != want {
			t.Fatalf("%s: minor %d (%v), want %d", path, got, err, want)
		}
	}
	if err := lib.DestroyComputeInstance(1, gi, ci); err != nil {
		t.Fatal(err)
	}
	if err := lib.DestroyGpuInstance(1, gi); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(h.GIAccessPath(1, gi)); !os.IsNotExist(err) {
		t.Fatalf("GI access file left after destroy: %v", err)
	}
}
