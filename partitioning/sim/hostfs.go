package sim

import (
	"path/filepath"

	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// hostFS ties a node to its simulated host filesystem under <state>/host.
type hostFS struct {
	h      *host.Host
	minors []int
}

func newHost(n *Node) (*hostFS, error) {
	r := n.store.node
	spec := host.Spec{DriverVersion: r.Spec.DriverVersion, CUDAVersion: r.Spec.CUDAVersion}
	for _, g := range r.GPUs {
		spec.GPUMinors = append(spec.GPUMinors, g.Minor)
		spec.PCI = append(spec.PCI, host.PCIDevice{BusID: g.PCIBusID, NUMANode: g.NUMANode})
	}
	h, err := host.Ensure(filepath.Join(n.store.dir, "host"), spec)
	if err != nil {
		return nil, err
	}
	hf := &hostFS{h: h, minors: spec.GPUMinors}
	for i := range r.GPUs {
		st, err := n.store.readGPU(i)
		if err != nil {
			return nil, err
		}
		if err := hf.syncMIG(i, st); err != nil {
			return nil, err
		}
	}
	return hf, nil
}

func (hf *hostFS) syncMIG(gpu int, st *gpuState) error {
	var inst []host.MIGInstance
	for _, gi := range st.GIs {
		mi := host.MIGInstance{GI: gi.ID}
		for _, ci := range gi.CIs {
			mi.CIs = append(mi.CIs, ci.ID)
		}
		inst = append(inst, mi)
	}
	return hf.h.SetMIG(hf.minors[gpu], inst)
}

// Host returns the node's simulated host filesystem: its dev, proc and driver roots.
func (n *Node) Host() *host.Host { return n.host.(*hostFS).h }
