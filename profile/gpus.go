// Package profile hands both front ends (device plugin and DRA driver) a validated sharing profile
// for their node. It reads named profiles from a directory (the mounted profile ConfigMap), picks
// one by the node's labels (tessera.dev/sharing-profile, else NVIDIA's
// nvidia.com/device-plugin.config, else the default), resolves it against the node's GPUs, and
// watches both the content and the labels. A change that does not validate is refused with an
// Event and a log line naming the field; the last good profile keeps serving.
package profile

import (
	"context"
	"errors"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// GPUsFromSnapshot turns an inventory snapshot into what api.Resolve needs. MIG profiles offered
// are left unknown (nil); GPUsFromNVML fills them.
func GPUsFromSnapshot(snap *inventory.Snapshot) []api.GPUInfo {
	out := make([]api.GPUInfo, 0, len(snap.GPUs))
	for _, g := range snap.GPUs {
		info := api.GPUInfo{
			Index: g.Index, UUID: g.UUID, ProductName: g.ProductName,
			MigCapable: g.MigCapable, MigEnabled: g.MigEnabled, MemoryMiB: g.MemoryMiB,
		}
		if g.MigEnabled {
			info.MigDevices = []string{}
			for _, d := range g.MigDevices {
				info.MigDevices = append(info.MigDevices, d.GIProfile)
			}
		}
		out = append(out, info)
	}
	return out
}

// GPUsFromNVML reads the node through nvmlib and also fills in the MIG profiles each GPU offers,
// so that Resolve can refuse a layout naming a profile the GPU does not have.
func GPUsFromNVML(ctx context.Context, lib nvmlib.Interface) ([]api.GPUInfo, error) {
	snap, err := inventory.New(lib).Snapshot(ctx)
	if err != nil {
		return nil, err
	}
	gpus := GPUsFromSnapshot(snap)
	for i := range gpus {
		if !gpus[i].MigCapable {
			continue
		}
		profs, err := lib.MigProfiles(gpus[i].Index)
		if errors.Is(err, nvmlib.ErrNotSupported) {
			continue
		}
		if err != nil {
			continue // a GPU that cannot be read keeps its profiles unknown; Resolve skips the check
		}
		for _, p := range profs {
			gpus[i].MigProfiles = append(gpus[i].MigProfiles, p.Name)
		}
	}
	return gpus, nil
}

// ResolveSnapshot resolves a profile against an inventory snapshot.
func ResolveSnapshot(p *api.SharingProfile, snap *inventory.Snapshot) (*api.Resolution, error) {
	return api.Resolve(p, GPUsFromSnapshot(snap))
}
