package sim

import (
	"fmt"
	"math/bits"
	"sort"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/google/uuid"

	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

// The MIG rules real hardware enforces, with NVML's return codes. Each function works on a GPU's
// state under that GPU's lock and changes nothing when it refuses.

// createGI places a GPU instance of profile p. With placement nil the first free placement in NVML's
// order is used. It returns the new instance.
func createGI(st *gpuState, m models.Model, p models.GIProfile, placement *nvml.GpuInstancePlacement) (giState, nvml.Return) {
	if !st.MigEnabled {
		return giState{}, nvml.ERROR_NOT_SUPPORTED
	}
	if placement != nil && (int(placement.Size) != p.MemorySlices || !containsInt(p.Placements, int(placement.Start))) {
		return giState{}, nvml.ERROR_INVALID_ARGUMENT
	}
	count, compute := 0, 0
	for _, gi := range st.GIs {
		if gi.ProfileID == p.ProfileID {
			count++
		}
		if gp, ok := m.ProfileByID(gi.ProfileID); ok {
			compute += gp.ComputeSlices
		}
	}
	if count >= p.InstanceCount || compute+p.ComputeSlices > m.MIG.ComputeSlices {
		return giState{}, nvml.ERROR_INSUFFICIENT_RESOURCES
	}
	var starts []int
	if placement != nil {
		starts = []int{int(placement.Start)}
	} else {
		// Without a placement the driver fills from the end of the GPU, keeping the low placements
		// that the large profiles need free for as long as it can.
		for i := len(p.Placements) - 1; i >= 0; i-- {
			starts = append(starts, p.Placements[i])
		}
	}
	for _, start := range starts {
		if overlapsAny(st.GIs, start, p.MemorySlices) {
			continue
		}
		gi := giState{ID: giID(st.GIs, m.MIG.MemorySlices, start, p.MemorySlices), ProfileID: p.ProfileID, Start: start, Size: p.MemorySlices}
		st.GIs = append(st.GIs, gi)
		sort.Slice(st.GIs, func(i, j int) bool { return st.GIs[i].ID < st.GIs[j].ID })
		return gi, nvml.SUCCESS
	}
	return giState{}, nvml.ERROR_INSUFFICIENT_RESOURCES
}

func overlapsAny(gis []giState, start, size int) bool {
	for _, gi := range gis {
		if start < gi.Start+gi.Size && gi.Start < start+size {
			return true
		}
	}
	return false
}

// giID numbers GPU instances by their position in the binary tree of memory slices, as the driver
// does on 8-slice GPUs (the full GPU is 0, halves 1–2, quarters 3–6, eighths 7–14): the ID follows
// from the placement. Where the tree does not apply, the lowest free ID is used.
func giID(gis []giState, slices, start, size int) int {
	used := map[int]bool{}
	for _, gi := range gis {
		used[gi.ID] = true
	}
	if size > 0 && slices%size == 0 && bits.OnesCount(uint(slices/size)) == 1 && start%size == 0 {
		id := slices/size - 1 + start/size
		if !used[id] {
			return id
		}
	}
	id := 0
	for used[id] {
		id++
	}
	return id
}

func findGI(st *gpuState, id int) (int, bool) {
	for i, gi := range st.GIs {
		if gi.ID == id {
			return i, true
		}
	}
	return 0, false
}

func destroyGI(st *gpuState, id int) nvml.Return {
	i, ok := findGI(st, id)
	if !ok {
		return nvml.ERROR_INVALID_ARGUMENT
	}
	if len(st.GIs[i].CIs) > 0 {
		return nvml.ERROR_IN_USE
	}
	for _, p := range st.Processes {
		if p.GI == id {
			return nvml.ERROR_IN_USE
		}
	}
	st.GIs = append(st.GIs[:i], st.GIs[i+1:]...)
	return nvml.SUCCESS
}

// ciPlacements lists where a compute instance of `slices` may start inside a GPU instance of giSlices:
// at multiples of the next power of two, as NVML places them (a 3-slice CI in a 7-slice GI at 0 or 4).
func ciPlacements(giSlices, slices int) []int {
	align := 1
	for align < slices {
		align <<= 1
	}
	var out []int
	for s := 0; s+slices <= giSlices; s += align {
		out = append(out, s)
	}
	return out
}

// createCI creates a compute instance of `slices` compute slices in GPU instance giIdx, at the given
// start or the first free one (start < 0).
func createCI(st *gpuState, gpuUUID string, p models.GIProfile, giIdx, slices, start int) (ciState, nvml.Return) {
	gi := &st.GIs[giIdx]
	if !containsInt(p.ComputeInstanceSlices, slices) {
		return ciState{}, nvml.ERROR_NOT_SUPPORTED
	}
	used := 0
	for _, ci := range gi.CIs {
		used += ci.Slices
	}
	if used+slices > p.ComputeSlices {
		return ciState{}, nvml.ERROR_INSUFFICIENT_RESOURCES
	}
	cands := ciPlacements(p.ComputeSlices, slices)
	if start >= 0 {
		if !containsInt(cands, start) {
			return ciState{}, nvml.ERROR_INVALID_ARGUMENT
		}
		cands = []int{start}
	}
	for _, s := range cands {
		free := true
		for _, ci := range gi.CIs {
			if s < ci.Start+ci.Slices && ci.Start < s+slices {
				free = false
				break
			}
		}
		if !free {
			continue
		}
		ids := map[int]bool{}
		for _, ci := range gi.CIs {
			ids[ci.ID] = true
		}
		id := 0
		for ids[id] {
			id++
		}
		st.MigSerial++
		ci := ciState{ID: id, Slices: slices, Start: s, UUID: migUUID(gpuUUID, st.MigSerial)}
		gi.CIs = append(gi.CIs, ci)
		sort.Slice(gi.CIs, func(i, j int) bool { return gi.CIs[i].ID < gi.CIs[j].ID })
		return ci, nvml.SUCCESS
	}
	return ciState{}, nvml.ERROR_INSUFFICIENT_RESOURCES
}

// migUUID is a MIG device's UUID: new at each creation, as on hardware, and deterministic for a given
// sequence of operations on a node.
func migUUID(gpuUUID string, serial uint64) string {
	return "MIG-" + uuid.NewSHA1(uuidSpace, fmt.Appendf(nil, "%s/mig/%d", gpuUUID, serial)).String()
}

func destroyCI(st *gpuState, giIdx, ciID int) nvml.Return {
	gi := &st.GIs[giIdx]
	for i, ci := range gi.CIs {
		if ci.ID != ciID {
			continue
		}
		for _, p := range st.Processes {
			if p.GI == gi.ID && p.CI == ciID {
				return nvml.ERROR_IN_USE
			}
		}
		gi.CIs = append(gi.CIs[:i], gi.CIs[i+1:]...)
		return nvml.SUCCESS
	}
	return nvml.ERROR_INVALID_ARGUMENT
}

// setMigMode switches MIG mode. Disabling with GPU instances present is refused (ERROR_IN_USE). With
// processes on the GPU the change stays pending (activation ERROR_IN_USE) until they end and the GPU
// is reset or the node reboots; otherwise it takes effect at once, as the driver resets an idle GPU.
func setMigMode(st *gpuState, m models.Model, enable bool) (activation nvml.Return, ret nvml.Return) {
	if m.MIG == nil {
		return nvml.ERROR_NOT_SUPPORTED, nvml.ERROR_NOT_SUPPORTED
	}
	if !enable && len(st.GIs) > 0 {
		return nvml.ERROR_IN_USE, nvml.ERROR_IN_USE
	}
	st.MigPending = enable
	if len(st.Processes) > 0 && st.MigEnabled != enable {
		return nvml.ERROR_IN_USE, nvml.SUCCESS
	}
	st.MigEnabled = enable
	return nvml.SUCCESS, nvml.SUCCESS
}

// resetGPU is what a GPU reset does: the pending MIG mode takes effect, GPU and compute instances
// and processes are gone, a lost GPU is back and its readings return to idle.
func resetGPU(st *gpuState, m models.Model) {
	st.MigEnabled = st.MigPending && m.MIG != nil
	st.GIs = nil
	st.Processes = nil
	st.Lost = false
	st.Readings = readings{PowerMW: m.IdlePowerW * 1000, TempC: 31, SMClockMHz: idleClockMHz}
}

func containsInt(xs []int, x int) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
