package models

import (
	"fmt"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
)

func mustGet(t *testing.T, id string) Model {
	t.Helper()
	m, err := Get(id)
	if err != nil {
		t.Fatalf("Get(%q): %v", id, err)
	}
	return m
}

func mustProfile(t *testing.T, m Model, name string) GIProfile {
	t.Helper()
	p, ok := m.Profile(name)
	if !ok {
		t.Fatalf("%s: no profile %q", m.ID, name)
	}
	return p
}

func TestEveryFileLoadsAndValidates(t *testing.T) {
	entries, err := dataFS.ReadDir("data")
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		files = append(files, e.Name())
	}
	if len(files) == 0 {
		t.Fatal("no data files embedded")
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			data, err := dataFS.ReadFile("data/" + f)
			if err != nil {
				t.Fatal(err)
			}
			m, err := Parse(data, f)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Validate(); err != nil {
				t.Fatal(err)
			}
			if len(m.Sources) == 0 {
				t.Errorf("%s: no sources", f)
			}
			if m.ID+".yaml" != f {
				t.Errorf("id %q does not match file %s", m.ID, f)
			}
		})
	}

	all, err := All()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(files) {
		t.Fatalf("All() returned %d models for %d files", len(all), len(files))
	}
	if !sort.SliceIsSorted(all, func(i, j int) bool { return all[i].ID < all[j].ID }) {
		t.Error("All() is not sorted by ID")
	}
	want := []string{"a100-sxm4-40gb", "a100-sxm4-80gb", "a30", "b200", "h100-sxm5-80gb", "h200-sxm5-141gb", "l4", "t4"}
	ids, _ := IDs()
	if !slices.Equal(ids, want) {
		t.Errorf("IDs() = %v, want %v", ids, want)
	}
	for _, m := range all {
		got := mustGet(t, m.ID)
		if got.Name != m.Name {
			t.Errorf("Get(%q).Name = %q, All() says %q", m.ID, got.Name, m.Name)
		}
	}
}

var profileNameRE = regexp.MustCompile(`^(\d+)g\.(\d+)gb(\+me|-me|\+me\.all|\+gfx)?$`)

// TestProfileNamesMatchMemory checks each profile name against the memory NVML reports, the way
// nvidia-smi derives the name: the instance's share of memory rounded up to eighths of the GPU,
// times the GPU's memory in GiB rounded up.
func TestProfileNamesMatchMemory(t *testing.T) {
	all, err := All()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range all {
		if m.MIG == nil {
			continue
		}
		totalGB := math.Ceil(float64(m.MemoryMiB) / 1024)
		for _, p := range m.MIG.Profiles {
			sm := profileNameRE.FindStringSubmatch(p.Name)
			if sm == nil {
				t.Errorf("%s: profile name %q is not <g>g.<mem>gb[suffix]", m.ID, p.Name)
				continue
			}
			if g, _ := strconv.Atoi(sm[1]); g != p.ComputeSlices {
				t.Errorf("%s %s: name says %dg, computeSlices %d", m.ID, p.Name, g, p.ComputeSlices)
			}
			eighths := math.Ceil(float64(p.MemoryMiB) / float64(m.MemoryMiB) * 8)
			want := int(math.Round(eighths / 8 * totalGB))
			if gb, _ := strconv.Atoi(sm[2]); gb != want {
				t.Errorf("%s %s: memoryMiB %d of %d gives %dgb", m.ID, p.Name, p.MemoryMiB, m.MemoryMiB, want)
			}
			if me := strings.HasSuffix(p.Name, "+me"); me != (p.ProfileID == nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1 || p.ProfileID == nvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1) {
				t.Errorf("%s %s: +me suffix and profile ID %d disagree", m.ID, p.Name, p.ProfileID)
			}
		}
	}
}

// TestPublishedFacts pins facts transcribed from NVIDIA's MIG User Guide so that an edit to a data
// file that contradicts the guide fails here.
func TestPublishedFacts(t *testing.T) {
	type fact struct {
		model, profile string
		id, g, size    int
		instances      int
		placements     []int
		cis            []int
	}
	seq := func(n int) []int {
		s := make([]int, n)
		for i := range s {
			s[i] = i
		}
		return s
	}
	facts := []fact{
		{"a100-sxm4-40gb", "1g.5gb", 0, 1, 1, 7, seq(7), []int{1}},
		{"a100-sxm4-40gb", "1g.5gb+me", 7, 1, 1, 1, seq(7), []int{1}},
		{"a100-sxm4-40gb", "1g.10gb", 9, 1, 2, 4, []int{0, 2, 4, 6}, []int{1}},
		{"a100-sxm4-40gb", "2g.10gb", 1, 2, 2, 3, []int{0, 2, 4}, []int{1, 2}},
		{"a100-sxm4-40gb", "3g.20gb", 2, 3, 4, 2, []int{0, 4}, []int{1, 2, 3}},
		{"a100-sxm4-40gb", "4g.20gb", 3, 4, 4, 1, []int{0}, []int{1, 2, 4}},
		{"a100-sxm4-40gb", "7g.40gb", 4, 7, 8, 1, []int{0}, []int{1, 2, 3, 4, 7}},
		{"a100-sxm4-80gb", "1g.10gb", 0, 1, 1, 7, seq(7), []int{1}},
		{"a100-sxm4-80gb", "1g.20gb", 9, 1, 2, 4, []int{0, 2, 4, 6}, []int{1}},
		{"a100-sxm4-80gb", "3g.40gb", 2, 3, 4, 2, []int{0, 4}, []int{1, 2, 3}},
		{"a100-sxm4-80gb", "7g.80gb", 4, 7, 8, 1, []int{0}, []int{1, 2, 3, 4, 7}},
		{"h100-sxm5-80gb", "1g.10gb", 0, 1, 1, 7, seq(7), []int{1}},
		{"h100-sxm5-80gb", "1g.10gb+me", 7, 1, 1, 1, seq(7), []int{1}},
		{"h100-sxm5-80gb", "1g.20gb", 9, 1, 2, 4, []int{0, 2, 4, 6}, []int{1}},
		{"h100-sxm5-80gb", "2g.20gb", 1, 2, 2, 3, []int{0, 2, 4}, []int{1, 2}},
		{"h100-sxm5-80gb", "3g.40gb", 2, 3, 4, 2, []int{0, 4}, []int{1, 2, 3}},
		{"h100-sxm5-80gb", "4g.40gb", 3, 4, 4, 1, []int{0}, []int{1, 2, 4}},
		{"h100-sxm5-80gb", "7g.80gb", 4, 7, 8, 1, []int{0}, []int{1, 2, 3, 4, 7}},
		{"h200-sxm5-141gb", "1g.18gb", 0, 1, 1, 7, seq(7), []int{1}},
		{"h200-sxm5-141gb", "1g.35gb", 9, 1, 2, 4, []int{0, 2, 4, 6}, []int{1}},
		{"h200-sxm5-141gb", "3g.71gb", 2, 3, 4, 2, []int{0, 4}, []int{1, 2, 3}},
		{"h200-sxm5-141gb", "7g.141gb", 4, 7, 8, 1, []int{0}, []int{1, 2, 3, 4, 7}},
		{"b200", "1g.23gb", 0, 1, 1, 7, seq(7), []int{1}},
		{"b200", "1g.23gb+me", 7, 1, 1, 1, seq(7), []int{1}},
		{"b200", "1g.45gb", 9, 1, 2, 4, []int{0, 2, 4, 6}, []int{1}},
		{"b200", "2g.45gb", 1, 2, 2, 3, []int{0, 2, 4}, []int{1, 2}},
		{"b200", "3g.90gb", 2, 3, 4, 2, []int{0, 4}, []int{1, 2, 3}},
		{"b200", "4g.90gb", 3, 4, 4, 1, []int{0}, []int{1, 2, 4}},
		{"b200", "7g.180gb", 4, 7, 8, 1, []int{0}, []int{1, 2, 3, 4, 7}},
		{"a30", "1g.6gb", 0, 1, 1, 4, seq(4), []int{1}},
		{"a30", "1g.6gb+me", 7, 1, 1, 1, seq(4), []int{1}},
		{"a30", "2g.12gb", 1, 2, 2, 2, []int{0, 2}, []int{1, 2}},
		{"a30", "2g.12gb+me", 8, 2, 2, 1, []int{0, 2}, []int{1, 2}},
		{"a30", "4g.24gb", 3, 4, 4, 1, []int{0}, []int{1, 2, 4}},
	}
	for _, f := range facts {
		t.Run(f.model+"/"+f.profile, func(t *testing.T) {
			m := mustGet(t, f.model)
			p := mustProfile(t, m, f.profile)
			if p.ProfileID != f.id {
				t.Errorf("profileID = %d, want %d", p.ProfileID, f.id)
			}
			if byID, ok := m.ProfileByID(f.id); !ok || byID.Name != f.profile {
				t.Errorf("ProfileByID(%d) = %q, %v; want %q", f.id, byID.Name, ok, f.profile)
			}
			if p.ComputeSlices != f.g || p.MemorySlices != f.size {
				t.Errorf("computeSlices/memorySlices = %d/%d, want %d/%d", p.ComputeSlices, p.MemorySlices, f.g, f.size)
			}
			if p.InstanceCount != f.instances {
				t.Errorf("instanceCount = %d, want %d", p.InstanceCount, f.instances)
			}
			if !slices.Equal(p.Placements, f.placements) {
				t.Errorf("placements = %v, want %v", p.Placements, f.placements)
			}
			if !slices.Equal(p.ComputeInstanceSlices, f.cis) {
				t.Errorf("computeInstanceSlices = %v, want %v", p.ComputeInstanceSlices, f.cis)
			}
		})
	}

	// Profile sets are exactly the guide's tables.
	wantSets := map[string][]string{
		"a100-sxm4-40gb":  {"1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"},
		"a100-sxm4-80gb":  {"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
		"h100-sxm5-80gb":  {"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"},
		"h200-sxm5-141gb": {"1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"},
		"b200":            {"1g.23gb", "1g.23gb+me", "1g.45gb", "2g.45gb", "3g.90gb", "4g.90gb", "7g.180gb"},
		"a30":             {"1g.6gb", "1g.6gb+me", "2g.12gb", "2g.12gb+me", "4g.24gb"},
	}
	for id, want := range wantSets {
		m := mustGet(t, id)
		var got []string
		for _, p := range m.MIG.Profiles {
			got = append(got, p.Name)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s profiles = %v, want %v", id, got, want)
		}
	}

	// Specific facts the brief calls out.
	a100 := mustGet(t, "a100-sxm4-40gb")
	if slices.Contains(mustProfile(t, a100, "1g.5gb").Placements, 7) {
		t.Error("A100 1g.5gb must not be placeable at slice 7")
	}
	if p := mustProfile(t, a100, "3g.20gb"); p.MemorySlices != 4 || p.ComputeSlices != 3 {
		t.Errorf("A100 3g.20gb spans %d memory slices with %d compute; want 4 and 3", p.MemorySlices, p.ComputeSlices)
	}
	if m := mustGet(t, "a100-sxm4-40gb"); m.MIG.MemorySlices != 8 || m.MIG.ComputeSlices != 7 {
		t.Errorf("A100 geometry %d/%d, want 8/7", m.MIG.MemorySlices, m.MIG.ComputeSlices)
	}
	if m := mustGet(t, "a30"); m.MIG.MemorySlices != 4 || m.MIG.ComputeSlices != 4 {
		t.Errorf("A30 geometry %d/%d, want 4/4", m.MIG.MemorySlices, m.MIG.ComputeSlices)
	}
	for _, id := range []string{"l4", "t4"} {
		if m := mustGet(t, id); m.MIG != nil {
			t.Errorf("%s must not be MIG-capable", id)
		}
		if _, ok := mustGet(t, id).Profile("1g.5gb"); ok {
			t.Errorf("%s: Profile on a non-MIG model returned ok", id)
		}
	}

	// Identity and memory as NVML reports them.
	identity := []struct {
		id, name string
		mib      uint64
		pci      uint32
		sms      int
	}{
		{"a100-sxm4-40gb", "NVIDIA A100-SXM4-40GB", 40960, 0x20B010DE, 108},
		{"a100-sxm4-80gb", "NVIDIA A100-SXM4-80GB", 81920, 0x20B210DE, 108},
		{"h100-sxm5-80gb", "NVIDIA H100 80GB HBM3", 81559, 0x233010DE, 132},
		{"h200-sxm5-141gb", "NVIDIA H200", 143771, 0x233510DE, 132},
		{"b200", "NVIDIA B200", 183359, 0x290110DE, 148},
		{"a30", "NVIDIA A30", 24576, 0x20B710DE, 56},
		{"l4", "NVIDIA L4", 23034, 0x27B810DE, 58},
		{"t4", "Tesla T4", 15360, 0x1EB810DE, 40},
	}
	for _, w := range identity {
		m := mustGet(t, w.id)
		if m.Name != w.name || m.MemoryMiB != w.mib || m.PCIDeviceID != w.pci || m.SMCount != w.sms {
			t.Errorf("%s = {%q %d %#x %d}, want {%q %d %#x %d}", w.id, m.Name, m.MemoryMiB, m.PCIDeviceID, m.SMCount,
				w.name, w.mib, w.pci, w.sms)
		}
	}
}

func TestGetUnknownListsIDs(t *testing.T) {
	_, err := Get("a100-sxm4-48gb")
	if err == nil {
		t.Fatal("Get of an unknown id succeeded")
	}
	for _, id := range []string{"a100-sxm4-48gb", "a100-sxm4-40gb", "h100-sxm5-80gb", "a30", "t4"} {
		if !strings.Contains(err.Error(), id) {
			t.Errorf("error %q does not mention %q", err, id)
		}
	}
}

const validModel = `
id: test-gpu
name: Test GPU
architecture: ampere
brand: nvidia
computeCapability: "8.0"
memoryMiB: 40960
pciDeviceID: 0x20B010DE
smCount: 108
maxSMClockMHz: 1410
powerLimitW: 400
idlePowerW: 50
nvlinks: 0
mig:
  memorySlices: 8
  computeSlices: 7
  profiles:
    - name: 1g.5gb
      profileID: 0
      computeSlices: 1
      memorySlices: 1
      memoryMiB: 4864
      smCount: 14
      copyEngines: 1
      decoders: 0
      encoders: 0
      jpegs: 0
      ofas: 0
      instanceCount: 7
      placements: [0, 1, 2, 3, 4, 5, 6]
      computeInstanceSlices: [1]
    - name: 3g.20gb
      profileID: 2
      computeSlices: 3
      memorySlices: 4
      memoryMiB: 19968
      smCount: 42
      copyEngines: 3
      decoders: 2
      encoders: 0
      jpegs: 0
      ofas: 0
      instanceCount: 2
      placements: [0, 4]
      computeInstanceSlices: [1, 2, 3]
sources: [test]
`

func TestParseErrors(t *testing.T) {
	if _, err := Parse([]byte(validModel), "valid.yaml"); err != nil {
		t.Fatalf("valid model rejected: %v", err)
	}
	cases := []struct {
		name, old, new string
		want           []string // substrings of the error
	}{
		{"malformed yaml", "mig:\n", "mig: [\n", []string{"bad.yaml"}},
		{"unknown top-level field", "nvlinks: 0", "nvlink: 0", []string{"bad.yaml", "nvlink"}},
		{"unknown profile field", "      smCount: 42", "      smCuont: 42", []string{"bad.yaml", "smCuont"}},
		{"wrong type", "smCount: 108", "smCount: many", []string{"bad.yaml", "smCount"}},
		{"duplicate field", "nvlinks: 0", "nvlinks: 0\nnvlinks: 1", []string{"bad.yaml", "nvlinks"}},
		{"empty id", "id: test-gpu", `id: ""`, []string{"bad.yaml", "id"}},
		{"wrong vendor", "0x20B010DE", "0x20B01002", []string{"pciDeviceID", "vendor"}},
		{"placement past the end", "placements: [0, 4]", "placements: [0, 4, 6]", []string{"placements[2]", "past"}},
		{"misaligned placement", "placements: [0, 4]", "placements: [0, 2]", []string{"placements[1]", "aligned"}},
		{"1-slice placement past the end", "placements: [0, 1, 2, 3, 4, 5, 6]", "placements: [0, 1, 2, 3, 4, 5, 6, 8]", []string{"placements[7]", "past"}},
		{"duplicate profile ID", "      profileID: 2", "      profileID: 0", []string{"profileID", "duplicate"}},
		{"duplicate profile name", "name: 3g.20gb", "name: 1g.5gb", []string{"name", "duplicate"}},
		{"too many instances", "instanceCount: 2", "instanceCount: 3", []string{"instanceCount"}},
		{"too many compute slices", "      computeSlices: 3\n", "      computeSlices: 8\n", []string{"computeSlices"}},
		{"CI sizes not increasing", "[1, 2, 3]", "[2, 1, 3]", []string{"computeInstanceSlices"}},
		{"CI max below g", "[1, 2, 3]", "[1, 2]", []string{"computeInstanceSlices"}},
		{"no CI sizes", "[1, 2, 3]", "[]", []string{"computeInstanceSlices"}},
		{"profile bigger than GPU", "memoryMiB: 19968", "memoryMiB: 49968", []string{"memoryMiB"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := strings.Replace(validModel, c.old, c.new, 1)
			if src == validModel {
				t.Fatalf("test case does not change the model (%q not found)", c.old)
			}
			_, err := Parse([]byte(src), "bad.yaml")
			if err == nil {
				t.Fatal("Parse accepted an invalid model")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestValidateOnStructs(t *testing.T) {
	m := mustGet(t, "a100-sxm4-40gb")
	clone := func() Model {
		c := m
		mig := *m.MIG
		mig.Profiles = slices.Clone(m.MIG.Profiles)
		for i := range mig.Profiles {
			mig.Profiles[i].Placements = slices.Clone(mig.Profiles[i].Placements)
		}
		c.MIG = &mig
		return c
	}
	if err := clone().Validate(); err != nil {
		t.Fatalf("clone of a valid model: %v", err)
	}

	past := clone()
	for i, p := range past.MIG.Profiles {
		if p.Name == "1g.5gb" {
			past.MIG.Profiles[i].Placements = append(past.MIG.Profiles[i].Placements, 8)
		}
	}
	if err := past.Validate(); err == nil || !strings.Contains(err.Error(), "past") {
		t.Errorf("placement at 8 of a 1-slice profile: err = %v", err)
	}

	dup := clone()
	dup.MIG.Profiles[1].ProfileID = dup.MIG.Profiles[0].ProfileID
	if err := dup.Validate(); err == nil || !strings.Contains(err.Error(), "duplicate profile ID") {
		t.Errorf("duplicate profile ID: err = %v", err)
	}

	// The model in the cache is untouched by the edits above.
	if err := mustGet(t, "a100-sxm4-40gb").Validate(); err != nil {
		t.Errorf("cached model changed: %v", err)
	}
}

// TestGoNVMLMockDifferences compares the data files with go-nvml's stock mock GPUs. The mock is a
// convenient fake, not a transcription of NVIDIA's tables; the differences below are known and
// asserted so that we notice when upstream changes (fixes) them — then update this list and check
// whether the simulator can use the mock directly.
func TestGoNVMLMockDifferences(t *testing.T) {
	mocks := []struct {
		id   string
		mock gpus.Config
	}{
		{"a100-sxm4-40gb", gpus.A100_SXM4_40GB},
		{"a100-sxm4-80gb", gpus.A100_SXM4_80GB},
		{"h100-sxm5-80gb", gpus.H100_SXM5_80GB},
		{"h200-sxm5-141gb", gpus.H200_SXM5_141GB},
		{"b200", gpus.B200_SXM5_180GB},
		{"a30", gpus.A30_PCIE_24GB},
	}
	var diffs []string
	for _, c := range mocks {
		m := mustGet(t, c.id)
		mp := c.mock.MIGProfiles
		if c.mock.PciDeviceId != m.PCIDeviceID {
			diffs = append(diffs, fmt.Sprintf("%s: pciDeviceId %#x, real %#x", c.id, c.mock.PciDeviceId, m.PCIDeviceID))
		}
		ids := map[int]bool{}
		for id := range mp.GpuInstanceProfiles {
			ids[id] = true
		}
		for _, p := range m.MIG.Profiles {
			ids[p.ProfileID] = true
		}
		for _, id := range slices.Sorted(mapsKeys(ids)) {
			p, ours := m.ProfileByID(id)
			info, theirs := mp.GpuInstanceProfiles[id]
			switch {
			case !theirs:
				diffs = append(diffs, fmt.Sprintf("%s: mock lacks profile %d (%s)", c.id, id, p.Name))
				continue
			case !ours:
				diffs = append(diffs, fmt.Sprintf("%s: mock has extra profile %d", c.id, id))
				continue
			}
			if int(info.InstanceCount) != p.InstanceCount {
				diffs = append(diffs, fmt.Sprintf("%s %s: mock instanceCount %d, real %d", c.id, p.Name, info.InstanceCount, p.InstanceCount))
			}
			if int(info.SliceCount) != p.ComputeSlices {
				diffs = append(diffs, fmt.Sprintf("%s %s: mock sliceCount %d, real %d", c.id, p.Name, info.SliceCount, p.ComputeSlices))
			}
			var starts []int
			sizes := map[int]bool{}
			for _, pl := range mp.GpuInstancePlacements[id] {
				starts = append(starts, int(pl.Start))
				sizes[int(pl.Size)] = true
			}
			if !slices.Equal(starts, p.Placements) {
				diffs = append(diffs, fmt.Sprintf("%s %s: mock placements %v, real %v", c.id, p.Name, starts, p.Placements))
			}
			if len(sizes) != 1 || !sizes[p.MemorySlices] {
				diffs = append(diffs, fmt.Sprintf("%s %s: mock placement size %v, real %d", c.id, p.Name, slices.Sorted(mapsKeys(sizes)), p.MemorySlices))
			}
			ciSizes := map[int]bool{}
			for _, ci := range mp.ComputeInstanceProfiles[id] {
				ciSizes[int(ci.SliceCount)] = true
			}
			if got := slices.Sorted(mapsKeys(ciSizes)); !slices.Equal(got, p.ComputeInstanceSlices) {
				diffs = append(diffs, fmt.Sprintf("%s %s: mock compute-instance sizes %v, real %v", c.id, p.Name, got, p.ComputeInstanceSlices))
			}
		}
	}

	// Known differences between go-nvml v0.13.4-0's mock and NVIDIA's tables. The A100 and A30 mocks
	// agree with the tables on everything compared here.
	known := []string{
		// H100: 3g and 7g placements are sized in compute slices (3, 7) instead of memory slices
		// (4, 8); 1g.20gb (1_SLICE_REV2) may start anywhere although it spans two memory slices; the
		// 7g instance offers no 4-slice compute instance.
		"h100-sxm5-80gb 3g.40gb: mock placement size [3], real 4",
		"h100-sxm5-80gb 7g.80gb: mock placement size [7], real 8",
		"h100-sxm5-80gb 7g.80gb: mock compute-instance sizes [1 2 3 7], real [1 2 3 4 7]",
		"h100-sxm5-80gb 1g.20gb: mock placements [0 1 2 3 4 5 6], real [0 2 4 6]",
		"h100-sxm5-80gb 1g.20gb: mock placement size [1], real 2",
		// H200: the same placement errors, and device ID 0x2333 instead of 0x2335 (H200 SXM 141GB).
		"h200-sxm5-141gb: pciDeviceId 0x233310de, real 0x233510de",
		"h200-sxm5-141gb 3g.71gb: mock placement size [3], real 4",
		"h200-sxm5-141gb 7g.141gb: mock placement size [7], real 8",
		"h200-sxm5-141gb 7g.141gb: mock compute-instance sizes [1 2 3 7], real [1 2 3 4 7]",
		"h200-sxm5-141gb 1g.35gb: mock placements [0 1 2 3 4 5 6], real [0 2 4 6]",
		"h200-sxm5-141gb 1g.35gb: mock placement size [1], real 2",
		// B200: the same placement errors, and device ID 0x2B00 (pci.ids: GB10B, Jetson AGX Thor)
		// instead of 0x2901 (GB100, B200).
		"b200: pciDeviceId 0x2b0010de, real 0x290110de",
		"b200 3g.90gb: mock placement size [3], real 4",
		"b200 7g.180gb: mock placement size [7], real 8",
		"b200 7g.180gb: mock compute-instance sizes [1 2 3 7], real [1 2 3 4 7]",
		"b200 1g.45gb: mock placements [0 1 2 3 4 5 6], real [0 2 4 6]",
		"b200 1g.45gb: mock placement size [1], real 2",
	}
	slices.Sort(diffs)
	slices.Sort(known)
	for _, d := range diffs {
		if !slices.Contains(known, d) {
			t.Errorf("new difference from go-nvml's mock: %s", d)
		}
	}
	for _, k := range known {
		if !slices.Contains(diffs, k) {
			t.Errorf("known difference from go-nvml's mock is gone (fixed upstream?): %s", k)
		}
	}

	// The two differences the simulator most depends on, spelled out.
	h100 := gpus.H100_SXM5_80GB.MIGProfiles.GpuInstancePlacements
	for _, pl := range h100[nvml.GPU_INSTANCE_PROFILE_3_SLICE] {
		if pl.Size != 3 {
			t.Errorf("go-nvml mock H100 3_SLICE placement %+v: size is no longer 3", pl)
		}
	}
	if p := mustProfile(t, mustGet(t, "h100-sxm5-80gb"), "3g.40gb"); p.MemorySlices != 4 {
		t.Errorf("H100 3g.40gb spans %d memory slices, want 4", p.MemorySlices)
	}
	var rev2 []int
	for _, pl := range h100[nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2] {
		rev2 = append(rev2, int(pl.Start))
	}
	if !slices.Equal(rev2, []int{0, 1, 2, 3, 4, 5, 6}) {
		t.Errorf("go-nvml mock H100 1_SLICE_REV2 starts %v: no longer every slice 0..6", rev2)
	}
	if p, _ := mustGet(t, "h100-sxm5-80gb").ProfileByID(nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2); !slices.Equal(p.Placements, []int{0, 2, 4, 6}) {
		t.Errorf("H100 1g.20gb placements %v, want [0 2 4 6]", p.Placements)
	}
}

func mapsKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
