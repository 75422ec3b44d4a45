package plugin

import (
	"fmt"
	"slices"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Policy says how GetPreferredAllocation picks shared devices (replicas, MPS clients) and MIG
// devices.
type Policy string

// Policies.
const (
	// Distributed spreads a container's devices, and consecutive containers, over the GPUs (or MIG
	// devices) with the fewest devices in use: the least contention for time-sliced replicas.
	Distributed Policy = "distributed"
	// Packed fills the GPUs that are already most used first, leaving whole GPUs free.
	Packed Policy = "packed"
)

// ParsePolicy checks a policy name.
func ParsePolicy(s string) (Policy, error) {
	switch Policy(s) {
	case Distributed, Packed:
		return Policy(s), nil
	}
	return "", fmt.Errorf("unknown allocation policy %q: use %s or %s", s, Distributed, Packed)
}

// topology is the node's GPU interconnect, read once when the plugin starts: NVLink peers and NUMA
// nodes by GPU index. Preferred allocation reads only this.
type topology struct {
	peers map[int]map[int]bool
	numa  map[int]int
}

// readTopology asks NVML for every GPU's NVLink peers once. A GPU that cannot be read has no
// peers; it never fails the others.
func readTopology(lib nvmlib.Interface, numa map[int]int) *topology {
	t := &topology{peers: map[int]map[int]bool{}, numa: numa}
	n, err := lib.DeviceCount()
	if err != nil {
		return t
	}
	for i := range n {
		ps, err := lib.NVLinkPeers(i)
		if err != nil {
			continue
		}
		t.peers[i] = map[int]bool{}
		for _, p := range ps {
			t.peers[i][p] = true
		}
	}
	return t
}

func (t *topology) linked(a, b int) bool { return t != nil && t.peers[a][b] }

func (t *topology) sameNUMA(a, b int) bool {
	if t == nil {
		return false
	}
	na, oka := t.numa[a]
	nb, okb := t.numa[b]
	return oka && okb && na == nb && na >= 0
}

// preferred picks size devices from available, including mustInclude. Unknown IDs are skipped; the
// answer may be shorter than size only when too few known devices are available. It reads only the
// table (immutable) and builds no map: a request costs one lookup per ID in the table's index and
// a few slices the size of the table or of its parents. GetPreferredAllocation's requests from
// the wire skip the strings: decodePreferred resolves their IDs into a selection and calls pick.
func (t *deviceTable) preferred(available, mustInclude []string, size int) []string {
	if size <= 0 {
		return nil
	}
	s := t.newSelection(len(mustInclude))
	for _, id := range mustInclude {
		if i, ok := t.pos[id]; ok {
			s.require(i)
		}
	}
	if len(s.must) < size {
		for _, id := range available {
			if i, ok := t.pos[id]; ok {
				s.offer(i)
			}
		}
	}
	return t.pick(&s, size)
}

// selection is one container's request resolved against a table, by table position: mark is 1
// for an available device, 2 for a required one (no per-request map is built); must lists the
// required positions in the order the request named them first, nAvail counts the 1s. A device
// both required and available is required, whichever the request named first.
type selection struct {
	mark   []uint8
	must   []int
	nAvail int
}

func (t *deviceTable) newSelection(nMust int) selection {
	return selection{mark: make([]uint8, len(t.devices)), must: make([]int, 0, nMust)}
}

func (s *selection) require(i int) {
	switch s.mark[i] {
	case 1:
		s.nAvail--
	case 2:
		return
	}
	s.mark[i] = 2
	s.must = append(s.must, i)
}

func (s *selection) offer(i int) {
	if s.mark[i] == 0 {
		s.mark[i] = 1
		s.nAvail++
	}
}

// pick chooses size devices of a selection: the required ones first, then by topology (whole
// GPUs) or by the policy (shared and MIG devices).
func (t *deviceTable) pick(s *selection, size int) []string {
	if size <= 0 {
		return nil
	}
	if len(s.must) >= size {
		return t.idsAt(s.must[:size])
	}
	if !t.wholeOnly {
		return t.idsAt(t.pickByParent(s.mark, s.must, size))
	}
	avail := make([]int, 0, s.nAvail)
	for i, m := range s.mark {
		if m == 1 {
			avail = append(avail, i)
		}
	}
	return idsOf(t.pickConnected(t.devicesAt(s.must), t.devicesAt(avail), size))
}

func (t *deviceTable) idsAt(pos []int) []string {
	out := make([]string, len(pos))
	for i, p := range pos {
		out[i] = t.devices[p].ID
	}
	return out
}

func (t *deviceTable) devicesAt(pos []int) []*Device {
	out := make([]*Device, len(pos))
	for i, p := range pos {
		out[i] = t.devices[p]
	}
	return out
}

func idsOf(ds []*Device) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.ID
	}
	return out
}

// pickConnected chooses whole GPUs that are best connected: the most NVLink pairs among them, then
// the most pairs on one NUMA node, then the lowest indices. Without required devices every
// available GPU is tried as the seed of a greedy completion and the best result wins.
func (t *deviceTable) pickConnected(must, avail []*Device, size int) []*Device {
	slices.SortFunc(avail, func(a, b *Device) int { return a.GPU - b.GPU })
	if len(must)+len(avail) <= size {
		return append(slices.Clone(must), avail...)
	}
	if len(must) > 0 {
		return t.greedy(must, avail, size)
	}
	var best []*Device
	bestScore := [2]int{-1, -1}
	for i := range avail {
		seed := []*Device{avail[i]}
		rest := append(slices.Clone(avail[:i]), avail[i+1:]...)
		got := t.greedy(seed, rest, size)
		if s := t.score(got); s[0] > bestScore[0] || (s[0] == bestScore[0] && s[1] > bestScore[1]) {
			best, bestScore = got, s
		}
	}
	return best
}

func (t *deviceTable) greedy(chosen, cands []*Device, size int) []*Device {
	chosen = slices.Clone(chosen)
	cands = slices.Clone(cands)
	for len(chosen) < size && len(cands) > 0 {
		bi, bl, bn := -1, -1, -1
		for i, c := range cands {
			l, n := 0, 0
			for _, x := range chosen {
				if t.topo.linked(c.GPU, x.GPU) {
					l++
				}
				if t.topo.sameNUMA(c.GPU, x.GPU) {
					n++
				}
			}
			if l > bl || (l == bl && n > bn) {
				bi, bl, bn = i, l, n
			}
		}
		chosen = append(chosen, cands[bi])
		cands = slices.Delete(cands, bi, bi+1)
	}
	return chosen
}

func (t *deviceTable) score(ds []*Device) [2]int {
	var s [2]int
	for i := range ds {
		for j := i + 1; j < len(ds); j++ {
			if t.topo.linked(ds[i].GPU, ds[j].GPU) {
				s[0]++
			}
			if t.topo.sameNUMA(ds[i].GPU, ds[j].GPU) {
				s[1]++
			}
		}
	}
	return s
}

// pickByParent chooses shared devices or MIG devices by the policy: each pick takes the next device
// of the parent (GPU, or MIG device for its replicas) with the fewest (distributed) or most (packed)
// devices in use or already picked. Devices in use are those of the table the kubelet did not list
// as available. mark is preferred's (1: available, 2: required), must the required positions; a
// parent's free devices are taken in table order, walking the table's precomputed members.
func (t *deviceTable) pickByParent(mark []uint8, must []int, size int) []int {
	n := len(t.total)
	// One allocation for the three per-parent counters: free devices, load, and the walk's cursor.
	buf := make([]int, 3*n)
	free, load, next := buf[:n], buf[n:2*n], buf[2*n:]
	for i, m := range mark {
		if m == 1 {
			free[t.parent[i]]++
		}
	}
	for p := range n {
		load[p] = t.total[p] - free[p]
	}
	picked := append(make([]int, 0, size), must...)
	for _, i := range must {
		load[t.parent[i]]++
	}
	for len(picked) < size {
		best := -1
		for p := range n {
			if free[p] == 0 {
				continue
			}
			switch {
			case best < 0:
				best = p
			case t.policy == Packed && load[p] > load[best]:
				best = p
			case t.policy != Packed && load[p] < load[best]:
				best = p
			}
		}
		if best < 0 {
			break
		}
		ms := t.members[best]
		k := next[best]
		for mark[ms[k]] != 1 {
			k++
		}
		picked = append(picked, ms[k])
		next[best] = k + 1
		free[best]--
		load[best]++
	}
	return picked
}
