package mig

import (
	"fmt"
	"sort"
	"strings"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// GPUShape is what the planner needs to know of a GPU: its MIG profiles with their placements, as
// NVML lists them in MIG mode.
type GPUShape struct {
	Index    int
	Product  string
	Profiles []nvmlib.MigProfile
}

// Instance is one GPU instance of a layout.
type Instance struct {
	Profile   string           `json:"profile"`
	ProfileID int              `json:"profileID"`
	Placement nvmlib.Placement `json:"placement"`
}

func (i Instance) String() string { return fmt.Sprintf("%s@%d", i.Profile, i.Placement.Start) }

func (s GPUShape) label() string { return fmt.Sprintf("GPU %d (%s)", s.Index, s.Product) }

func (s GPUShape) profile(name string) (nvmlib.MigProfile, bool) {
	for _, p := range s.Profiles {
		if p.Name == name {
			return p, true
		}
	}
	return nvmlib.MigProfile{}, false
}

// memorySlices and computeSlices are the GPU's totals, derived from its profiles.
func (s GPUShape) memorySlices() int {
	m := 0
	for _, p := range s.Profiles {
		for _, pl := range p.Placements {
			m = max(m, pl.End())
		}
	}
	return m
}

func (s GPUShape) computeSlices() int {
	c := 0
	for _, p := range s.Profiles {
		c = max(c, p.ComputeSlices)
	}
	return c
}

func (s GPUShape) profileNames() string {
	var names []string
	for _, p := range s.Profiles {
		names = append(names, p.Name)
	}
	return strings.Join(names, ", ")
}

// Place computes placements for the requested profile counts. Pinned instances go where they are
// pinned; `keep` are existing instances that stay where they are if the result can include them
// (they count toward the request). Among all valid layouts it picks the one that leaves the largest
// profiles placeable afterwards, deterministically. A refusal says precisely why.
func Place(s GPUShape, want map[string]int, pinned []PinnedPlacement, keep []Instance) ([]Instance, error) {
	memTotal, compTotal := s.memorySlices(), s.computeSlices()
	if memTotal == 0 {
		return nil, fmt.Errorf("%s: NVML lists no MIG placements (is MIG mode on?)", s.label())
	}
	var items []nvmlib.MigProfile
	mem, comp := 0, 0
	var parts []string
	for _, name := range sortedKeys(want) {
		n := want[name]
		if n == 0 {
			continue
		}
		p, ok := s.profile(name)
		if !ok {
			return nil, fmt.Errorf("%s: no MIG profile %s; it offers %s", s.label(), name, s.profileNames())
		}
		if n > p.InstanceCount {
			return nil, fmt.Errorf("%s: %s x%d: the GPU allows at most %d", s.label(), name, n, p.InstanceCount)
		}
		size := p.Placements[0].Size
		mem += n * size
		comp += n * p.ComputeSlices
		parts = append(parts, fmt.Sprintf("%s x%d", name, n))
		for range n {
			items = append(items, p)
		}
	}
	what := strings.Join(parts, " + ")
	if mem > memTotal {
		return nil, fmt.Errorf("%s: %s needs %d memory slices, the GPU has %d", s.label(), what, mem, memTotal)
	}
	if comp > compTotal {
		return nil, fmt.Errorf("%s: %s needs %d compute slices, the GPU has %d", s.label(), what, comp, compTotal)
	}

	// Pinned instances first, each checked against the table.
	var placed []Instance
	for _, pp := range pinned {
		p, ok := s.profile(pp.Profile)
		if !ok {
			return nil, fmt.Errorf("%s: placements: no MIG profile %s; it offers %s", s.label(), pp.Profile, s.profileNames())
		}
		pl, ok := placementAt(p, pp.Start)
		if !ok {
			return nil, fmt.Errorf("%s: placements: %s cannot start at slice %d; it starts at %s", s.label(), p.Name, pp.Start, starts(p))
		}
		for _, o := range placed {
			if o.Placement.Overlaps(pl) {
				return nil, fmt.Errorf("%s: placements: %s at %d overlaps %s", s.label(), p.Name, pp.Start, o)
			}
		}
		placed = append(placed, Instance{Profile: p.Name, ProfileID: p.ID, Placement: pl})
		items = removeOne(items, p.Name)
	}
	// Largest first; equal profiles take increasing starts so that permutations are not searched.
	sort.SliceStable(items, func(i, j int) bool {
		if items[i].Placements[0].Size != items[j].Placements[0].Size {
			return items[i].Placements[0].Size > items[j].Placements[0].Size
		}
		return items[i].Name < items[j].Name
	})
	ranked := rankedProfiles(s)
	var best []Instance
	found := false
	var bestScore []int
	bestKept := -1
	cur := append([]Instance(nil), placed...)
	var search func(k, minStart int)
	search = func(k, minStart int) {
		if k == len(items) {
			kept := countKept(cur, keep)
			score := freedom(s, ranked, cur)
			if !found || kept > bestKept || (kept == bestKept && less(bestScore, score)) {
				best, bestScore, bestKept, found = append([]Instance{}, cur...), score, kept, true
			}
			return
		}
		p := items[k]
		for _, pl := range p.Placements {
			if k > 0 && items[k-1].Name == p.Name && pl.Start < minStart {
				continue
			}
			if overlapsAny(cur, pl) {
				continue
			}
			cur = append(cur, Instance{Profile: p.Name, ProfileID: p.ID, Placement: pl})
			search(k+1, pl.Start+1)
			cur = cur[:len(cur)-1]
		}
	}
	search(0, 0)
	if !found {
		var opts []string
		seen := map[string]bool{}
		for _, p := range items {
			if !seen[p.Name] {
				seen[p.Name] = true
				opts = append(opts, fmt.Sprintf("%s at %s", p.Name, starts(p)))
			}
		}
		return nil, fmt.Errorf("%s: %s fits by slice count but no combination of allowed placements avoids overlap (%s)", s.label(), what, strings.Join(opts, "; "))
	}
	sort.Slice(best, func(i, j int) bool { return best[i].Placement.Start < best[j].Placement.Start })
	return best, nil
}

func placementAt(p nvmlib.MigProfile, start int) (nvmlib.Placement, bool) {
	for _, pl := range p.Placements {
		if pl.Start == start {
			return pl, true
		}
	}
	return nvmlib.Placement{}, false
}

func starts(p nvmlib.MigProfile) string {
	var ss []string
	for _, pl := range p.Placements {
		ss = append(ss, fmt.Sprint(pl.Start))
	}
	return strings.Join(ss, ",")
}

func removeOne(items []nvmlib.MigProfile, name string) []nvmlib.MigProfile {
	for i, p := range items {
		if p.Name == name {
			return append(items[:i:i], items[i+1:]...)
		}
	}
	return items
}

func overlapsAny(is []Instance, pl nvmlib.Placement) bool {
	for _, i := range is {
		if i.Placement.Overlaps(pl) {
			return true
		}
	}
	return false
}

func countKept(cur, keep []Instance) int {
	n := 0
	for _, k := range keep {
		for _, c := range cur {
			if c.Profile == k.Profile && c.Placement == k.Placement {
				n++
				break
			}
		}
	}
	return n
}

// rankedProfiles orders the GPU's profiles from the largest (most memory slices, then compute) down.
func rankedProfiles(s GPUShape) []nvmlib.MigProfile {
	ps := append([]nvmlib.MigProfile(nil), s.Profiles...)
	sort.SliceStable(ps, func(i, j int) bool {
		a, b := ps[i], ps[j]
		if len(a.Placements) == 0 || len(b.Placements) == 0 {
			return len(a.Placements) > len(b.Placements)
		}
		if a.Placements[0].Size != b.Placements[0].Size {
			return a.Placements[0].Size > b.Placements[0].Size
		}
		if a.ComputeSlices != b.ComputeSlices {
			return a.ComputeSlices > b.ComputeSlices
		}
		return a.ID < b.ID
	})
	return ps
}

// freedom scores a layout by how many free placements each profile, largest first, still has.
func freedom(s GPUShape, ranked []nvmlib.MigProfile, used []Instance) []int {
	score := make([]int, 0, len(ranked))
	for _, p := range ranked {
		n := 0
		for _, pl := range p.Placements {
			if !overlapsAny(used, pl) {
				n++
			}
		}
		score = append(score, n)
	}
	return score
}

// less compares scores lexicographically; a nil score is below any other.
func less(a, b []int) bool {
	if a == nil {
		return b != nil
	}
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}
