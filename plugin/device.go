package plugin

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Device is one device the kubelet sees: a whole GPU, a MIG device, or one time-sliced replica or
// MPS client of either. Everything Allocate needs is computed when the device is planned, so an
// allocation reads memory only.
type Device struct {
	// ID is the device ID advertised to the kubelet: the GPU's or MIG device's UUID (or index with
	// deviceIDStrategy index), with ::<replica> for a replica. Stable across restarts.
	ID string
	// Resource is the extended resource the device belongs to, e.g. nvidia.com/gpu.
	Resource string
	// GPU is the NVML index of the GPU the device is on, GPUUUID its UUID.
	GPU     int
	GPUUUID string
	// NUMA is the GPU's NUMA node (-1 when unknown).
	NUMA int
	// MIG is set for a MIG device or a replica of one.
	MIG *nvmlib.MigDevice
	// Replica is the replica (time-sliced) or client slot (MPS) number, -1 for an unshared device.
	Replica int
	// Mode is the sharing mode of the GPU the device comes from.
	Mode api.Mode
	// FailRequestsGreaterThanOne refuses a container asking for more than one replica.
	FailRequestsGreaterThanOne bool
	// MPS are the client's own limits for an MPS client.
	MPS *mps.Limits
	// CDI is the device as the CDI spec describes it.
	CDI cdi.Device
	// Visible names the GPU or MIG device for NVIDIA_VISIBLE_DEVICES (envvar and volume-mounts
	// strategies): its UUID, or its index with deviceIDStrategy index.
	Visible string

	// healthy is set per device once planned (copies made while planning share nothing after).
	healthy *atomic.Bool
}

// Healthy reports the device's health as last advertised.
func (d *Device) Healthy() bool { return d.healthy.Load() }

// Shared reports whether the device is a replica or MPS client.
func (d *Device) Shared() bool { return d.Replica >= 0 }

// parent identifies what the device is cut from, for preferred allocation: the GPU for whole GPUs
// and MIG devices, the GPU or MIG device for replicas.
func (d *Device) parent() string {
	if d.MIG != nil && d.Shared() {
		return d.MIG.UUID
	}
	return d.GPUUUID
}

// key identifies the device across plans: resource and ID.
func (d *Device) key() string { return d.Resource + "\x00" + d.ID }

// sameAs reports whether two plans describe the device identically, so that a re-plan keeps it.
func (d *Device) sameAs(o *Device) bool {
	return d.key() == o.key() && d.GPU == o.GPU && d.Replica == o.Replica && d.Mode == o.Mode &&
		d.FailRequestsGreaterThanOne == o.FailRequestsGreaterThanOne && d.Visible == o.Visible &&
		d.CDI.Name() == o.CDI.Name() && ptrEqual(d.MPS, o.MPS)
}

func ptrEqual[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// mpsDirs gives the host directories of a GPU's MPS daemon: its pipe directory and the shared
// memory directory.
type mpsDirs func(gpuUUID string) (pipe, shm string)

// planGPU lists the devices one device-plugin GPU gives under its assignment. g is the GPU as read
// after any MIG layout was applied. Problems that leave the GPU without devices are errors; the
// caller reports them and carries on with the other GPUs.
func planGPU(res *api.Resolution, a api.Assignment, g inventory.GPU, dirs mpsDirs) ([]*Device, error) {
	if a.Owner != api.OwnerDevicePlugin {
		return nil, nil
	}
	if g.UUID == "" {
		return nil, fmt.Errorf("GPU %d could not be read: %s", g.Index, g.Error)
	}
	byIndex := res.DevicePlugin.DeviceIDStrategy == "index"
	base := Device{GPU: g.Index, GPUUUID: g.UUID, NUMA: g.NUMANode, Replica: -1, Mode: a.Mode,
		CDI: cdi.WholeGPU(g.GPU)}
	base.ID, base.Visible = g.UUID, g.UUID
	if byIndex {
		base.ID, base.Visible = strconv.Itoa(g.Index), strconv.Itoa(g.Index)
	}
	var out []*Device
	add := func(d Device) { out = append(out, &d) }

	switch a.Mode {
	case api.ModeWhole:
		base.Resource = a.ResourceName
		add(base)
	case api.ModeTimeSliced:
		if a.Replicas < 1 {
			return nil, fmt.Errorf("GPU %d: time-slicing with %d replicas", g.Index, a.Replicas)
		}
		for i := range a.Replicas {
			d := base
			d.Resource, d.Replica, d.FailRequestsGreaterThanOne = a.ResourceName, i, a.FailRequestsGreaterThanOne
			d.ID = replicaID(base.ID, i)
			d.CDI = base.CDI.Replica(i)
			add(d)
		}
	case api.ModeMPS:
		if len(a.MPSClients) == 0 {
			return nil, fmt.Errorf("GPU %d: MPS without clients", g.Index)
		}
		if dirs == nil {
			return nil, fmt.Errorf("GPU %d: MPS is not available to this plugin", g.Index)
		}
		pipe, shm := dirs(g.UUID)
		names := mpsResourceNames(a.ResourceName, a.MPSClients)
		for i, c := range a.MPSClients {
			d := base
			lim := mps.Limits{ActiveThreadPercentage: c.ActiveThreadPercentage, PinnedMemoryMiB: c.PinnedMemoryMiB}
			d.Resource, d.Replica, d.FailRequestsGreaterThanOne, d.MPS = names[i], i, a.FailRequestsGreaterThanOne, &lim
			d.ID = replicaID(base.ID, i)
			d.CDI = base.CDI.MPSFraction(cdi.MPS{Replica: i, PipeDir: pipe, ShmDir: shm,
				ActiveThreadPercentage: c.ActiveThreadPercentage, PinnedMemoryLimitMiB: c.PinnedMemoryMiB})
			add(d)
		}
	case api.ModeMIGStatic:
		if !g.MigEnabled {
			return nil, fmt.Errorf("GPU %d (%s) is not in MIG mode (pending: %v); it has no MIG devices to serve", g.Index, g.ProductName, g.MigPending)
		}
		for pos, m := range g.MigDevices {
			m := m
			d := base
			d.MIG = &m
			d.CDI = cdi.MIGDevice(g.GPU, m)
			d.ID, d.Visible = m.UUID, m.UUID
			if byIndex {
				d.ID = fmt.Sprintf("%d:%d", g.Index, pos)
				d.Visible = d.ID
			}
			d.Resource = res.MIGResourceName(a, m.Profile)
			var rep *api.MIGReplicas
			if a.MIG != nil {
				for i := range a.MIG.Replicas {
					if a.MIG.Replicas[i].Profile == m.Profile {
						rep = &a.MIG.Replicas[i]
					}
				}
			}
			if rep == nil {
				add(d)
				continue
			}
			for i := range rep.Replicas {
				r := d
				r.Replica, r.FailRequestsGreaterThanOne = i, rep.FailRequestsGreaterThanOne
				r.ID = replicaID(d.ID, i)
				r.CDI = d.CDI.Replica(i)
				add(r)
			}
		}
	default:
		return nil, fmt.Errorf("GPU %d: mode %s is not served by the device plugin", g.Index, a.Mode)
	}
	for _, d := range out {
		if errs := validation.IsQualifiedName(d.Resource); len(errs) > 0 || !strings.Contains(d.Resource, "/") {
			return nil, fmt.Errorf("GPU %d: %q is not a valid extended resource name (domain/name): %s", g.Index, d.Resource, strings.Join(errs, "; "))
		}
		d.healthy = new(atomic.Bool)
		d.healthy.Store(true)
	}
	return out, nil
}

func replicaID(base string, i int) string { return base + "::" + strconv.Itoa(i) }

// mpsResourceNames names the resource of each MPS client slot. Slots of one size share the GPU's
// resource when all slots are equal; an unequal split gets one resource per size, because the
// kubelet treats the devices of one resource as interchangeable: name.mps-20gb, name.mps-10gb
// (a name already ending in .mps gets -20gb; name.mps-<N>mb for sizes that are not whole GiB, -<P>pct added when sizes differ only in
// threads, name.mps-<P>pct without a memory limit).
func mpsResourceNames(name string, clients []api.MPSClient) []string {
	out := make([]string, len(clients))
	uniform := true
	for _, c := range clients {
		uniform = uniform && c == clients[0]
	}
	if uniform {
		for i := range out {
			out[i] = name
		}
		return out
	}
	pctNeeded := map[uint64]bool{}
	seen := map[uint64]int{}
	for _, c := range clients {
		if p, ok := seen[c.PinnedMemoryMiB]; ok && p != c.ActiveThreadPercentage {
			pctNeeded[c.PinnedMemoryMiB] = true
		}
		seen[c.PinnedMemoryMiB] = c.ActiveThreadPercentage
	}
	for i, c := range clients {
		var parts []string
		switch m := c.PinnedMemoryMiB; {
		case m == 0:
		case m%1024 == 0:
			parts = append(parts, strconv.FormatUint(m/1024, 10)+"gb")
		default:
			parts = append(parts, strconv.FormatUint(m, 10)+"mb")
		}
		if c.PinnedMemoryMiB == 0 || pctNeeded[c.PinnedMemoryMiB] {
			parts = append(parts, strconv.Itoa(c.ActiveThreadPercentage)+"pct")
		}
		if strings.HasSuffix(name, ".mps") {
			out[i] = name + "-" + strings.Join(parts, "-")
		} else {
			out[i] = name + ".mps-" + strings.Join(parts, "-")
		}
	}
	return out
}

// sortDevices orders devices as they are advertised: by GPU, whole before MIG, MIG by instance,
// replicas by number.
func sortDevices(ds []*Device) {
	slices.SortStableFunc(ds, func(a, b *Device) int {
		ka := []int{a.GPU, -1, -1, a.Replica}
		kb := []int{b.GPU, -1, -1, b.Replica}
		if a.MIG != nil {
			ka[1], ka[2] = a.MIG.GI, a.MIG.CI
		}
		if b.MIG != nil {
			kb[1], kb[2] = b.MIG.GI, b.MIG.CI
		}
		if c := slices.Compare(ka, kb); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
}
