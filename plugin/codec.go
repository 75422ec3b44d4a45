package plugin

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// serverCodec is the device plugin servers' codec: gRPC's protobuf codec, except for
// GetPreferredAllocation's request, which preferredHandler has decoded into a preferredWire.
//
// The kubelet sends every available device ID in that request (800 IDs, 37 KB, for 8 GPUs with 100
// replicas each). gRPC's protobuf codec would copy a request that arrived in several frames into a
// buffer from gRPC's default pool, whose tier above 32 KB is 1 MB and is zeroed on every Get (a
// megabyte cleared per call), then allocate every ID as a string of its own, and the handler would
// look each string up in the table. Here the request is copied into a reused scratch buffer and
// each ID's bytes are looked up in the table directly: no string, no list of them, one lookup per
// ID. Anything decodePreferred does not expect goes to proto.Unmarshal and the ordinary handler, so
// the answer, errors included, is what the protobuf codec and GetPreferredAllocation give.
type serverCodec struct {
	proto encoding.CodecV2
}

func newServerCodec() (serverCodec, error) {
	c := encoding.GetCodecV2(grpcproto.Name)
	if c == nil {
		return serverCodec{}, fmt.Errorf("gRPC codec %q is not registered", grpcproto.Name)
	}
	return serverCodec{proto: c}, nil
}

func (c serverCodec) Name() string { return grpcproto.Name }

func (c serverCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c serverCodec) Unmarshal(data mem.BufferSlice, v any) error {
	w, ok := v.(*preferredWire)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	if len(data) == 1 {
		return w.decode(data[0].ReadOnlyData())
	}
	n := data.Len()
	bp := scratch.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, n)
	}
	b := (*bp)[:n]
	data.CopyTo(b)
	err := w.decode(b)
	if cap(b) <= maxScratch {
		scratch.Put(bp)
	}
	return err
}

// scratch holds the buffers requests are copied into: nothing decoded from them refers to them.
var scratch = sync.Pool{New: func() any { return new([]byte) }}

// maxScratch is the largest buffer kept for reuse (the kubelet's 800-device requests are 37 KB).
const maxScratch = 1 << 20

// preferredWire is a GetPreferredAllocation request decoded against table: each container's
// selection and allocation size, or, when decodePreferred could not, the request as
// proto.Unmarshal decodes it.
type preferredWire struct {
	table      *deviceTable
	containers []preferredContainer
	req        *pluginapi.PreferredAllocationRequest
}

type preferredContainer struct {
	sel  selection
	size int
}

// decode decodes wire, keeping no reference to it.
func (w *preferredWire) decode(wire []byte) error {
	if w.decodePreferred(wire) {
		return nil
	}
	w.containers = nil
	w.req = &pluginapi.PreferredAllocationRequest{}
	if err := proto.Unmarshal(wire, w.req); err != nil {
		return fmt.Errorf("decoding the preferred allocation request: %w", err)
	}
	return nil
}

// The request's field numbers (api.proto).
const (
	fieldContainerRequests protowire.Number = 1 // PreferredAllocationRequest.container_requests
	fieldAvailable         protowire.Number = 1 // ContainerPreferredAllocationRequest.available_deviceIDs
	fieldMustInclude       protowire.Number = 2 // ContainerPreferredAllocationRequest.must_include_deviceIDs
	fieldAllocationSize    protowire.Number = 3 // ContainerPreferredAllocationRequest.allocation_size
)

// decodePreferred decodes wire into w.containers and reports whether it could: it accepts only the
// request's own fields with their own wire types and UTF-8 IDs (proto.Unmarshal rejects others),
// and leaves anything else (unknown fields, malformed input) to proto.Unmarshal.
func (w *preferredWire) decodePreferred(wire []byte) bool {
	w.containers = w.containers[:0]
	for len(wire) > 0 {
		num, typ, n := protowire.ConsumeTag(wire)
		if n < 0 || num != fieldContainerRequests || typ != protowire.BytesType {
			return false
		}
		msg, m := protowire.ConsumeBytes(wire[n:])
		if m < 0 {
			return false
		}
		c, ok := w.table.decodeContainer(msg)
		if !ok {
			return false
		}
		w.containers = append(w.containers, c)
		wire = wire[n+m:]
	}
	return true
}

// decodeContainer resolves one ContainerPreferredAllocationRequest's IDs against the table, as
// preferred does with strings: unknown IDs are skipped (after the UTF-8 check proto.Unmarshal
// would make), the last allocation size wins as in protobuf.
func (t *deviceTable) decodeContainer(msg []byte) (preferredContainer, bool) {
	c := preferredContainer{sel: t.newSelection(0)}
	var size uint64
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return c, false
		}
		msg = msg[n:]
		switch {
		case (num == fieldAvailable || num == fieldMustInclude) && typ == protowire.BytesType:
			id, m := protowire.ConsumeBytes(msg)
			if m < 0 {
				return c, false
			}
			msg = msg[m:]
			i, known := t.pos[string(id)]
			if (!known || !t.utf8IDs) && !utf8.Valid(id) {
				return c, false
			}
			switch {
			case !known:
			case num == fieldMustInclude:
				c.sel.require(i)
			default:
				c.sel.offer(i)
			}
		case num == fieldAllocationSize && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(msg)
			if m < 0 {
				return c, false
			}
			size = v
			msg = msg[m:]
		default:
			return c, false
		}
	}
	c.size = int(int32(size))
	return c, true
}

// preferredHandler is GetPreferredAllocation's gRPC method handler: gen, the generated one,
// replaced for requests decodePreferred decodes (there is no interceptor on the plugin's servers).
func (r *resourceServer) preferredHandler(gen grpc.MethodHandler) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		if interceptor != nil {
			return gen(srv, ctx, dec, interceptor)
		}
		w := &preferredWire{table: r.table.Load()}
		if err := dec(w); err != nil {
			return nil, err
		}
		if w.req != nil {
			return r.GetPreferredAllocation(ctx, w.req)
		}
		resp := &pluginapi.PreferredAllocationResponse{ContainerResponses: make([]*pluginapi.ContainerPreferredAllocationResponse, len(w.containers))}
		for i := range w.containers {
			c := &w.containers[i]
			resp.ContainerResponses[i] = &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: w.table.pick(&c.sel, c.size)}
		}
		r.stats.preferred.Add(1)
		return resp, nil
	}
}

// devicePluginService is the DevicePlugin service description with preferredHandler for
// GetPreferredAllocation.
func (r *resourceServer) devicePluginService() *grpc.ServiceDesc {
	desc := pluginapi.DevicePlugin_ServiceDesc
	desc.Methods = slices.Clone(desc.Methods)
	for i, m := range desc.Methods {
		if m.MethodName == "GetPreferredAllocation" {
			desc.Methods[i].Handler = r.preferredHandler(m.Handler)
		}
	}
	return &desc
}
