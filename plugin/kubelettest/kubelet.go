// Package kubelettest is an in-process stand-in for the kubelet's side of the device plugin API,
// over real gRPC on unix sockets: it serves Registration on <dir>/kubelet.sock, dials each plugin
// that registers, reads its options and follows its ListAndWatch stream as the kubelet's device
// manager does, and calls Allocate and GetPreferredAllocation for tests. It also serves the
// PodResources API (v1 List) with the devices it allocated, and can restart the way a kubelet
// does: every socket in the directory removed, then a new kubelet.sock.
package kubelettest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// Kubelet is the stand-in.
type Kubelet struct {
	dir string

	mu        sync.Mutex
	reg       *grpc.Server
	resources map[string]*Resource
	allocated map[string]map[string]bool
	changed   chan struct{}
	pr        *grpc.Server
	prSocket  string
}

// Resource is what the stand-in knows of one registered resource.
type Resource struct {
	Name     string
	Endpoint string
	Options  *pluginapi.DevicePluginOptions
	// Devices is the last list ListAndWatch sent.
	Devices []*pluginapi.Device
	// Lists counts the lists received; Registrations the registrations.
	Lists, Registrations int
	// LastListBytes is the encoded size of the last list.
	LastListBytes int
	// Connected is false once the plugin's stream ended.
	Connected bool

	conn   *grpc.ClientConn
	client pluginapi.DevicePluginClient
	cancel context.CancelFunc
}

// Start serves Registration on <dir>/kubelet.sock.
func Start(dir string) (*Kubelet, error) {
	k := &Kubelet{dir: dir, resources: map[string]*Resource{}, allocated: map[string]map[string]bool{}, changed: make(chan struct{})}
	if err := k.listen(); err != nil {
		return nil, err
	}
	return k, nil
}

// Dir is the device plugin directory.
func (k *Kubelet) Dir() string { return k.dir }

// Socket is kubelet.sock's path.
func (k *Kubelet) Socket() string { return filepath.Join(k.dir, "kubelet.sock") }

func (k *Kubelet) listen() error {
	_ = os.Remove(k.Socket())
	lis, err := net.Listen("unix", k.Socket())
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	pluginapi.RegisterRegistrationServer(srv, &registration{k: k})
	go func() { _ = srv.Serve(lis) }()
	k.mu.Lock()
	k.reg = srv
	k.mu.Unlock()
	return nil
}

type registration struct {
	pluginapi.UnimplementedRegistrationServer
	k *Kubelet
}

// Register dials the plugin back, reads its options and starts following its ListAndWatch stream.
func (r *registration) Register(ctx context.Context, req *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	k := r.k
	if req.Version != pluginapi.Version {
		return nil, fmt.Errorf("unsupported version %q", req.Version)
	}
	conn, err := grpc.NewClient("unix://"+filepath.Join(k.dir, req.Endpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	client := pluginapi.NewDevicePluginClient(conn)
	octx, cancel := context.WithTimeout(ctx, 10*time.Second)
	opts, err := client.GetDevicePluginOptions(octx, &pluginapi.Empty{})
	cancel()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("GetDevicePluginOptions of %s: %w", req.ResourceName, err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	stream, err := client.ListAndWatch(sctx, &pluginapi.Empty{})
	if err != nil {
		scancel()
		conn.Close()
		return nil, fmt.Errorf("ListAndWatch of %s: %w", req.ResourceName, err)
	}
	k.mu.Lock()
	old := k.resources[req.ResourceName]
	res := &Resource{Name: req.ResourceName, Endpoint: req.Endpoint, Options: opts, conn: conn, client: client, cancel: scancel, Connected: true}
	if old != nil {
		res.Registrations, res.Lists, res.Devices = old.Registrations, old.Lists, old.Devices
		old.cancel()
		old.conn.Close()
	}
	res.Registrations++
	k.resources[req.ResourceName] = res
	k.signalLocked()
	k.mu.Unlock()
	go func() {
		for {
			msg, err := stream.Recv()
			k.mu.Lock()
			if err != nil {
				if k.resources[req.ResourceName] == res {
					res.Connected = false
					k.signalLocked()
				}
				k.mu.Unlock()
				return
			}
			if k.resources[req.ResourceName] == res {
				res.Devices = msg.Devices
				res.Lists++
				res.LastListBytes = proto.Size(msg)
				k.signalLocked()
			}
			k.mu.Unlock()
		}
	}()
	return &pluginapi.Empty{}, nil
}

func (k *Kubelet) signalLocked() {
	close(k.changed)
	k.changed = make(chan struct{})
}

// Snapshot is a copy of a resource's state.
type Snapshot struct {
	Name          string
	Devices       []*pluginapi.Device
	Options       *pluginapi.DevicePluginOptions
	Lists         int
	Registrations int
	LastListBytes int
	Connected     bool
}

// IDs lists the device IDs.
func (s Snapshot) IDs() []string {
	out := make([]string, len(s.Devices))
	for i, d := range s.Devices {
		out[i] = d.ID
	}
	return out
}

// Healthy lists the healthy device IDs.
func (s Snapshot) Healthy() []string {
	var out []string
	for _, d := range s.Devices {
		if d.Health == pluginapi.Healthy {
			out = append(out, d.ID)
		}
	}
	return out
}

// Resource returns a copy of a resource's state, false if it never registered.
func (k *Kubelet) Resource(name string) (Snapshot, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	r, ok := k.resources[name]
	if !ok {
		return Snapshot{}, false
	}
	return Snapshot{Name: r.Name, Devices: slices.Clone(r.Devices), Options: r.Options, Lists: r.Lists,
		Registrations: r.Registrations, LastListBytes: r.LastListBytes, Connected: r.Connected}, true
}

// Resources lists the registered resources' names, sorted.
func (k *Kubelet) Resources() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Sorted(maps.Keys(k.resources))
}

// Connected lists the resources whose plugin stream is up, with their device IDs.
func (k *Kubelet) Connected() map[string][]string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := map[string][]string{}
	for n, r := range k.resources {
		if r.Connected {
			ids := make([]string, len(r.Devices))
			for i, d := range r.Devices {
				ids[i] = d.ID
			}
			out[n] = ids
		}
	}
	return out
}

// WaitFor waits until cond holds for the stand-in's state, or ctx ends. It is woken by every
// registration and list; it never sleeps as an assertion.
func (k *Kubelet) WaitFor(ctx context.Context, cond func(k *Kubelet) bool) error {
	for {
		k.mu.Lock()
		ch := k.changed
		k.mu.Unlock()
		if cond(k) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitForResource waits until the resource's state satisfies cond.
func (k *Kubelet) WaitForResource(ctx context.Context, name string, cond func(Snapshot) bool) (Snapshot, error) {
	var last Snapshot
	err := k.WaitFor(ctx, func(k *Kubelet) bool {
		s, ok := k.Resource(name)
		last = s
		return ok && s.Connected && cond(s)
	})
	if err != nil {
		return last, fmt.Errorf("resource %s: %w (last seen: %d devices, %d healthy, connected %v)", name, err, len(last.Devices), len(last.Healthy()), last.Connected)
	}
	return last, nil
}

// Client returns a device plugin client of a registered resource.
func (k *Kubelet) Client(name string) (pluginapi.DevicePluginClient, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	r, ok := k.resources[name]
	if !ok {
		return nil, fmt.Errorf("resource %s is not registered", name)
	}
	return r.client, nil
}

// Allocate asks for devices for one container and records them as in use (PodResources).
func (k *Kubelet) Allocate(ctx context.Context, name string, ids ...string) (*pluginapi.ContainerAllocateResponse, error) {
	c, err := k.Client(name)
	if err != nil {
		return nil, err
	}
	resp, err := c.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids}}})
	if err != nil {
		return nil, err
	}
	if len(resp.ContainerResponses) != 1 {
		return nil, fmt.Errorf("%d container responses for 1 container", len(resp.ContainerResponses))
	}
	k.mu.Lock()
	m := k.allocated[name]
	if m == nil {
		m = map[string]bool{}
		k.allocated[name] = m
	}
	for _, id := range ids {
		m[id] = true
	}
	k.mu.Unlock()
	return resp.ContainerResponses[0], nil
}

// Release ends the use of devices (their container is gone).
func (k *Kubelet) Release(name string, ids ...string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, id := range ids {
		delete(k.allocated[name], id)
	}
}

// Preferred asks for a preferred allocation for one container.
func (k *Kubelet) Preferred(ctx context.Context, name string, available, mustInclude []string, size int) ([]string, error) {
	c, err := k.Client(name)
	if err != nil {
		return nil, err
	}
	resp, err := c.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
		AvailableDeviceIDs: available, MustIncludeDeviceIDs: mustInclude, AllocationSize: int32(size)}}})
	if err != nil {
		return nil, err
	}
	if len(resp.ContainerResponses) != 1 {
		return nil, fmt.Errorf("%d container responses for 1 container", len(resp.ContainerResponses))
	}
	return resp.ContainerResponses[0].DeviceIDs, nil
}

// Restart restarts the stand-in as a kubelet restarts: Registration stops, every plugin stream is
// dropped, every socket in the directory is removed (the kubelet's device manager empties it), and
// a new kubelet.sock is served. Devices in use stay in use.
func (k *Kubelet) Restart() error {
	k.mu.Lock()
	k.reg.Stop()
	for _, r := range k.resources {
		r.cancel()
		r.conn.Close()
		r.Connected = false
	}
	k.signalLocked()
	k.mu.Unlock()
	entries, err := os.ReadDir(k.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			if err := os.Remove(filepath.Join(k.dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	return k.listen()
}

// ServePodResources serves the PodResources API's List on socket with the devices Allocate gave
// out and Release did not take back (one container per resource).
func (k *Kubelet) ServePodResources(socket string) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		return err
	}
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(srv, &podResources{k: k})
	go func() { _ = srv.Serve(lis) }()
	k.mu.Lock()
	k.pr, k.prSocket = srv, socket
	k.mu.Unlock()
	return nil
}

type podResources struct {
	podresourcesapi.UnimplementedPodResourcesListerServer
	k *Kubelet
}

func (p *podResources) List(context.Context, *podresourcesapi.ListPodResourcesRequest) (*podresourcesapi.ListPodResourcesResponse, error) {
	p.k.mu.Lock()
	defer p.k.mu.Unlock()
	pod := &podresourcesapi.PodResources{Name: "stand-in", Namespace: "default"}
	for _, name := range slices.Sorted(maps.Keys(p.k.allocated)) {
		ids := slices.Sorted(maps.Keys(p.k.allocated[name]))
		if len(ids) == 0 {
			continue
		}
		pod.Containers = append(pod.Containers, &podresourcesapi.ContainerResources{Name: "c-" + name,
			Devices: []*podresourcesapi.ContainerDevices{{ResourceName: name, DeviceIds: ids}}})
	}
	return &podresourcesapi.ListPodResourcesResponse{PodResources: []*podresourcesapi.PodResources{pod}}, nil
}

// Stop stops the stand-in and drops every stream.
func (k *Kubelet) Stop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reg.Stop()
	if k.pr != nil {
		k.pr.Stop()
	}
	for _, r := range k.resources {
		r.cancel()
		r.conn.Close()
	}
}
