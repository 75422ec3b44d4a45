package cdi

import "github.com/tessera-gpu/tessera/partitioning/sim/host"

// Roots are where a node keeps what CDI specs point at: the driver's files, the device nodes, procfs,
// and the nvidia-cdi-hook binary.
type Roots struct {
	Driver, Dev, Proc, Hook string
}

// DefaultRoots are a real node's.
func DefaultRoots() Roots {
	return Roots{Driver: "/", Dev: "/dev", Proc: "/proc", Hook: DefaultHookPath}
}

// OnSimulatedHost returns r with every root still at its real-node default replaced by the simulated
// host's; roots the user set stay as they are. Every binary resolves its roots this one way.
func (r Roots) OnSimulatedHost(h *host.Host) Roots {
	def := DefaultRoots()
	pick := func(v, real, sim string) string {
		if v == real {
			return sim
		}
		return v
	}
	return Roots{
		Driver: pick(r.Driver, def.Driver, h.DriverRoot()),
		Dev:    pick(r.Dev, def.Dev, h.DevRoot()),
		Proc:   pick(r.Proc, def.Proc, h.ProcRoot()),
		Hook:   pick(r.Hook, def.Hook, h.ToolPath(host.ToolCDIHook)),
	}
}
