package mps

import (
	"slices"
	"strings"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// ForSimulatedHost points a Manager at a simulated node's stand-in nvidia-cuda-mps-control, which
// records every invocation, environment and command line (host.Recorded) and, started with -f,
// stays in the foreground until SIGTERM. The stand-in makes no socket or PID file in its pipe
// directory, so a new daemon counts as ready once it has recorded its start completely (its
// arguments and the variables that name its GPU and directories); and it ignores quit, so Stop
// ends it with SIGTERM after the stop timeout, which this option shortens to a second (a later
// WithTimeouts overrides it).
func ForSimulatedHost(h *host.Host) Option {
	return func(m *Manager) {
		m.control = h.ToolPath(host.ToolMPSControl)
		m.stopTimeout = time.Second
		m.ready = func(pipe string, pid int) (bool, error) {
			recs, err := h.Records(host.ToolMPSControl)
			if err != nil {
				return false, err
			}
			started := false
			seen := map[string]bool{}
			for _, r := range recs {
				if r.PID != pid {
					continue
				}
				switch r.Kind {
				case "argv":
					started = slices.Contains(r.Fields, "-f")
					clear(seen)
				case "env":
					name, value, _ := strings.Cut(r.Fields[0], "=")
					seen[name] = name != EnvPipeDirectory || value == pipe
				}
			}
			return started && seen[EnvVisibleDevices] && seen[EnvPipeDirectory] && seen[EnvLogDirectory], nil
		}
	}
}
