// Package backend chooses where a Tessera binary gets its GPUs: the real NVML library or a simulated
// node. Every binary takes the same flags (--nvml, --sim-state-dir) and environment variables
// (TESSERA_NVML, TESSERA_SIM_STATE).
package backend

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

// Environment variables that set the flags' defaults.
const (
	EnvNVML     = "TESSERA_NVML"
	EnvSimState = "TESSERA_SIM_STATE"
)

// Options select the backend.
type Options struct {
	// NVML is "real", "sim:<node>" or "sim-file:<path>".
	NVML string
	// SimStateDir is a simulated node's state directory ("" for the default).
	SimStateDir string
	// DriverRoot is where this process sees the NVIDIA driver's files; libnvidia-ml is loaded from
	// under it when it is not / ("" : env TESSERA_DRIVER_ROOT, else the loader's search).
	DriverRoot string
}

// EnvDriverRoot names the driver root for commands without a --driver-root flag (the MIG manager in
// a container that mounts the host's driver root).
const EnvDriverRoot = "TESSERA_DRIVER_ROOT"

// AddFlags registers --nvml and --sim-state-dir, defaulting to the environment.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	def := os.Getenv(EnvNVML)
	if def == "" {
		def = "real"
	}
	fs.StringVar(&o.NVML, "nvml", def, "where GPUs come from: real (libnvidia-ml), sim:<node> (a built-in simulated node: "+
		strings.Join(sim.BuiltinNodes(), ", ")+") or sim-file:<path> (a node file); env "+EnvNVML)
	fs.StringVar(&o.SimStateDir, "sim-state-dir", os.Getenv(EnvSimState), "a simulated node's state directory (default /var/lib/tessera/sim/<node> for root, else ~/.local/state/tessera/sim/<node>); env "+EnvSimState)
}

// Simulated reports whether the options select a simulated node.
func (o Options) Simulated() bool { return o.NVML != "real" }

// Open opens the selected backend. For a simulated node it also returns the node, for control
// operations (nil on real hardware).
func (o Options) Open() (nvmlib.Interface, *sim.Node, error) {
	if o.NVML == "" || o.NVML == "real" {
		root := o.DriverRoot
		if root == "" {
			root = os.Getenv(EnvDriverRoot)
		}
		lib, err := nvmlib.OpenReal(root)
		return lib, nil, err
	}
	if !strings.HasPrefix(o.NVML, "sim:") && !strings.HasPrefix(o.NVML, "sim-file:") {
		return nil, nil, fmt.Errorf("--nvml=%q: use real, sim:<node> (one of %s) or sim-file:<path>", o.NVML, strings.Join(sim.BuiltinNodes(), ", "))
	}
	node, err := o.OpenNode()
	if err != nil {
		return nil, nil, err
	}
	lib, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		return nil, nil, err
	}
	return lib, node, nil
}

// OpenNode opens the selected simulated node without NVML (for `tessera sim`).
func (o Options) OpenNode() (*sim.Node, error) {
	if !o.Simulated() {
		return nil, fmt.Errorf("this needs a simulated node: pass --nvml=sim:<node> (one of %s) or set %s", strings.Join(sim.BuiltinNodes(), ", "), EnvNVML)
	}
	spec, err := sim.ParseTarget(o.NVML)
	if err != nil {
		return nil, fmt.Errorf("--nvml: %w", err)
	}
	return sim.Open(spec, o.SimStateDir)
}

// BootIDFunc returns where the node's boot ID comes from: the simulated node's own (a simulated
// reboot changes it) or the kernel's.
func BootIDFunc(node *sim.Node) func() (string, error) {
	if node != nil {
		return node.BootID
	}
	return func() (string, error) {
		b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
		if err != nil {
			return "", fmt.Errorf("reading the boot ID: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
}

// MIGGateDir is the MIG manager's handshake directory: flag when set, else <state dir>/mig-manager
// on a simulated node (so every process on it shares one), else the node-wide default.
func MIGGateDir(flag string, node *sim.Node, def string) string {
	if flag != "" {
		return flag
	}
	if node != nil {
		return filepath.Join(node.Dir(), "mig-manager")
	}
	return def
}
