// Package inventory answers the question everything in Tessera starts from: what GPUs does this node
// have, and how are they cut up right now? It reads NVML through nvmlib, caches what cannot change
// while the driver is loaded (identity, topology), and re-reads what can (MIG mode and devices,
// compute mode) on every snapshot. Output is deterministic: GPUs by index, MIG devices by GPU
// instance then compute instance.
package inventory

import (
	"context"
	"fmt"
	"sync"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Snapshot is the node's GPUs at one moment.
type Snapshot struct {
	System nvmlib.SystemInfo `json:"system"`
	GPUs   []GPU             `json:"gpus"`
}

// GPU is one GPU with its MIG devices.
type GPU struct {
	nvmlib.GPU  `json:",inline"`
	NVLinkPeers []int              `json:"nvlinkPeers"`
	MigDevices  []nvmlib.MigDevice `json:"migDevices,omitempty"`
	// Error is set when the GPU could not be read (for example, it fell off the bus); the other
	// fields then hold what was known of it before.
	Error string `json:"error,omitempty"`
}

// Inventory reads a node's GPUs. It is safe for concurrent use.
type Inventory struct {
	lib nvmlib.Interface

	mu     sync.Mutex
	system *nvmlib.SystemInfo
	static map[int]staticFacts
}

type staticFacts struct {
	gpu   nvmlib.GPU
	peers []int
}

// New returns an inventory over an NVML backend.
func New(lib nvmlib.Interface) *Inventory {
	return &Inventory{lib: lib, static: map[int]staticFacts{}}
}

// Snapshot reads the node. A GPU that cannot be read is reported with its error instead of failing
// the whole snapshot; only a failure to reach NVML at all is an error.
func (inv *Inventory) Snapshot(ctx context.Context) (*Snapshot, error) {
	sys, err := inv.systemInfo()
	if err != nil {
		return nil, err
	}
	n, err := inv.lib.DeviceCount()
	if err != nil {
		return nil, fmt.Errorf("counting GPUs: %w", err)
	}
	s := &Snapshot{System: sys, GPUs: make([]GPU, 0, n)}
	for i := range n {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		s.GPUs = append(s.GPUs, inv.readGPU(i))
	}
	return s, nil
}

func (inv *Inventory) systemInfo() (nvmlib.SystemInfo, error) {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	if inv.system != nil {
		return *inv.system, nil
	}
	sys, err := inv.lib.System()
	if err != nil {
		return sys, fmt.Errorf("reading driver versions: %w", err)
	}
	inv.system = &sys
	return sys, nil
}

func (inv *Inventory) readGPU(i int) GPU {
	g, err := inv.lib.GPU(i)
	inv.mu.Lock()
	facts, known := inv.static[i]
	inv.mu.Unlock()
	if err != nil {
		out := GPU{GPU: facts.gpu, NVLinkPeers: facts.peers, Error: err.Error()}
		out.Index = i
		return out
	}
	if !known {
		peers, perr := inv.lib.NVLinkPeers(i)
		if perr != nil {
			return GPU{GPU: g, Error: perr.Error()}
		}
		if peers == nil {
			peers = []int{}
		}
		facts = staticFacts{gpu: g, peers: peers}
		inv.mu.Lock()
		inv.static[i] = facts
		inv.mu.Unlock()
	}
	out := GPU{GPU: g, NVLinkPeers: facts.peers}
	if g.MigCapable && g.MigEnabled {
		devs, err := inv.lib.MigDevices(i)
		if err != nil {
			out.Error = err.Error()
			return out
		}
		out.MigDevices = devs
	}
	return out
}
