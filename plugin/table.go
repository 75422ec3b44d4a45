package plugin

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"unicode/utf8"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/tessera-gpu/tessera/partitioning/mps"
)

// Device list strategies.
const (
	StrategyEnvvar         = "envvar"
	StrategyVolumeMounts   = "volume-mounts"
	StrategyCDIAnnotations = "cdi-annotations"
	StrategyCDICRI         = "cdi-cri"
)

// Values a container gets with the envvar and volume-mounts strategies, as NVIDIA's container
// runtime reads them.
const (
	VisibleDevicesEnv         = "NVIDIA_VISIBLE_DEVICES"
	VolumeMountsDeviceListDir = "/var/run/nvidia-container-devices"
)

// response is how devices reach containers: node-wide settings of the sharing profile.
type response struct {
	strategies      []string
	annotationKey   string
	passDeviceSpecs bool
}

// deviceExtras are a device's precomputed answer pieces.
type deviceExtras struct {
	cdiName string
	specs   []*pluginapi.DeviceSpec
	env     map[string]string
	mounts  []*pluginapi.Mount
}

// deviceTable is one resource's devices at one moment; it is never modified once published.
type deviceTable struct {
	resource string
	devices  []*Device
	byID     map[string]*Device
	extras   map[*Device]*deviceExtras
	resp     response
	policy   Policy
	// wholeOnly: every device is a whole, unshared GPU (topology-aware preferred allocation).
	wholeOnly bool
	// pos is each device's position in devices; parent its parent's number (GPU or shared device,
	// in order of first appearance) and total the devices per parent, for distributed and packed
	// allocation.
	pos    map[string]int
	parent []int
	total  []int
	// members are each parent's device positions in table order, for preferred allocation to walk
	// a parent's free devices without building per-request lists.
	members [][]int
	topo    *topology
	// utf8IDs: every device ID is valid UTF-8, so an ID of a request found in pos is too.
	utf8IDs bool
}

func newDeviceTable(resource string, devs []*Device, extras map[*Device]*deviceExtras, resp response, replicaPolicy, migPolicy Policy, topo *topology) *deviceTable {
	sortDevices(devs)
	t := &deviceTable{resource: resource, devices: devs, byID: make(map[string]*Device, len(devs)), extras: extras,
		resp: resp, wholeOnly: true, pos: make(map[string]int, len(devs)), parent: make([]int, len(devs)), topo: topo, policy: replicaPolicy,
		utf8IDs: true}
	anyShared := false
	parents := map[string]int{}
	for i, d := range devs {
		t.byID[d.ID] = d
		t.pos[d.ID] = i
		t.utf8IDs = t.utf8IDs && utf8.ValidString(d.ID)
		if d.Shared() || d.MIG != nil {
			t.wholeOnly = false
		}
		anyShared = anyShared || d.Shared()
		p, ok := parents[d.parent()]
		if !ok {
			p = len(parents)
			parents[d.parent()] = p
			t.total = append(t.total, 0)
		}
		t.parent[i] = p
		t.total[p]++
	}
	t.members = make([][]int, len(t.total))
	for p, n := range t.total {
		t.members[p] = make([]int, 0, n)
	}
	for i, p := range t.parent {
		t.members[p] = append(t.members[p], i)
	}
	if !anyShared && !t.wholeOnly {
		t.policy = migPolicy
	}
	return t
}

// ids lists the table's device IDs in order.
func (t *deviceTable) ids() []string {
	out := make([]string, len(t.devices))
	for i, d := range t.devices {
		out[i] = d.ID
	}
	return out
}

// list is the ListAndWatch message: every device with its health and NUMA node.
func (t *deviceTable) list() *pluginapi.ListAndWatchResponse {
	out := &pluginapi.ListAndWatchResponse{Devices: make([]*pluginapi.Device, len(t.devices))}
	for i, d := range t.devices {
		h := pluginapi.Healthy
		if !d.Healthy() {
			h = pluginapi.Unhealthy
		}
		pd := &pluginapi.Device{ID: d.ID, Health: h}
		if d.NUMA >= 0 {
			pd.Topology = &pluginapi.TopologyInfo{Nodes: []*pluginapi.NUMANode{{ID: int64(d.NUMA)}}}
		}
		out.Devices[i] = pd
	}
	return out
}

// respond builds one container's answer for its devices.
func (t *deviceTable) respond(devs []*Device) (*pluginapi.ContainerAllocateResponse, error) {
	car := &pluginapi.ContainerAllocateResponse{}
	cdiUsed := false
	for _, s := range t.resp.strategies {
		switch s {
		case StrategyCDICRI:
			cdiUsed = true
			for _, d := range devs {
				x := t.extras[d]
				if x == nil || x.cdiName == "" {
					return nil, fmt.Errorf("device %s has no CDI device", d.ID)
				}
				car.CdiDevices = append(car.CdiDevices, &pluginapi.CDIDevice{Name: x.cdiName})
			}
		case StrategyCDIAnnotations:
			cdiUsed = true
			names := make([]string, 0, len(devs))
			for _, d := range devs {
				x := t.extras[d]
				if x == nil || x.cdiName == "" {
					return nil, fmt.Errorf("device %s has no CDI device", d.ID)
				}
				names = append(names, x.cdiName)
			}
			if car.Annotations == nil {
				car.Annotations = map[string]string{}
			}
			car.Annotations[t.resp.annotationKey] = strings.Join(names, ",")
		case StrategyEnvvar:
			setEnv(car, VisibleDevicesEnv, strings.Join(visible(devs), ","))
		case StrategyVolumeMounts:
			setEnv(car, VisibleDevicesEnv, VolumeMountsDeviceListDir)
			for _, v := range visible(devs) {
				car.Mounts = append(car.Mounts, &pluginapi.Mount{HostPath: "/dev/null", ContainerPath: path.Join(VolumeMountsDeviceListDir, v)})
			}
		}
	}
	// Without CDI, MPS clients get their pipe directory and limits straight from the answer.
	if !cdiUsed {
		for _, d := range devs {
			if x := t.extras[d]; x != nil {
				for k, v := range x.env {
					setEnv(car, k, v)
				}
				car.Mounts = appendMounts(car.Mounts, x.mounts)
			}
		}
	}
	if t.resp.passDeviceSpecs {
		seen := map[string]bool{}
		for _, d := range devs {
			if x := t.extras[d]; x != nil {
				for _, s := range x.specs {
					if !seen[s.ContainerPath] {
						seen[s.ContainerPath] = true
						car.Devices = append(car.Devices, s)
					}
				}
			}
		}
	}
	return car, nil
}

func setEnv(car *pluginapi.ContainerAllocateResponse, k, v string) {
	if car.Envs == nil {
		car.Envs = map[string]string{}
	}
	car.Envs[k] = v
}

func appendMounts(dst, src []*pluginapi.Mount) []*pluginapi.Mount {
	for _, m := range src {
		if !slices.ContainsFunc(dst, func(x *pluginapi.Mount) bool { return x.ContainerPath == m.ContainerPath }) {
			dst = append(dst, m)
		}
	}
	return dst
}

// visible lists the distinct GPUs and MIG devices of devs as NVIDIA_VISIBLE_DEVICES names them.
func visible(devs []*Device) []string {
	out := make([]string, 0, len(devs))
	for _, d := range devs {
		if !slices.Contains(out, d.Visible) {
			out = append(out, d.Visible)
		}
	}
	return out
}

// annotationKey is the CDI annotation key of a resource's allocations: <prefix>tessera_<resource>,
// shortened with a hash when it would be too long.
func annotationKey(prefix, resource string) string {
	if prefix == "" {
		prefix = cdiapi.AnnotationPrefix
	}
	name := "tessera_" + strings.NewReplacer("/", "_", "+", ".").Replace(resource)
	if len(name) > 63 {
		sum := sha256.Sum256([]byte(resource))
		name = "tessera_" + hex.EncodeToString(sum[:8])
	}
	return prefix + name
}

// mpsExtras are what an MPS client container gets without CDI: the environment of its own limits
// and the daemon's directories.
func mpsExtras(x *deviceExtras, lim mps.Limits, pipe, shm string) {
	x.env = maps.Clone(mps.ClientEnv(lim))
	x.mounts = []*pluginapi.Mount{{HostPath: pipe, ContainerPath: mps.ClientPipeDir, ReadOnly: true}}
	if shm != "" {
		x.mounts = append(x.mounts, &pluginapi.Mount{HostPath: shm, ContainerPath: mps.ClientShmDir})
	}
}
