// Package packing places a synthetic inference workload on simulated GPUs three ways — whole GPUs,
// MIG profiles and memory shares — and counts the GPUs each needs, against the lower bound
// ⌈Σ memory ⁄ usable GPU memory⌉. It is a model of Tessera's placement rules for benchmarks
// (tests/packing's BenchmarkPacking, `make bench`), not code the scheduler runs:
//
//   - whole: one pod per GPU (as the device plugin's nvidia.com/gpu or DRA mode whole);
//   - MIG: each pod takes the smallest profile of the model whose memory holds its request (ties: fewer
//     compute slices; +me profiles are not used), first fit onto the GPUs in order, at the first free
//     placement of NVIDIA's table that keeps within the GPU's compute slices and the profile's
//     instance count (the rules the simulator enforces, as dynamic MIG on an unchanged node would);
//   - shared: DRA mode shared with the settings Resolve fills for the model (memoryStep, memoryReserve,
//     defaultComputePercent): a pod consumes its request rounded up to memoryStep and the default
//     compute share, first fit onto the GPUs in order.
package packing

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

const gib = 1 << 30

// Workload returns n memory requests in bytes, whole GiB drawn uniformly from [minGiB, maxGiB] with
// a fixed seed: the same workload on every run and machine.
func Workload(n, minGiB, maxGiB int, seed uint64) []int64 {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	out := make([]int64, n)
	for i := range out {
		out[i] = int64(minGiB+r.IntN(maxGiB-minGiB+1)) * gib
	}
	return out
}

// Result is the GPUs each placement needs for one workload.
type Result struct {
	Pods        int
	Whole       int
	MIG         int
	Shared      int
	LowerBound  int   // ⌈Σ requests ⁄ usable memory of one GPU⌉
	UsableBytes int64 // the usable memory of one GPU (shared mode's capacity)
	MIGProfiles map[string]int
}

// Place places the requests on GPUs of the model (e.g. "h100-sxm5-80gb").
func Place(modelID string, requests []int64) (Result, error) {
	m, err := models.Get(modelID)
	if err != nil {
		return Result{}, err
	}
	sh, err := sharedSettings(m)
	if err != nil {
		return Result{}, err
	}
	usable := int64(m.MemoryMiB)<<20 - sh.MemoryReserve.Value()
	res := Result{Pods: len(requests), UsableBytes: usable, MIGProfiles: map[string]int{}}
	var sum int64
	for _, r := range requests {
		if r > usable {
			return Result{}, fmt.Errorf("a request of %d MiB does not fit on one %s", r>>20, m.Name)
		}
		sum += r
	}
	res.LowerBound = int((sum + usable - 1) / usable)
	res.Whole = len(requests)
	if res.Shared, err = placeShared(sh, usable, requests); err != nil {
		return Result{}, err
	}
	if res.MIG, err = placeMIG(m, requests, res.MIGProfiles); err != nil {
		return Result{}, err
	}
	return res, nil
}

// sharedSettings resolves a profile of mode shared on one GPU of the model, so that the defaults
// are Tessera's own.
func sharedSettings(m models.Model) (*api.SharedSettings, error) {
	p, err := api.ParseProfile([]byte("apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: dra, mode: shared}\n"))
	if err != nil {
		return nil, err
	}
	r, err := api.Resolve(p.Profile, []api.GPUInfo{{Index: 0, UUID: "GPU-packing-0", ProductName: m.Name, MemoryMiB: m.MemoryMiB}})
	if err != nil {
		return nil, err
	}
	if len(r.Assignments) != 1 || r.Assignments[0].Shared == nil {
		return nil, fmt.Errorf("mode shared did not resolve on %s", m.Name)
	}
	return r.Assignments[0].Shared, nil
}

func placeShared(sh *api.SharedSettings, usable int64, requests []int64) (int, error) {
	step := sh.MemoryStep.Value()
	type gpu struct {
		mem int64
		pct int
	}
	var gpus []gpu
	for _, r := range requests {
		need := (r + step - 1) / step * step
		if need > usable {
			return 0, fmt.Errorf("a request of %d MiB rounds to more than a GPU's %d MiB", r>>20, usable>>20)
		}
		i := slices.IndexFunc(gpus, func(g gpu) bool {
			return g.mem+need <= usable && g.pct+sh.DefaultComputePercent <= 100
		})
		if i < 0 {
			gpus = append(gpus, gpu{})
			i = len(gpus) - 1
		}
		gpus[i].mem += need
		gpus[i].pct += sh.DefaultComputePercent
	}
	return len(gpus), nil
}

type migGPU struct {
	slices  []bool // memory slices in use
	compute int
	count   map[string]int
}

func (g *migGPU) fit(m *models.MIG, p models.GIProfile) bool {
	if g.compute+p.ComputeSlices > m.ComputeSlices || g.count[p.Name] >= p.InstanceCount {
		return false
	}
	for _, start := range p.Placements {
		if start+p.MemorySlices > len(g.slices) || slices.Contains(g.slices[start:start+p.MemorySlices], true) {
			continue
		}
		for s := start; s < start+p.MemorySlices; s++ {
			g.slices[s] = true
		}
		g.compute += p.ComputeSlices
		g.count[p.Name]++
		return true
	}
	return false
}

// smallestProfile is the profile with the least memory that holds r bytes (ties: fewer compute
// slices, then the table's order), ignoring +me variants.
func smallestProfile(m *models.MIG, r int64) (models.GIProfile, bool) {
	var best models.GIProfile
	found := false
	for _, p := range m.Profiles {
		if int64(p.MemoryMiB)<<20 < r || strings.HasSuffix(p.Name, "+me") {
			continue
		}
		if !found || p.MemoryMiB < best.MemoryMiB || p.MemoryMiB == best.MemoryMiB && p.ComputeSlices < best.ComputeSlices {
			best, found = p, true
		}
	}
	return best, found
}

func placeMIG(m models.Model, requests []int64, used map[string]int) (int, error) {
	if m.MIG == nil {
		return 0, fmt.Errorf("%s has no MIG", m.Name)
	}
	var gpus []*migGPU
	for _, r := range requests {
		p, ok := smallestProfile(m.MIG, r)
		if !ok {
			return 0, fmt.Errorf("no MIG profile of %s holds %d MiB", m.Name, r>>20)
		}
		placed := false
		for _, g := range gpus {
			if placed = g.fit(m.MIG, p); placed {
				break
			}
		}
		if !placed {
			g := &migGPU{slices: make([]bool, m.MIG.MemorySlices), count: map[string]int{}}
			if !g.fit(m.MIG, p) {
				return 0, fmt.Errorf("profile %s does not fit an empty %s", p.Name, m.Name)
			}
			gpus = append(gpus, g)
		}
		used[p.Name]++
	}
	return len(gpus), nil
}
