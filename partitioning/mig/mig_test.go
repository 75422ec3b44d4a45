package mig_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

type simNode struct {
	lib  nvmlib.Interface
	raw  *sim.Lib
	node *sim.Node
}

func openSpec(t testing.TB, spec sim.NodeSpec) simNode {
	t.Helper()
	n, err := sim.Open(spec, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	raw := n.NVML()
	lib, err := nvmlib.Wrap(raw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	return simNode{lib: lib, raw: raw, node: n}
}

func openModel(t testing.TB, model string, count int) simNode {
	t.Helper()
	spec, err := sim.ParseNodeSpec(fmt.Appendf(nil, "name: t\ngpus: [{model: %s, count: %d}]\n", model, count), "test")
	if err != nil {
		t.Fatal(err)
	}
	return openSpec(t, spec)
}

func parse(t testing.TB, y string) *mig.Config {
	t.Helper()
	cfg, err := mig.ParseConfig([]byte(y), "cfg.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func mutations(s simNode) int {
	n := 0
	for _, op := range []string{sim.OpCreateGpuInstance, sim.OpDestroyGpuInstance, sim.OpCreateComputeInstance, sim.OpDestroyComputeInstance, sim.OpSetMigMode} {
		n += s.raw.Calls(op)
	}
	return n
}

// layoutCounts reads back the node's GI profiles per GPU.
func layoutCounts(t testing.TB, lib nvmlib.Interface, gpu int) map[string]int {
	t.Helper()
	devs, err := lib.MigDevices(gpu)
	if err != nil && !errors.Is(err, nvmlib.ErrNotSupported) {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, d := range devs {
		out[d.Profile]++
	}
	return out
}

// referenceLayouts returns, per model, the reference set of layouts the issue names, built from
// the model's published table (not from the planner).
func referenceLayouts(m models.Model) map[string]map[string]int {
	byCompute := map[int]string{}
	for _, p := range m.MIG.Profiles {
		if p.ProfileID <= 4 || p.ProfileID == 5 || p.ProfileID == 6 { // the plain profiles
			byCompute[p.ComputeSlices] = p.Name
		}
	}
	out := map[string]map[string]int{
		"all-1g": {byCompute[1]: m.MIG.ComputeSlices},
		"all-2g": {byCompute[2]: m.MIG.ComputeSlices / 2},
	}
	if g3, ok := byCompute[3]; ok {
		out["all-3g"] = map[string]int{g3: 2}
		out["4g+3g"] = map[string]int{byCompute[4]: 1, g3: 1}
	}
	if m.MIG.ComputeSlices == 7 {
		out["3x2g+1x1g"] = map[string]int{byCompute[2]: 3, byCompute[1]: 1}
	} else {
		out["2g+2x1g"] = map[string]int{byCompute[2]: 1, byCompute[1]: 2}
	}
	return out
}

func configFor(layouts map[string]map[string]int) string {
	var b strings.Builder
	b.WriteString("version: v1\nmig-configs:\n  all-disabled:\n    - devices: all\n      mig-enabled: false\n")
	for name, counts := range layouts {
		fmt.Fprintf(&b, "  %s:\n    - devices: all\n      mig-enabled: true\n      mig-devices:\n", name)
		for p, n := range counts {
			fmt.Fprintf(&b, "        %q: %d\n", p, n)
		}
	}
	return b.String()
}

// TestReferenceLayoutsEveryModel: on every simulated MIG model, each reference layout plans,
// applies and asserts; re-applying makes zero NVML changes; disabling returns to MIG off.
func TestReferenceLayoutsEveryModel(t *testing.T) {
	all, err := models.All()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, m := range all {
		if m.MIG == nil {
			continue
		}
		layouts := referenceLayouts(m)
		cfg := parse(t, configFor(layouts))
		for name, counts := range layouts {
			t.Run(m.ID+"/"+name, func(t *testing.T) {
				s := openModel(t, m.ID, 2)
				rep, err := mig.Apply(ctx, s.lib, cfg, name, mig.Options{})
				if err != nil || !rep.OK() {
					t.Fatalf("apply: %v %+v", err, rep)
				}
				for g := range 2 {
					if rep.GPUs[g].Status != mig.StatusChanged {
						t.Fatalf("GPU %d: %+v", g, rep.GPUs[g])
					}
					got := layoutCounts(t, s.lib, g)
					if fmt.Sprint(got) != fmt.Sprint(counts) {
						t.Fatalf("GPU %d has %v, want %v", g, got, counts)
					}
				}
				if diffs, err := mig.Assert(ctx, s.lib, cfg, name); err != nil || len(diffs) != 0 {
					t.Fatalf("assert after apply: %v %v", diffs, err)
				}
				before := mutations(s)
				rep, err = mig.Apply(ctx, s.lib, cfg, name, mig.Options{})
				if err != nil || rep.GPUs[0].Status != mig.StatusUnchanged || rep.GPUs[1].Status != mig.StatusUnchanged {
					t.Fatalf("re-apply: %v %+v", err, rep)
				}
				if n := mutations(s) - before; n != 0 {
					t.Fatalf("re-applying an unchanged layout made %d NVML changes", n)
				}
				rep, err = mig.Apply(ctx, s.lib, cfg, "all-disabled", mig.Options{})
				if err != nil || !rep.OK() {
					t.Fatalf("disable: %v %+v", err, rep)
				}
				if g, _ := s.lib.GPU(0); g.MigEnabled {
					t.Fatal("MIG still enabled after all-disabled")
				}
			})
		}
	}
}

func TestAll1gOnDGXH100Yields56(t *testing.T) {
	spec, _ := sim.BuiltinNode("dgx-h100")
	s := openSpec(t, spec)
	cfg := parse(t, "version: v1\nmig-configs:\n  all-1g.10gb:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.10gb\": 7}\n")
	rep, err := mig.Apply(context.Background(), s.lib, cfg, "all-1g.10gb", mig.Options{})
	if err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	snap, err := inventory.New(s.lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, g := range snap.GPUs {
		n += len(g.MigDevices)
	}
	if n != 56 {
		t.Fatalf("%d MIG devices, want 56", n)
	}
}

func TestPerGPULayoutsAndFilters(t *testing.T) {
	spec, _ := sim.BuiltinNode("mixed") // 2x A100-40GB, 2x A30, 2x L4
	s := openSpec(t, spec)
	cfg := parse(t, `version: v1
mig-configs:
  mixed:
    - devices: all
      device-filter: ["0x20B010DE"]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [2]
      device-filter: NVIDIA A30
      mig-enabled: true
      mig-devices: {"2g.12gb": 1, "1g.6gb": 2}
    - devices: [3]
      mig-enabled: false
  overlap:
    - devices: [0, 1]
      mig-enabled: false
    - devices: all
      device-filter: "0x20B010DE"
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  l4-mig:
    - devices: [4]
      mig-enabled: true
      mig-devices: {"1g.5gb": 1}
`)
	rep, err := mig.Apply(context.Background(), s.lib, cfg, "mixed", mig.Options{})
	if err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	want := []mig.Status{mig.StatusChanged, mig.StatusChanged, mig.StatusChanged, mig.StatusUnchanged, mig.StatusNotSelected, mig.StatusNotSelected}
	for i, w := range want {
		if rep.GPUs[i].Status != w {
			t.Errorf("GPU %d: %s, want %s", i, rep.GPUs[i].Status, w)
		}
	}
	if got := layoutCounts(t, s.lib, 2); got["2g.12gb"] != 1 || got["1g.6gb"] != 2 {
		t.Errorf("A30 layout %v", got)
	}
	if _, err := mig.Apply(context.Background(), s.lib, cfg, "overlap", mig.Options{}); err == nil || !strings.Contains(err.Error(), "selected by both") {
		t.Errorf("overlapping entries: %v", err)
	}
	if _, err := mig.Apply(context.Background(), s.lib, cfg, "l4-mig", mig.Options{}); err == nil || !strings.Contains(err.Error(), "not MIG-capable") {
		t.Errorf("MIG on an L4: %v", err)
	}
	if _, err := mig.Apply(context.Background(), s.lib, cfg, "nope", mig.Options{}); err == nil || !strings.Contains(err.Error(), "l4-mig, mixed, overlap") {
		t.Errorf("unknown layout: %v", err)
	}
}

func TestRefusalsKeepPreviousLayout(t *testing.T) {
	s := openModel(t, "a100-sxm4-40gb", 1)
	cfg := parse(t, `version: v1
mig-configs:
  good: [{devices: all, mig-enabled: true, mig-devices: {"4g.20gb": 1, "3g.20gb": 1}}]
  three-3g: [{devices: all, mig-enabled: true, mig-devices: {"3g.20gb": 3}}]
  too-much-compute: [{devices: all, mig-enabled: true, mig-devices: {"4g.20gb": 1, "2g.10gb": 1, "1g.5gb": 2}}]
  overlap: [{devices: all, mig-enabled: true, mig-devices: {"4g.20gb": 1, "3g.20gb": 1}, placements: [{profile: 3g.20gb, start: 0}]}]
  unknown: [{devices: all, mig-enabled: true, mig-devices: {"3g.40gb": 1}}]
  bad-pin: [{devices: all, mig-enabled: true, mig-devices: {"3g.20gb": 1}, placements: [{profile: 3g.20gb, start: 2}]}]
`)
	ctx := context.Background()
	if rep, err := mig.Apply(ctx, s.lib, cfg, "good", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	before := layoutCounts(t, s.lib, 0)
	cases := map[string]string{
		"three-3g":         "GPU 0 (NVIDIA A100-SXM4-40GB): 3g.20gb x3: the GPU allows at most 2",
		"too-much-compute": "needs 8 compute slices, the GPU has 7",
		"unknown":          "no MIG profile 3g.40gb; it offers 1g.5gb",
		"bad-pin":          "3g.20gb cannot start at slice 2; it starts at 0,4",
	}
	for name, want := range cases {
		rep, err := mig.Apply(ctx, s.lib, cfg, name, mig.Options{})
		if err != nil || rep.GPUs[0].Status != mig.StatusRefused || !strings.Contains(rep.GPUs[0].Message, want) {
			t.Errorf("%s: %v %+v, want refused with %q", name, err, rep.GPUs[0], want)
		}
		if got := layoutCounts(t, s.lib, 0); fmt.Sprint(got) != fmt.Sprint(before) {
			t.Fatalf("%s changed the layout to %v", name, got)
		}
	}
	// 4g.20gb + 3g.20gb fit by slice count, but with the 3g.20gb pinned at 0 the 4g.20gb (start 0
	// only) has nowhere to go.
	rep, _ := mig.Apply(ctx, s.lib, cfg, "overlap", mig.Options{})
	if rep.GPUs[0].Status != mig.StatusRefused || !strings.Contains(rep.GPUs[0].Message, "no combination of allowed placements") {
		t.Errorf("overlap: %+v", rep.GPUs[0])
	}
}

func TestThreeBy3gMessage(t *testing.T) {
	s := openModel(t, "a100-sxm4-40gb", 1)
	if _, err := s.lib.SetMigMode(0, true); err != nil {
		t.Fatal(err)
	}
	ps, _ := s.lib.MigProfiles(0)
	// Raise the instance limit so that the slice count is what refuses.
	for i := range ps {
		ps[i].InstanceCount = 9
	}
	_, err := mig.Place(mig.GPUShape{Index: 2, Product: "A100-SXM4-40GB", Profiles: ps}, map[string]int{"3g.20gb": 3}, nil, nil)
	if err == nil || err.Error() != "GPU 2 (A100-SXM4-40GB): 3g.20gb x3 needs 12 memory slices, the GPU has 8" {
		t.Fatalf("got %v", err)
	}
}

func TestPlannerKeepsLargeProfilesAvailable(t *testing.T) {
	s := openModel(t, "a100-sxm4-40gb", 1)
	if _, err := s.lib.SetMigMode(0, true); err != nil {
		t.Fatal(err)
	}
	ps, _ := s.lib.MigProfiles(0)
	shape := mig.GPUShape{Index: 0, Product: "A100", Profiles: ps}
	// One 1g.5gb and one 3g.20gb: the 3g.20gb takes the upper half, keeping its lower-half placement's
	// neighbours (2g.10gb at 0 or 2) free next to the 1g.5gb.
	got, err := mig.Place(shape, map[string]int{"1g.5gb": 1, "3g.20gb": 1}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var g3, g1 mig.Instance
	for _, i := range got {
		if i.Profile == "3g.20gb" {
			g3 = i
		} else {
			g1 = i
		}
	}
	if g3.Placement.Start != 4 || g1.Placement.Start > 3 {
		t.Fatalf("layout %v: want 3g.20gb at 4 and 1g.5gb within 0-3", got)
	}
	// Two 1g.5gb: they go where they block the fewest larger placements (both in one quarter).
	got, err = mig.Place(shape, map[string]int{"1g.5gb": 2}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, b := got[0].Placement.Start, got[1].Placement.Start
	if a/2 != b/2 {
		t.Fatalf("two 1g.5gb at %d and %d: they should share a 2-slice pair, leaving three 2g.10gb placements", a, b)
	}
}

func TestFaultMidApplyRollsBack(t *testing.T) {
	s := openModel(t, "h100-sxm5-80gb", 1)
	cfg := parse(t, `version: v1
mig-configs:
  before: [{devices: all, mig-enabled: true, mig-devices: {"3g.40gb": 2}}]
  after: [{devices: all, mig-enabled: true, mig-devices: {"2g.20gb": 3, "1g.10gb": 1}}]
`)
	ctx := context.Background()
	if rep, err := mig.Apply(ctx, s.lib, cfg, "before", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	for n := range 4 { // fail the 1st..4th GPU-instance creation of the change
		s.raw.InjectFault(sim.OpCreateGpuInstance, n, errors.New("injected"))
		rep, err := mig.Apply(ctx, s.lib, cfg, "after", mig.Options{})
		if err != nil || rep.GPUs[0].Status != mig.StatusFailed || !strings.Contains(rep.GPUs[0].Message, "rolled back") {
			t.Fatalf("fault at create #%d: %v %+v", n+1, err, rep.GPUs[0])
		}
		if got := layoutCounts(t, s.lib, 0); fmt.Sprint(got) != "map[3g.40gb:2]" {
			t.Fatalf("fault at create #%d left %v", n+1, got)
		}
		if diffs, _ := mig.Assert(ctx, s.lib, cfg, "before"); len(diffs) != 0 {
			t.Fatalf("fault at create #%d: %v", n+1, diffs)
		}
	}
	// A fault in a compute-instance creation rolls back too.
	s.raw.InjectFault(sim.OpCreateComputeInstance, 2, errors.New("injected"))
	if rep, _ := mig.Apply(ctx, s.lib, cfg, "after", mig.Options{}); rep.GPUs[0].Status != mig.StatusFailed {
		t.Fatalf("CI fault: %+v", rep.GPUs[0])
	}
	if got := layoutCounts(t, s.lib, 0); fmt.Sprint(got) != "map[3g.40gb:2]" {
		t.Fatalf("CI fault left %v", got)
	}
	if rep, err := mig.Apply(ctx, s.lib, cfg, "after", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("clean apply after faults: %v %+v", err, rep)
	}
}

func TestInUseInstancesAreKept(t *testing.T) {
	s := openModel(t, "a100-sxm4-40gb", 1)
	cfg := parse(t, `version: v1
mig-configs:
  a: [{devices: all, mig-enabled: true, mig-devices: {"3g.20gb": 2}}]
  b: [{devices: all, mig-enabled: true, mig-devices: {"3g.20gb": 1, "2g.10gb": 2}}]
  c: [{devices: all, mig-enabled: true, mig-devices: {"7g.40gb": 1}}]
`)
	ctx := context.Background()
	if rep, err := mig.Apply(ctx, s.lib, cfg, "a", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	devs, _ := s.lib.MigDevices(0)
	busy := devs[1] // the 3g.20gb at slice 4
	if err := s.node.AddProcess(0, 777, 1000, busy.GI, busy.CI); err != nil {
		t.Fatal(err)
	}
	// b keeps one 3g.20gb: the planner keeps the busy one where it is and replaces only the other.
	rep, err := mig.Apply(ctx, s.lib, cfg, "b", mig.Options{})
	if err != nil || rep.GPUs[0].Status != mig.StatusChanged {
		t.Fatalf("b: %v %+v", err, rep.GPUs[0])
	}
	after, _ := s.lib.MigDevices(0)
	kept := false
	for _, d := range after {
		kept = kept || d.UUID == busy.UUID
	}
	if !kept {
		t.Fatalf("the busy 3g.20gb (%s) was recreated: %+v", busy.UUID, after)
	}
	// c needs the whole GPU: refused while the process runs, naming it.
	rep, _ = mig.Apply(ctx, s.lib, cfg, "c", mig.Options{})
	if rep.GPUs[0].Status != mig.StatusRefused || !strings.Contains(rep.GPUs[0].Message, "777") || !strings.Contains(rep.GPUs[0].Message, "--force") {
		t.Fatalf("c while busy: %+v", rep.GPUs[0])
	}
	// Forced, NVML itself refuses to destroy a compute instance in use; the GPU is rolled back.
	rep, _ = mig.Apply(ctx, s.lib, cfg, "c", mig.Options{Force: true})
	if rep.GPUs[0].Status != mig.StatusFailed || !strings.Contains(rep.GPUs[0].Message, "ERROR_IN_USE") || !strings.Contains(rep.GPUs[0].Message, "rolled back") {
		t.Fatalf("forced c: %+v", rep.GPUs[0])
	}
	if got := layoutCounts(t, s.lib, 0); got["3g.20gb"] != 1 || got["2g.10gb"] != 2 {
		t.Fatalf("after forced c: %v", got)
	}
	if err := s.node.EndProcesses(0, 0); err != nil {
		t.Fatal(err)
	}
	if rep, _ = mig.Apply(ctx, s.lib, cfg, "c", mig.Options{}); !rep.OK() {
		t.Fatalf("c when idle: %+v", rep.GPUs[0])
	}
}

func TestPendingMigModeIsReported(t *testing.T) {
	s := openModel(t, "a100-sxm4-40gb", 1)
	if err := s.node.AddProcess(0, 99, 10, -1, -1); err != nil {
		t.Fatal(err)
	}
	cfg := parse(t, "version: v1\nmig-configs:\n  on: [{devices: all, mig-enabled: true, mig-devices: {\"7g.40gb\": 1}}]\n")
	rep, err := mig.Apply(context.Background(), s.lib, cfg, "on", mig.Options{})
	if err != nil || rep.GPUs[0].Status != mig.StatusPendingReset || rep.OK() {
		t.Fatalf("%v %+v: want pending-reset, not success", err, rep)
	}
	diffs, _ := mig.Assert(context.Background(), s.lib, cfg, "on")
	if len(diffs) != 1 || !strings.Contains(diffs[0], "pending") {
		t.Fatalf("assert: %v", diffs)
	}
}

func TestDryRunChangesNothing(t *testing.T) {
	s := openModel(t, "h100-sxm5-80gb", 2)
	cfg := parse(t, "version: v1\nmig-configs:\n  x: [{devices: all, mig-enabled: true, mig-devices: {\"1g.20gb\": 4}}]\n")
	rep, err := mig.Apply(context.Background(), s.lib, cfg, "x", mig.Options{DryRun: true})
	if err != nil || rep.GPUs[0].Status != mig.StatusPlanned || !strings.Contains(rep.GPUs[0].Message, "would enable MIG mode") {
		t.Fatalf("%v %+v", err, rep.GPUs[0])
	}
	if mutations(s) != 0 {
		t.Fatalf("dry run made %d NVML changes", mutations(s))
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"version: v2\nmig-configs: {a: [{devices: all, mig-enabled: false}]}\n", "version: \"v2\" is not supported"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: false\n      colour: red\n", "line 6: field colour not found"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n", "line 4: mig-configs.a[0].mig-enabled: required"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: false\n      mig-devices: {\"1g.5gb\": 1}\n", "need `mig-enabled: true`"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1c.3g.20gb\": 3}\n", "compute-instance profiles are not supported; name GPU-instance profiles such as 3g.20gb"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"big\": 3}\n", "not a MIG profile name"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: [0, x]\n      mig-enabled: false\n", "line 4: devices: \"x\" is not a GPU index"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      device-filter: 0x20B0\n      mig-enabled: false\n", "not a PCI device ID like 0x20B010DE"},
		{"version: v1\nmig-configs:\n  a:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"3g.20gb\": 1}\n      placements: [{profile: 3g.20gb, start: 0}, {profile: 3g.20gb, start: 4}]\n", "pins 2 x 3g.20gb but mig-devices asks for 1"},
		{"version: v1\n", "no layouts defined"},
	}
	for _, tc := range cases {
		_, err := mig.ParseConfig([]byte(tc.yaml), "cfg.yaml")
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "cfg.yaml:") {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

// TestMigPartedExamples parses layouts in the shapes mig-parted's documentation uses.
func TestMigPartedExamples(t *testing.T) {
	cfg := parse(t, `version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-enabled:
    - devices: all
      mig-enabled: true
      mig-devices: {}
  all-1g.10gb:
    - device-filter: ["0x233010DE", "0x233110DE"]
      devices: all
      mig-enabled: true
      mig-devices:
        "1g.10gb": 7
  custom-config:
    - devices: [0, 1, 2, 3]
      mig-enabled: false
    - devices: [4]
      mig-enabled: true
      mig-devices:
        "1g.10gb": 2
        "2g.20gb": 1
        "3g.40gb": 1
`)
	if got := strings.Join(cfg.Names(), ","); got != "all-1g.10gb,all-disabled,all-enabled,custom-config" {
		t.Fatalf("names %s", got)
	}
	spec, _ := sim.BuiltinNode("dgx-h100")
	s := openSpec(t, spec)
	rep, err := mig.Apply(context.Background(), s.lib, cfg, "custom-config", mig.Options{})
	if err != nil || !rep.OK() || rep.GPUs[4].Status != mig.StatusChanged || rep.GPUs[5].Status != mig.StatusNotSelected {
		t.Fatalf("%v %+v", err, rep)
	}
	rep, err = mig.Apply(context.Background(), s.lib, cfg, "all-enabled", mig.Options{})
	if err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	if got := layoutCounts(t, s.lib, 4); len(got) != 0 {
		t.Fatalf("all-enabled left instances on GPU 4: %v", got)
	}
}

// BenchmarkApplyAll1gDGXH100 plans and applies all-1g (56 MIG devices) on a simulated 8-GPU node from
// MIG off, against the baseline of one inventory snapshot of the same node, timed in the same loop.
func BenchmarkApplyAll1gDGXH100(b *testing.B) {
	cfg := parse(b, "version: v1\nmig-configs:\n  all-1g: [{devices: all, mig-enabled: true, mig-devices: {\"1g.10gb\": 7}}]\n  off: [{devices: all, mig-enabled: false}]\n")
	spec, _ := sim.BuiltinNode("dgx-h100")
	s := openSpec(b, spec)
	ctx := context.Background()
	var inspect, apply float64
	for range b.N {
		t0 := time.Now()
		if _, err := inventory.New(s.lib).Snapshot(ctx); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		rep, err := mig.Apply(ctx, s.lib, cfg, "all-1g", mig.Options{})
		if err != nil || !rep.OK() {
			b.Fatal(err, rep)
		}
		t2 := time.Now()
		inspect += float64(t1.Sub(t0))
		apply += float64(t2.Sub(t1))
		b.StopTimer()
		if _, err := mig.Apply(ctx, s.lib, cfg, "off", mig.Options{}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(apply/float64(b.N)/1e6, "ms-plan+apply")
	b.ReportMetric(inspect/float64(b.N)/1e6, "ms-inspect")
	b.ReportMetric(apply/inspect, "x-inspect")
}
