package plugin

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// prePrecomputePickByParent is pickByParent as it was before the table kept each parent's members
// (per-request lists of each parent's free devices): the reference the current one must agree with,
// and the same-run baseline of BenchmarkPreferredTable.
func (t *deviceTable) prePrecomputePickByParent(must, avail []int, size int) []int {
	n := len(t.total)
	free := make([][]int, n)
	for _, i := range avail {
		p := t.parent[i]
		free[p] = append(free[p], i)
	}
	load := make([]int, n)
	for p := range n {
		load[p] = t.total[p] - len(free[p])
	}
	picked := append(make([]int, 0, size), must...)
	for _, i := range must {
		load[t.parent[i]]++
	}
	for len(picked) < size {
		best := -1
		for p := range n {
			if len(free[p]) == 0 {
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
		picked = append(picked, free[best][0])
		free[best] = free[best][1:]
		load[best]++
	}
	return picked
}

// prePrecomputePreferred is preferred before the change, for shared and MIG devices.
func (t *deviceTable) prePrecomputePreferred(available, mustInclude []string, size int) []string {
	if size <= 0 {
		return nil
	}
	mark := make([]uint8, len(t.devices))
	must := make([]int, 0, len(mustInclude))
	for _, id := range mustInclude {
		if i, ok := t.pos[id]; ok && mark[i] == 0 {
			mark[i] = 2
			must = append(must, i)
		}
	}
	if len(must) >= size {
		return t.idsAt(must[:size])
	}
	nAvail := 0
	for _, id := range available {
		if i, ok := t.pos[id]; ok && mark[i] == 0 {
			mark[i] = 1
			nAvail++
		}
	}
	avail := make([]int, 0, nAvail)
	for i, m := range mark {
		if m == 1 {
			avail = append(avail, i)
		}
	}
	if t.wholeOnly {
		return idsOf(t.pickConnected(t.devicesAt(must), t.devicesAt(avail), size))
	}
	return t.idsAt(t.prePrecomputePickByParent(must, avail, size))
}

// replicaTable is 8 GPUs with replicas time-sliced replicas each, or MIG devices with replicas each.
func replicaTable(gpus, replicas int, mig bool, policy Policy) *deviceTable {
	var devs []*Device
	for g := range gpus {
		uuid := fmt.Sprintf("GPU-%08x-1111-2222-3333-444455556666", g)
		for r := range replicas {
			d := &Device{ID: fmt.Sprintf("%s::%d", uuid, r), Resource: "nvidia.com/gpu", GPU: g, GPUUUID: uuid, Replica: r}
			if mig {
				gi := r % 7
				d.MIG = &nvmlib.MigDevice{UUID: fmt.Sprintf("MIG-%08x-%d", g, gi), GI: gi}
				d.ID = fmt.Sprintf("%s::%d", d.MIG.UUID, r)
			}
			devs = append(devs, d)
		}
	}
	return newDeviceTable("nvidia.com/gpu", devs, nil, response{}, policy, policy, nil)
}

// The precomputed walk picks exactly what the per-request lists picked, for random availability,
// required devices, sizes and both policies, on replicas of GPUs and of MIG devices.
func TestPreferredMatchesPerRequestLists(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, mig := range []bool{false, true} {
		for _, policy := range []Policy{Distributed, Packed} {
			tab := replicaTable(8, 14, mig, policy)
			ids := tab.ids()
			for range 2000 {
				var avail, must []string
				for _, id := range ids {
					if rng.IntN(3) > 0 {
						avail = append(avail, id)
					}
				}
				rng.Shuffle(len(avail), func(i, j int) { avail[i], avail[j] = avail[j], avail[i] })
				for range rng.IntN(3) {
					if len(avail) > 0 {
						must = append(must, avail[rng.IntN(len(avail))])
					}
				}
				if rng.IntN(10) == 0 {
					avail = append(avail, "unknown", avail[0])
				}
				size := rng.IntN(12)
				want := tab.prePrecomputePreferred(avail, must, size)
				if got := tab.preferred(avail, must, size); !slices.Equal(got, want) {
					t.Fatalf("mig=%v %s size %d must %v: got %v, want %v", mig, policy, size, must, got, want)
				}
			}
		}
	}
}

// BenchmarkPreferredTable is preferred alone (no gRPC) at 800 time-sliced replicas, beside the
// per-request-lists version it replaced.
func BenchmarkPreferredTable(b *testing.B) {
	tab := replicaTable(8, 100, false, Distributed)
	ids := tab.ids()
	for _, c := range []struct {
		name string
		f    func([]string, []string, int) []string
	}{{"current", tab.preferred}, {"per-request-lists", tab.prePrecomputePreferred}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c.f(ids, nil, 1)
			}
		})
	}
}
