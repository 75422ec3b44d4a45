package plugin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// resourceServer serves one extended resource to the kubelet on its own socket. Its devices are an
// immutable table swapped atomically, so Allocate, GetPreferredAllocation and ListAndWatch take no
// lock at all and never wait for a profile change, a health update or another resource.
type resourceServer struct {
	pluginapi.UnimplementedDevicePluginServer

	name   string
	socket string
	table  atomic.Pointer[deviceTable]
	stats  *resourceStats

	// mu guards the gRPC server's life cycle and the change channel; no RPC takes it except to
	// read the change channel.
	mu            sync.Mutex
	changed       chan struct{}
	srv           *grpc.Server
	done          chan struct{}
	sockID        fileID
	registeredTo  fileID
	registrations int
}

func newResourceServer(name, dir string, t *deviceTable) *resourceServer {
	r := &resourceServer{name: name, socket: filepath.Join(dir, socketName(name)), changed: make(chan struct{}),
		stats: &resourceStats{}}
	r.table.Store(t)
	return r
}

// socketName is the socket file of a resource: tessera-<domain>_<name>.sock.
func socketName(resource string) string {
	return "tessera-" + strings.ReplaceAll(resource, "/", "_") + ".sock"
}

// setTable publishes a new device table; ListAndWatch streams send it when notify is true.
func (r *resourceServer) setTable(t *deviceTable, notify bool) {
	r.table.Store(t)
	if notify {
		r.notify()
	}
}

// notify wakes every ListAndWatch stream to send the current list.
func (r *resourceServer) notify() {
	r.mu.Lock()
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

func (r *resourceServer) watch() (<-chan struct{}, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed, r.done
}

// serve (re)creates the socket and starts a gRPC server on it. A server already running is
// stopped first: its streams end and the kubelet reconnects after the next registration.
func (r *resourceServer) serve() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopLocked()
	if err := os.Remove(r.socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the old socket %s: %w", r.socket, err)
	}
	lis, err := net.Listen("unix", r.socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", r.socket, err)
	}
	id, _ := statID(r.socket)
	codec, err := newServerCodec()
	if err != nil {
		lis.Close()
		return fmt.Errorf("serving %s: %w", r.socket, err)
	}
	srv := grpc.NewServer(grpc.ForceServerCodecV2(codec))
	srv.RegisterService(r.devicePluginService(), r)
	go func() {
		if err := srv.Serve(lis); err != nil {
			klog.ErrorS(err, "Device plugin server stopped", "resource", r.name)
		}
	}()
	r.srv, r.done, r.sockID, r.registeredTo = srv, make(chan struct{}), id, fileID{}
	return nil
}

// socketOK reports whether the socket we listen on is still in place (the kubelet removes every
// socket in its directory when it starts).
func (r *resourceServer) socketOK() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.srv == nil {
		return false
	}
	id, err := statID(r.socket)
	return err == nil && id == r.sockID
}

// stop ends the gRPC server and removes the socket.
func (r *resourceServer) stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopLocked()
	if r.sockID != (fileID{}) {
		if id, err := statID(r.socket); err == nil && id == r.sockID {
			_ = os.Remove(r.socket)
		}
	}
}

func (r *resourceServer) stopLocked() {
	if r.srv == nil {
		return
	}
	close(r.done)
	r.srv.Stop()
	r.srv = nil
}

// register registers the resource with the kubelet behind kubeletSock, identified by id.
func (r *resourceServer) register(ctx context.Context, kubeletSock string, id fileID) error {
	conn, err := grpc.NewClient("unix://"+kubeletSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connecting to the kubelet at %s: %w", kubeletSock, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     filepath.Base(r.socket),
		ResourceName: r.name,
		Options:      options(),
	})
	if err != nil {
		return fmt.Errorf("registering %s with the kubelet: %w", r.name, err)
	}
	r.mu.Lock()
	r.registeredTo = id
	r.registrations++
	r.mu.Unlock()
	r.stats.registrations.Add(1)
	klog.InfoS("Registered with the kubelet", "resource", r.name, "endpoint", filepath.Base(r.socket), "devices", len(r.table.Load().devices))
	return nil
}

func (r *resourceServer) needsRegistration(kubelet fileID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.registeredTo != kubelet
}

func options() *pluginapi.DevicePluginOptions {
	return &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true}
}

// GetDevicePluginOptions implements the device plugin API.
func (r *resourceServer) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return options(), nil
}

// ListAndWatch sends the device list, then a new one whenever devices or their health change.
func (r *resourceServer) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	for {
		changed, done := r.watch()
		if err := s.Send(r.table.Load().list()); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-done:
			return nil
		case <-s.Context().Done():
			return nil
		}
	}
}

// Allocate answers with what each container needs for its devices. It reads the current table and
// the devices' precomputed answers: no NVML call, no API call, no lock.
func (r *resourceServer) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	defer r.stats.allocateLatency.since(time.Now())
	t := r.table.Load()
	resp := &pluginapi.AllocateResponse{ContainerResponses: make([]*pluginapi.ContainerAllocateResponse, 0, len(req.ContainerRequests))}
	for _, cr := range req.ContainerRequests {
		devs := make([]*Device, 0, len(cr.DevicesIds))
		shared := 0
		for _, id := range cr.DevicesIds {
			d, ok := t.byID[id]
			if !ok {
				r.stats.allocateErrors.Add(1)
				return nil, status.Errorf(codes.InvalidArgument, "%s: unknown device %q", r.name, id)
			}
			if d.Shared() && d.FailRequestsGreaterThanOne {
				shared++
			}
			devs = append(devs, d)
		}
		if shared > 1 {
			r.stats.allocateErrors.Add(1)
			return nil, status.Errorf(codes.InvalidArgument, "%s: a container asked for %d shared devices, but this resource gives at most one per container (failRequestsGreaterThanOne); ask for 1",
				r.name, len(cr.DevicesIds))
		}
		car, err := t.respond(devs)
		if err != nil {
			r.stats.allocateErrors.Add(1)
			return nil, status.Errorf(codes.Internal, "%s: %v", r.name, err)
		}
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	r.stats.allocations.Add(1)
	return resp, nil
}

// GetPreferredAllocation picks devices for each container from what is available, from the table
// alone (topology was read at start).
func (r *resourceServer) GetPreferredAllocation(_ context.Context, req *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	t := r.table.Load()
	resp := &pluginapi.PreferredAllocationResponse{ContainerResponses: make([]*pluginapi.ContainerPreferredAllocationResponse, 0, len(req.ContainerRequests))}
	for _, cr := range req.ContainerRequests {
		ids := t.preferred(cr.AvailableDeviceIDs, cr.MustIncludeDeviceIDs, int(cr.AllocationSize))
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: ids})
	}
	r.stats.preferred.Add(1)
	return resp, nil
}

// PreStartContainer is not used (GetDevicePluginOptions says so).
func (r *resourceServer) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

// fileID identifies a file: a kubelet.sock recreated by a restarted kubelet has a new one.
type fileID struct {
	dev, ino uint64
	ctime    int64
}

func statID(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{ino: uint64(fi.ModTime().UnixNano())}, nil
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, ctime: st.Ctim.Nano()}, nil
}

// resourceStats count what a resource served, for metrics.
type resourceStats struct {
	allocations, allocateErrors, preferred, registrations atomic.Int64
	allocateLatency                                       latencyHist
}
