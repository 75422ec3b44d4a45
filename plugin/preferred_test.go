package plugin_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/plugin"
)

// A node whose NVLinks are pairs (and GPU 0 also linked to GPU 5), on two NUMA nodes (0-3, 4-7).
const pairsNode = `name: pairs
gpus:
  - {model: a100-sxm4-40gb, count: 8}
nvlink:
  pairs: [[0, 3], [1, 2], [4, 5], [6, 7], [0, 5]]
numaNodes: 2
`

func pairsEnv(t *testing.T) *env {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pairs.yaml")
	if err := os.WriteFile(path, []byte(pairsNode), 0o644); err != nil {
		t.Fatal(err)
	}
	return newEnv(t, "sim-file:"+path)
}

// Whole GPUs are preferred by NVLink, then NUMA node, from the topology read at start: no NVML
// call per request.
func TestPreferredWholeGPUsFollowNVLink(t *testing.T) {
	e := pairsEnv(t)
	e.start("version: v1\n")
	e.waitCount("nvidia.com/gpu", 8)
	u := e.uuids()
	ctx := ctxT(t, 10*time.Second)
	calls, _ := e.lib.Calls()
	cases := []struct {
		name        string
		avail, must []int
		size        int
		want        []int
	}{
		{"pair from all", []int{0, 1, 2, 3, 4, 5, 6, 7}, nil, 2, []int{0, 3}},
		{"pair from some", []int{1, 3, 4, 5, 6}, nil, 2, []int{4, 5}},
		{"must include", []int{0, 1, 2, 3, 4, 5, 6, 7}, []int{0}, 3, []int{0, 3, 5}},
		{"must include other", []int{1, 2, 3, 6, 7}, []int{6}, 2, []int{6, 7}},
		{"no links left: same NUMA", []int{0, 1, 4, 6}, nil, 2, []int{0, 1}},
		{"everything", []int{2, 5}, nil, 2, []int{2, 5}},
	}
	for _, tc := range cases {
		var avail, must []string
		for _, i := range tc.avail {
			avail = append(avail, u[i])
		}
		for _, i := range tc.must {
			must = append(must, u[i])
		}
		avail = append(avail, "GPU-unknown") // ignored
		got, err := e.kubelet.Preferred(ctx, "nvidia.com/gpu", avail, must, tc.size)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		var want []string
		for _, i := range tc.want {
			want = append(want, u[i])
		}
		if !slices.Equal(sorted(got), sorted(want)) {
			t.Errorf("%s: got %v, want GPUs %v", tc.name, got, tc.want)
		}
	}
	if after, names := e.lib.Calls(); after != calls {
		t.Errorf("preferred allocation made %d NVML calls: %s", after-calls, names)
	}
}

func gpuOf(id string, uuids []string) int {
	for i, u := range uuids {
		if strings.HasPrefix(id, u) {
			return i
		}
	}
	return -1
}

// Replicas are spread over the least used GPUs (distributed, the default) or packed onto the most
// used ones.
func TestPreferredReplicas(t *testing.T) {
	const ts4 = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
	for _, policy := range []plugin.Policy{plugin.Distributed, plugin.Packed} {
		t.Run(string(policy), func(t *testing.T) {
			e := newEnv(t, "dgx-h100")
			e.start(ts4, plugin.WithPolicies(policy, plugin.Packed))
			s := e.waitCount("nvidia.com/gpu", 32)
			u := e.uuids()
			ctx := ctxT(t, 10*time.Second)
			// GPU 0 has two replicas in use and GPU 2 one.
			used := []string{u[0] + "::0", u[0] + "::1", u[2] + "::0"}
			var avail []string
			for _, id := range s.IDs() {
				if !slices.Contains(used, id) {
					avail = append(avail, id)
				}
			}
			got, err := e.kubelet.Preferred(ctx, "nvidia.com/gpu", avail, nil, 1)
			if err != nil {
				t.Fatal(err)
			}
			want := map[plugin.Policy]int{plugin.Distributed: 1, plugin.Packed: 0}[policy]
			if len(got) != 1 || gpuOf(got[0], u) != want {
				t.Errorf("one replica: %v, want one of GPU %d", got, want)
			}
			got, err = e.kubelet.Preferred(ctx, "nvidia.com/gpu", avail, nil, 4)
			if err != nil {
				t.Fatal(err)
			}
			gpus := map[int]int{}
			for _, id := range got {
				gpus[gpuOf(id, u)]++
			}
			switch policy {
			case plugin.Distributed:
				// GPUs 1, 3, 4, 5 are unused; one replica from each.
				if len(gpus) != 4 || gpus[0] != 0 || gpus[2] != 0 {
					t.Errorf("distributed 4: %v (per GPU %v)", got, gpus)
				}
			case plugin.Packed:
				// GPU 0's two free replicas, then GPU 2's.
				if gpus[0] != 2 || gpus[2] != 2 {
					t.Errorf("packed 4: %v (per GPU %v)", got, gpus)
				}
			}
		})
	}
}

// MIG devices are packed by default: a GPU with devices in use is filled before an untouched one.
func TestPreferredMIGPacked(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.migLayout(map[int]map[string]int{0: {"1g.10gb": 7}, 1: {"1g.10gb": 7}})
	e.start("version: v1\nflags: {migStrategy: mixed}\n")
	s := e.waitCount("nvidia.com/mig-1g.10gb", 14)
	devs1, _ := e.lib.MigDevices(1)
	used := map[string]bool{devs1[0].UUID: true, devs1[1].UUID: true}
	var avail []string
	for _, id := range s.IDs() {
		if !used[id] {
			avail = append(avail, id)
		}
	}
	got, err := e.kubelet.Preferred(ctxT(t, 10*time.Second), "nvidia.com/mig-1g.10gb", avail, nil, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range got {
		if !slices.ContainsFunc(devs1, func(d nvmlib.MigDevice) bool { return d.UUID == id }) {
			t.Errorf("packed MIG: %s is not on GPU 1 (%v)", id, got)
		}
	}
}

// Over the socket, a request the plugin's own decoder declines (an unknown field, as a newer
// kubelet might send) is answered as the protobuf codec would decode it.
func TestPreferredUnknownFieldOverSocket(t *testing.T) {
	e := newEnv(t, "dgx-h100")
	e.start("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n")
	s := e.waitCount("nvidia.com/gpu", 32)
	c, err := e.kubelet.Client("nvidia.com/gpu")
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 10*time.Second)
	plain := func() *pluginapi.PreferredAllocationRequest {
		return &pluginapi.PreferredAllocationRequest{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{
			{AvailableDeviceIDs: s.IDs()[3:], MustIncludeDeviceIDs: s.IDs()[5:6], AllocationSize: 3}, {AvailableDeviceIDs: s.IDs(), AllocationSize: 2}}}
	}
	want, err := c.GetPreferredAllocation(ctx, plain())
	if err != nil {
		t.Fatal(err)
	}
	if len(want.ContainerResponses) != 2 || len(want.ContainerResponses[0].DeviceIDs) != 3 || want.ContainerResponses[0].DeviceIDs[0] != s.IDs()[5] {
		t.Fatalf("answer %v: want 3 devices starting with the required %s, then 2", want, s.IDs()[5])
	}
	req := plain()
	cr := req.ContainerRequests[0].ProtoReflect()
	cr.SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 42, protowire.VarintType), 7))
	got, err := c.GetPreferredAllocation(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Errorf("with an unknown field: %v, want %v", got, want)
	}
}
