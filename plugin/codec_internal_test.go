package plugin

import (
	"math/rand/v2"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// viaProto is what the generated handler answers: proto.Unmarshal, then preferred per container.
func viaProto(tab *deviceTable, wire []byte) ([][]string, error) {
	var req pluginapi.PreferredAllocationRequest
	if err := proto.Unmarshal(wire, &req); err != nil {
		return nil, err
	}
	var out [][]string
	for _, cr := range req.ContainerRequests {
		out = append(out, tab.preferred(cr.AvailableDeviceIDs, cr.MustIncludeDeviceIDs, int(cr.AllocationSize)))
	}
	return out, nil
}

// viaWire is what preferredHandler answers; fast reports whether decodePreferred took the request.
func viaWire(tab *deviceTable, wire []byte) (out [][]string, fast bool, err error) {
	w := &preferredWire{table: tab}
	if err := w.decode(wire); err != nil {
		return nil, false, err
	}
	if w.req != nil {
		for _, cr := range w.req.ContainerRequests {
			out = append(out, tab.preferred(cr.AvailableDeviceIDs, cr.MustIncludeDeviceIDs, int(cr.AllocationSize)))
		}
		return out, false, nil
	}
	for i := range w.containers {
		out = append(out, tab.pick(&w.containers[i].sel, w.containers[i].size))
	}
	return out, true, nil
}

func sameAnswers(t *testing.T, tab *deviceTable, wire []byte, wantFast bool) {
	t.Helper()
	want, werr := viaProto(tab, wire)
	got, fast, gerr := viaWire(tab, wire)
	if (werr != nil) != (gerr != nil) {
		t.Fatalf("errors differ: proto %v, wire %v", werr, gerr)
	}
	if fast != wantFast {
		t.Fatalf("decoded by decodePreferred: %v, want %v", fast, wantFast)
	}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// Decoding the wire against the table picks what proto.Unmarshal and preferred pick, for random
// requests (duplicates, unknown IDs, required devices also available, several containers, sizes
// from -1 up) on replicas, MIG devices and whole GPUs.
func TestDecodePreferredMatchesProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	tables := []*deviceTable{
		replicaTable(8, 14, false, Distributed), replicaTable(8, 14, false, Packed),
		replicaTable(8, 14, true, Distributed), replicaTable(8, 1, false, Distributed),
	}
	for _, tab := range tables {
		ids := tab.ids()
		for range 2000 {
			req := &pluginapi.PreferredAllocationRequest{}
			for range 1 + rng.IntN(2) {
				cr := &pluginapi.ContainerPreferredAllocationRequest{AllocationSize: int32(rng.IntN(14) - 1)}
				for _, id := range ids {
					if rng.IntN(3) > 0 {
						cr.AvailableDeviceIDs = append(cr.AvailableDeviceIDs, id)
					}
				}
				rng.Shuffle(len(cr.AvailableDeviceIDs), func(i, j int) {
					cr.AvailableDeviceIDs[i], cr.AvailableDeviceIDs[j] = cr.AvailableDeviceIDs[j], cr.AvailableDeviceIDs[i]
				})
				for range rng.IntN(4) {
					cr.MustIncludeDeviceIDs = append(cr.MustIncludeDeviceIDs, ids[rng.IntN(len(ids))])
				}
				if rng.IntN(5) == 0 {
					cr.AvailableDeviceIDs = append(cr.AvailableDeviceIDs, "unknown", ids[0], "")
					cr.MustIncludeDeviceIDs = append(cr.MustIncludeDeviceIDs, "unknown-too")
				}
				req.ContainerRequests = append(req.ContainerRequests, cr)
			}
			wire, err := proto.Marshal(req)
			if err != nil {
				t.Fatal(err)
			}
			sameAnswers(t, tab, wire, true)
		}
	}
}

// Hand-made wire forms: fields interleaved or repeated, and what decodePreferred leaves to
// proto.Unmarshal (unknown fields, wrong wire types, invalid UTF-8, truncation), which must give the
// same answer or the same failure.
func TestDecodePreferredEdgeCases(t *testing.T) {
	tab := replicaTable(2, 3, false, Distributed)
	ids := tab.ids()
	str := func(b []byte, n protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(b, n, protowire.BytesType), s)
	}
	vint := func(b []byte, n protowire.Number, v uint64) []byte {
		return protowire.AppendVarint(protowire.AppendTag(b, n, protowire.VarintType), v)
	}
	container := func(c []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), c)
	}
	var c []byte
	c = vint(c, 3, 1)
	c = str(c, 1, ids[0])
	c = str(c, 2, ids[4])
	c = str(c, 1, ids[3])
	c = vint(c, 3, 2) // the last size wins
	c = str(c, 2, ids[4])
	interleaved := container(c)
	cases := []struct {
		name string
		wire []byte
		fast bool
	}{
		{"empty request", nil, true},
		{"empty container", container(nil), true},
		{"interleaved and repeated fields", interleaved, true},
		{"two containers", append(slices.Clone(interleaved), container(str(vint(nil, 3, 1), 1, ids[5]))...), true},
		{"size overflowing int32", container(str(vint(nil, 3, 1<<32+2), 1, ids[1])), true},
		{"negative size", container(str(vint(nil, 3, uint64(1<<64-1)), 1, ids[1])), true},
		{"non-minimal varint", container(append(str(nil, 1, ids[2]), 3<<3, 0x82, 0x00)), true},
		{"unknown field in container", container(vint(str(vint(nil, 3, 1), 1, ids[0]), 9, 7)), false},
		{"unknown top-level field", append(vint(nil, 5, 1), container(str(vint(nil, 3, 1), 1, ids[0]))...), false},
		{"size as bytes", container(str(str(nil, 3, "x"), 1, ids[0])), false},
		{"ID as varint", container(vint(vint(nil, 3, 1), 1, 5)), false},
		{"invalid UTF-8 unknown ID", container(str(vint(nil, 3, 1), 1, "\xff\xfe")), false},
		{"invalid UTF-8 required ID", container(str(vint(nil, 3, 1), 2, "a\xc3")), false},
		{"truncated ID", container(str(vint(nil, 3, 1), 1, ids[0]))[:20], false},
		{"truncated container", interleaved[:len(interleaved)-3], false},
		{"overlong varint", container(append(vint(nil, 3, 1), 1<<3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f)), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { sameAnswers(t, tab, tc.wire, tc.fast) })
	}
}

// An ID the table knows but that is not UTF-8 still fails as proto.Unmarshal fails.
func TestDecodePreferredInvalidUTF8TableID(t *testing.T) {
	tab := newDeviceTable("nvidia.com/gpu", []*Device{{ID: "GPU-\xff", Resource: "nvidia.com/gpu", GPU: 0, GPUUUID: "GPU-\xff", Replica: 0},
		{ID: "GPU-\xff::1", Resource: "nvidia.com/gpu", GPU: 0, GPUUUID: "GPU-\xff", Replica: 1}}, nil, response{}, Distributed, Distributed, nil)
	if tab.utf8IDs {
		t.Fatal("table with a non-UTF-8 ID says its IDs are UTF-8")
	}
	wire := protowire.AppendTag(nil, 1, protowire.BytesType)
	wire = protowire.AppendBytes(wire, protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "GPU-\xff"))
	if _, _, err := viaWire(tab, wire); err == nil {
		t.Fatal("a request with an invalid UTF-8 ID decoded")
	}
}

// FuzzDecodePreferred: for any bytes, decodePreferred either declines or answers as proto.Unmarshal
// and preferred do; it never accepts what proto.Unmarshal rejects.
func FuzzDecodePreferred(f *testing.F) {
	tab := replicaTable(2, 3, false, Packed)
	ids := tab.ids()
	for _, req := range []*pluginapi.PreferredAllocationRequest{
		{},
		{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: ids, AllocationSize: 2}}},
		{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: ids[:3], MustIncludeDeviceIDs: ids[4:], AllocationSize: 3}, {}}},
	} {
		wire, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(wire)
	}
	f.Add([]byte{0x0a, 0x03, 0x0a, 0x01, 0xff})
	f.Fuzz(func(t *testing.T, wire []byte) {
		want, werr := viaProto(tab, wire)
		got, fast, gerr := viaWire(tab, wire)
		if (werr != nil) != (gerr != nil) {
			t.Fatalf("errors differ: proto %v, wire %v", werr, gerr)
		}
		if fast && werr != nil {
			t.Fatalf("decodePreferred accepted what proto.Unmarshal rejects: %v", werr)
		}
		if !slices.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("got %v, want %v", got, want)
		}
	})
}
