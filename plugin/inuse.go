package plugin

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// InUse tells which devices containers hold: resource name → device IDs. The kubelet knows; the
// plugin never guesses.
type InUse interface {
	InUse(ctx context.Context) (map[string]map[string]bool, error)
}

// userLister is an InUse that also says who uses each device (PodResources does).
type userLister interface {
	Users(ctx context.Context) (map[string]map[string]string, error)
}

// DefaultPodResourcesSocket is where the kubelet serves its PodResources API.
const DefaultPodResourcesSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"

// PodResourcesSocketFor is the PodResources socket of a kubelet with the given root directory.
func PodResourcesSocketFor(kubeletRoot string) string {
	return filepath.Join(kubeletRoot, "pod-resources", "kubelet.sock")
}

// PodResources reads the devices in use from the kubelet's PodResources API (v1 List).
type PodResources struct {
	conn   *grpc.ClientConn
	client podresourcesapi.PodResourcesListerClient
	socket string
}

// NewPodResources returns a client of the kubelet's PodResources socket. The connection is made
// lazily, so the kubelet need not be up yet.
func NewPodResources(socket string) (*PodResources, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("pod resources socket %s: %w", socket, err)
	}
	return &PodResources{conn: conn, client: podresourcesapi.NewPodResourcesListerClient(conn), socket: socket}, nil
}

// InUse lists the devices of every container the kubelet knows.
func (p *PodResources) InUse(ctx context.Context) (map[string]map[string]bool, error) {
	users, err := p.Users(ctx)
	if err != nil {
		return nil, err
	}
	out := make(map[string]map[string]bool, len(users))
	for r, ids := range users {
		m := make(map[string]bool, len(ids))
		for id := range ids {
			m[id] = true
		}
		out[r] = m
	}
	return out, nil
}

// Users lists who uses each device: resource → device ID → "pod <namespace>/<name>".
func (p *PodResources) Users(ctx context.Context) (map[string]map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := p.client.List(ctx, &podresourcesapi.ListPodResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("listing pod resources at %s: %w", p.socket, err)
	}
	out := map[string]map[string]string{}
	for _, pod := range resp.PodResources {
		for _, c := range pod.Containers {
			for _, d := range c.Devices {
				m := out[d.ResourceName]
				if m == nil {
					m = map[string]string{}
					out[d.ResourceName] = m
				}
				for _, id := range d.DeviceIds {
					m[id] = "pod " + pod.Namespace + "/" + pod.Name
				}
			}
		}
	}
	return out, nil
}

// Close closes the connection.
func (p *PodResources) Close() error { return p.conn.Close() }
