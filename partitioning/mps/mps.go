// Package mps runs NVIDIA's CUDA Multi-Process Service for Tessera: one MPS control daemon per
// GPU, with the limits it enforces and the limits each client is handed. Both front ends use it
// alone — the device plugin for MPS replicas, the DRA driver for enforced shares.
//
// # Process model
//
// For each GPU in MPS mode there is one control daemon (nvidia-cuda-mps-control -f), started in
// a session of its own with CUDA_VISIBLE_DEVICES set to the GPU's UUID and its own pipe and log
// directories under the Manager's root:
//
//	<root>/<gpu-uuid>/pipe/        CUDA_MPS_PIPE_DIRECTORY (mounted read-only into clients)
//	<root>/<gpu-uuid>/log/         CUDA_MPS_LOG_DIRECTORY (control.log, server.log)
//	<root>/<gpu-uuid>/state.json   PID, start time, boot, previous compute mode, limits, clients
//	<root>/<gpu-uuid>/daemon.pid   the daemon's PID
//	<root>/<gpu-uuid>/daemon.out   the daemon's stdout and stderr
//	<root>/<gpu-uuid>/lock         flock held while the daemon is started, changed or stopped
//	<root>/shm/                    /dev/shm of the daemons and of their clients
//
// The GPU is set to EXCLUSIVE_PROCESS compute mode before the daemon starts (so that the MPS
// server is the only CUDA context on it) and its previous mode is written to the state file first,
// so that Stop restores it even when the daemon was started by an earlier process, or crashed and
// was started again.
//
// The daemon is not a child that dies with the process that started it: a Manager started in a
// restarted plugin process re-adopts it from the state file (the PID is alive, started at the
// recorded time in the same boot, runs the control binary in foreground mode, and has this GPU's
// pipe directory in its environment) and never starts a second one. Without a state file it
// adopts a daemon that its own PID file (pipe/nvidia-cuda-mps-control.pid) names, if that process
// provably serves this pipe directory. In Kubernetes, where a container's restart kills all its
// processes, the daemons belong in a container of their own (`tessera mps run`) sharing the pod's
// PID namespace with the plugin, which attaches to them through the same files.
//
// # What is enforced, and by whom
//
// The daemon's limits (Config.Limits, Daemon.SetLimits) are sent to it as control commands
// (set_default_active_thread_percentage, set_default_device_pinned_mem_limit, and for servers
// already running set_active_thread_percentage / set_device_pinned_mem_limit with the server's
// PID): they bind every client and no container can lift them. A client's own limits
// (ClientEnv: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, CUDA_MPS_PINNED_DEVICE_MEM_LIMIT) can only lower
// those, and a container that unsets them gets the daemon's limits back: they are cooperative.
// MPS (before v3 namespaces) has no per-client server-side limit, so an unequal Split is
// server-side up to its Ceiling and cooperative below it. Enforce rates every client. See
// docs/sharing.md.
package mps

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// DefaultRoot holds the pipe, log and state directories of every GPU's daemon.
const DefaultRoot = "/run/tessera/mps"

// ControlBinary is the MPS control program's name; it lives in the driver root's usr/bin.
const ControlBinary = "nvidia-cuda-mps-control"

// Where clients see the daemon's files.
const (
	// ClientPipeDir is where a client container sees the GPU's pipe directory. It is MPS's default
	// pipe directory, so a client that drops CUDA_MPS_PIPE_DIRECTORY still reaches the daemon
	// rather than bypassing MPS.
	ClientPipeDir = "/tmp/nvidia-mps"
	// ClientShmDir is where a client container sees the daemons' shared memory directory.
	ClientShmDir = "/dev/shm"
)

// Environment variables of MPS clients and daemons.
const (
	EnvPipeDirectory          = "CUDA_MPS_PIPE_DIRECTORY"
	EnvLogDirectory           = "CUDA_MPS_LOG_DIRECTORY"
	EnvActiveThreadPercentage = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
	EnvPinnedDeviceMemLimit   = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
	EnvVisibleDevices         = "CUDA_VISIBLE_DEVICES"
)

// FlagMultiUser starts the control daemon so that clients of every Linux user share one MPS
// server, run as root (Volta and later; the daemon must run as root).
const FlagMultiUser = "-multiuser-server"

// daemonDevice names the GPU in control commands and client variables: the daemon sees exactly
// one device (CUDA_VISIBLE_DEVICES is the GPU's UUID), and MPS renumbers what it sees from 0.
const daemonDevice = "0"

// Sharing modes a caller may state for the GPU, spelled as api.Mode spells them.
const (
	// ModeMPS is the only mode Ensure accepts ("" means the same).
	ModeMPS = "mps"
)

// ErrNotRunning is returned by Attach when no daemon of Tessera runs for the GPU.
var ErrNotRunning = errors.New("no MPS control daemon runs for this GPU")

// ReadyFunc reports whether a control daemon started as pid with pipe directory pipeDir accepts
// commands.
type ReadyFunc func(pipeDir string, pid int) (bool, error)

// Manager starts, adopts and stops MPS control daemons, one per GPU. It keeps no state in memory
// that the files under its root do not hold, so any number of Managers (in any number of
// processes) may share a root; changes to one GPU are serialised by a lock file, and GPUs never
// wait for each other.
type Manager struct {
	lib     nvmlib.Interface
	root    string
	shmDir  string
	control string
	procs   Processes
	clock   clock.Clock
	ready   ReadyFunc

	readyTimeout   time.Duration
	stopTimeout    time.Duration
	commandTimeout time.Duration
	poll           time.Duration
}

// Option configures a Manager.
type Option func(*Manager)

// WithRoot sets the directory holding every GPU's pipe, log and state directories (DefaultRoot).
func WithRoot(dir string) Option { return func(m *Manager) { m.root = dir } }

// WithShmDir sets the shared-memory directory clients get at /dev/shm (<root>/shm). It must be the
// daemons' /dev/shm: the container running them mounts it there.
func WithShmDir(dir string) Option { return func(m *Manager) { m.shmDir = dir } }

// WithDriverRoot finds the control program under a driver root (usr/bin/nvidia-cuda-mps-control),
// e.g. /run/nvidia/driver when the driver runs in a container.
func WithDriverRoot(root string) Option {
	return func(m *Manager) { m.control = filepath.Join(root, "usr", "bin", ControlBinary) }
}

// WithControlBinary sets the control program's path.
func WithControlBinary(path string) Option { return func(m *Manager) { m.control = path } }

// WithProcesses replaces how processes are started and inspected (OSProcesses).
func WithProcesses(p Processes) Option { return func(m *Manager) { m.procs = p } }

// WithClock sets the clock for timestamps and waits.
func WithClock(c clock.Clock) Option { return func(m *Manager) { m.clock = c } }

// WithReadyCheck replaces how a new daemon is known to accept commands (by default: its control
// socket or its PID file appears in the pipe directory).
func WithReadyCheck(f ReadyFunc) Option { return func(m *Manager) { m.ready = f } }

// WithTimeouts sets how long a new daemon may take to accept commands (10s), how long a daemon
// may take to exit after quit and again after SIGTERM (10s), and how long one control command may
// take (30s). Zero keeps the default.
func WithTimeouts(ready, stop, command time.Duration) Option {
	return func(m *Manager) {
		if ready > 0 {
			m.readyTimeout = ready
		}
		if stop > 0 {
			m.stopTimeout = stop
		}
		if command > 0 {
			m.commandTimeout = command
		}
	}
}

// NewManager returns a Manager of the GPUs lib sees.
func NewManager(lib nvmlib.Interface, opts ...Option) *Manager {
	m := &Manager{
		lib:            lib,
		root:           DefaultRoot,
		control:        filepath.Join("/usr/bin", ControlBinary),
		procs:          OSProcesses{},
		clock:          clock.RealClock{},
		ready:          socketReady,
		readyTimeout:   10 * time.Second,
		stopTimeout:    10 * time.Second,
		commandTimeout: 30 * time.Second,
		poll:           20 * time.Millisecond,
	}
	for _, o := range opts {
		o(m)
	}
	if m.shmDir == "" {
		m.shmDir = filepath.Join(m.root, "shm")
	}
	if abs, err := filepath.Abs(m.root); err == nil {
		m.root = abs
	}
	return m
}

// Root is the directory holding the GPUs' directories.
func (m *Manager) Root() string { return m.root }

// Paths are one GPU's files.
type Paths struct {
	// Dir is <root>/<gpu-uuid>.
	Dir string `json:"dir"`
	// Pipe is CUDA_MPS_PIPE_DIRECTORY on the host.
	Pipe string `json:"pipe"`
	// Log is CUDA_MPS_LOG_DIRECTORY on the host.
	Log string `json:"log"`
	// Shm is the daemons' /dev/shm on the host.
	Shm     string `json:"shm"`
	State   string `json:"state"`
	PIDFile string `json:"pidFile"`
	Output  string `json:"output"`
	Lock    string `json:"lock"`
}

// PathsFor returns the files of the GPU with this UUID.
func (m *Manager) PathsFor(uuid string) Paths {
	dir := filepath.Join(m.root, uuid)
	return Paths{
		Dir:     dir,
		Pipe:    filepath.Join(dir, pipeName),
		Log:     filepath.Join(dir, logName),
		Shm:     m.shmDir,
		State:   filepath.Join(dir, stateFile),
		PIDFile: filepath.Join(dir, pidFile),
		Output:  filepath.Join(dir, outputFile),
		Lock:    filepath.Join(dir, lockName),
	}
}

// Config is what Ensure makes true of a GPU.
type Config struct {
	// Limits are the daemon's limits for every client (server-side). For a Split, use its
	// Ceiling.
	Limits Limits
	// MultiUser starts the daemon with -multiuser-server, so that pods running as different users
	// share the GPU at once. Without it MPS serves one Linux user at a time per GPU: a client of
	// another user waits until every client of the current one has exited. In multi-user mode all
	// clients appear as root to MPS and share one server; each still has its own GPU address
	// space, but a fatal fault of any client reaches all of them (as it does in single-user mode).
	// Needs a Volta or newer GPU and a daemon running as root. Changing it needs a Stop.
	MultiUser bool
	// Mode is the sharing mode the caller's sharing profile gives the GPU, as api.Mode spells it.
	// "" and "mps" are accepted; any other mode (time-sliced, whole, mig-static, …) is refused,
	// because it would need the GPU in another compute mode or partitioned.
	Mode string
}

// Ensure makes the GPU (an NVML index such as "3", or a UUID) run an MPS control daemon with cfg,
// re-adopting one that already runs for it and starting one otherwise. It refuses a GPU in MIG
// mode, a mode other than MPS, a GPU in Prohibited compute mode, and a GPU that compute processes
// outside MPS use; every error names the GPU and the fix.
func (m *Manager) Ensure(ctx context.Context, gpu string, cfg Config) (*Daemon, error) {
	g, err := m.resolve(gpu)
	if err != nil {
		return nil, err
	}
	if err := checkConfig(g, cfg); err != nil {
		return nil, err
	}
	if err := checkMIG(g); err != nil {
		return nil, err
	}
	p := m.PathsFor(g.UUID)
	if n := len(p.Pipe) + 1 + len(longestSocketName); n > maxSocketPath {
		return nil, fmt.Errorf("%s: MPS sockets under %s would have paths of %d bytes, Linux allows %d: choose a shorter root directory (WithRoot, --mps-root)", gpuName(g), p.Pipe, n, maxSocketPath)
	}
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		return nil, err
	}
	unlock, err := lockFile(ctx, p.Lock)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// What another process did to the GPU while this one waited for the lock counts.
	if g, err = m.reread(g); err != nil {
		return nil, err
	}
	if err := checkMIG(g); err != nil {
		return nil, err
	}

	st, err := readState(p.State)
	if err != nil {
		return nil, err
	}
	if st != nil && st.GPUUUID != g.UUID {
		return nil, fmt.Errorf("%s: %s belongs to GPU %s: remove it if no MPS daemon runs for this GPU", gpuName(g), p.State, st.GPUUUID)
	}
	if st != nil {
		if why := m.identify(st); why == "" {
			return m.adopt(ctx, g, p, st, cfg)
		} else if st.PID > 0 {
			klog.InfoS("MPS control daemon of a previous run is gone; starting a new one", "gpu", g.Index, "uuid", g.UUID, "pid", st.PID, "reason", why)
		}
	} else if st = m.adoptOrphan(g, p); st != nil {
		klog.InfoS("Adopting an MPS control daemon found by its own PID file", "gpu", g.Index, "uuid", g.UUID, "pid", st.PID)
		if err := writeState(p, st); err != nil {
			return nil, err
		}
		return m.adopt(ctx, g, p, st, cfg)
	}
	return m.start(ctx, g, p, st, cfg)
}

// Attach returns the daemon that runs for the GPU without starting one: ErrNotRunning if there is
// none. A front end that does not own the daemons (they run in another container) uses this.
func (m *Manager) Attach(ctx context.Context, gpu string) (*Daemon, error) {
	g, err := m.resolve(gpu)
	if err != nil {
		return nil, err
	}
	p := m.PathsFor(g.UUID)
	st, err := readState(p.State)
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, fmt.Errorf("%s: %w", gpuName(g), ErrNotRunning)
	}
	if why := m.identify(st); why != "" {
		return nil, fmt.Errorf("%s: %w (%s)", gpuName(g), ErrNotRunning, why)
	}
	return &Daemon{m: m, gpu: g, paths: p, st: *st, adopted: true}, nil
}

// StopOptions change Stop.
type StopOptions struct {
	// Force stops the daemon although clients are still registered with it (their GPU work
	// fails).
	Force bool
}

// Stop tells the GPU's daemon to quit, signals it if it does not (SIGTERM, then SIGKILL, to its
// process group), restores the GPU's previous compute mode, and removes the state and PID files
// and the pipe directory's contents; the log directory stays. Stop of a GPU without a daemon does
// nothing. Registered clients make Stop fail unless forced.
func (m *Manager) Stop(ctx context.Context, gpu string, opts StopOptions) error {
	g, err := m.resolve(gpu)
	if err != nil {
		return err
	}
	p := m.PathsFor(g.UUID)
	if _, err := os.Stat(p.Dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	unlock, err := lockFile(ctx, p.Lock)
	if err != nil {
		return err
	}
	defer unlock()
	st, err := readState(p.State)
	if err != nil {
		return err
	}
	if st == nil {
		if st = m.adoptOrphan(g, p); st == nil {
			return nil
		}
	}
	if len(st.Clients) > 0 && !opts.Force {
		ids := make([]string, len(st.Clients))
		for i, c := range st.Clients {
			ids[i] = c.ID
		}
		return fmt.Errorf("%s: the MPS daemon still has %d client(s) (%s): remove them first, or force the stop (their GPU work fails)", gpuName(g), len(ids), strings.Join(ids, ", "))
	}
	var errs []error
	running := m.identify(st) == ""
	if running {
		if err := m.terminate(ctx, st, true); err != nil {
			errs = append(errs, fmt.Errorf("%s: stopping the MPS daemon (pid %d): %w", gpuName(g), st.PID, err))
		}
	}
	if len(errs) == 0 {
		if err := m.restoreComputeMode(g, st); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, removeState(p), clearDir(p.Pipe))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if running {
		klog.InfoS("MPS control daemon stopped", "gpu", g.Index, "uuid", g.UUID, "pid", st.PID, "computeMode", st.PreviousComputeMode)
	} else {
		klog.InfoS("Cleared the record of an MPS control daemon that no longer runs", "gpu", g.Index, "uuid", g.UUID, "pid", st.PID, "computeMode", st.PreviousComputeMode)
	}
	return nil
}

// Status is what List reports of one GPU's daemon.
type Status struct {
	GPUUUID  string `json:"gpuUUID"`
	GPUIndex int    `json:"gpuIndex"`
	PID      int    `json:"pid"`
	// Running is whether the recorded daemon runs; Reason says why not.
	Running             bool               `json:"running"`
	Reason              string             `json:"reason,omitempty"`
	MultiUser           bool               `json:"multiUser,omitempty"`
	Limits              Limits             `json:"limits"`
	PreviousComputeMode nvmlib.ComputeMode `json:"previousComputeMode"`
	Clients             []Client           `json:"clients,omitempty"`
	Paths               Paths              `json:"paths"`
	StartedAt           time.Time          `json:"startedAt"`
}

// List reports every GPU with a daemon record under the root, sorted by GPU index.
func (m *Manager) List() ([]Status, error) {
	entries, err := os.ReadDir(m.root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Status
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		p := m.PathsFor(e.Name())
		st, err := readState(p.State)
		if err != nil {
			return nil, err
		}
		if st == nil {
			continue
		}
		why := m.identify(st)
		d := &Daemon{m: m, paths: p, st: *st, gpu: nvmlib.GPU{Index: st.GPUIndex, UUID: st.GPUUUID}}
		out = append(out, Status{
			GPUUUID: st.GPUUUID, GPUIndex: st.GPUIndex, PID: st.PID, Running: why == "", Reason: why,
			MultiUser: st.MultiUser, Limits: st.Limits, PreviousComputeMode: st.PreviousComputeMode,
			Clients: d.Clients(), Paths: p, StartedAt: st.StartedAt,
		})
	}
	slices.SortFunc(out, func(a, b Status) int { return a.GPUIndex - b.GPUIndex })
	return out, nil
}

// resolve finds a GPU by NVML index or UUID.
func (m *Manager) resolve(gpu string) (nvmlib.GPU, error) {
	if i, err := strconv.Atoi(gpu); err == nil {
		g, err := m.lib.GPU(i)
		if err != nil {
			return nvmlib.GPU{}, fmt.Errorf("GPU %d: %w", i, err)
		}
		return g, nil
	}
	n, err := m.lib.DeviceCount()
	if err != nil {
		return nvmlib.GPU{}, err
	}
	for i := range n {
		g, err := m.lib.GPU(i)
		if err == nil && g.UUID == gpu {
			return g, nil
		}
	}
	return nvmlib.GPU{}, fmt.Errorf("no GPU %q: name a GPU by its NVML index or its UUID (tessera inspect lists them)", gpu)
}

// reread reads the GPU again (after waiting for its lock), making sure its index still names it.
func (m *Manager) reread(g nvmlib.GPU) (nvmlib.GPU, error) {
	cur, err := m.lib.GPU(g.Index)
	if err != nil {
		return nvmlib.GPU{}, fmt.Errorf("%s: %w", gpuName(g), err)
	}
	if cur.UUID != g.UUID {
		return nvmlib.GPU{}, fmt.Errorf("%s: NVML index %d now names %s; try again", gpuName(g), g.Index, cur.UUID)
	}
	return cur, nil
}

func checkConfig(g nvmlib.GPU, cfg Config) error {
	switch cfg.Mode {
	case "", ModeMPS:
	default:
		return fmt.Errorf("%s: sharing mode %q conflicts with MPS (MPS needs the GPU whole, in EXCLUSIVE_PROCESS compute mode; %s): give the GPU one mode in the sharing profile", gpuName(g), cfg.Mode, modeNeeds(cfg.Mode))
	}
	if _, _, ok := computeCapability(g); ok {
		if major, minor, _ := computeCapability(g); major < 3 || (major == 3 && minor < 5) {
			return fmt.Errorf("%s: compute capability %s; MPS needs 3.5 or higher: use another GPU", gpuName(g), g.ComputeCapability)
		}
	}
	if err := cfg.Limits.validate("limits", g); err != nil {
		return fmt.Errorf("%s: %w", gpuName(g), err)
	}
	if cfg.MultiUser && !volta(g) {
		return fmt.Errorf("%s: compute capability %s; multi-user MPS (%s) needs Volta or newer: run all of the GPU's pods as one user instead", gpuName(g), g.ComputeCapability, FlagMultiUser)
	}
	return nil
}

func modeNeeds(mode string) string {
	switch mode {
	case "time-sliced":
		return "time-slicing needs DEFAULT compute mode so that every process gets its own context"
	case "whole":
		return "a whole GPU belongs to one container"
	case "mig-static", "mig-dynamic":
		return "MIG partitions the GPU in hardware, and Tessera runs MPS on whole GPUs only"
	case "shared":
		return "ask for MPS explicitly (mode mps) when a shared GPU's isolation is mps"
	}
	return "Tessera knows no such mode"
}

func checkMIG(g nvmlib.GPU) error {
	switch {
	case g.MigEnabled:
		return fmt.Errorf("%s: MIG mode is on; Tessera runs MPS on whole GPUs only: turn MIG off (tessera mig apply with a layout that disables MIG on it, or nvidia-smi -i %d -mig 0 and a GPU reset), or give the GPU a mig mode instead of mps", gpuName(g), g.Index)
	case g.MigPending:
		return fmt.Errorf("%s: MIG mode turns on at the next GPU reset; Tessera runs MPS on whole GPUs only: cancel it (nvidia-smi -i %d -mig 0) or give the GPU a mig mode instead of mps", gpuName(g), g.Index)
	}
	return nil
}

// identify returns "" if the daemon st records runs, else why not.
func (m *Manager) identify(st *state) string {
	if st.PID <= 0 {
		return "its start did not finish"
	}
	if b := bootID(); b != "" && st.BootID != "" && b != st.BootID {
		return "the node rebooted since"
	}
	info, ok, err := m.procs.Lookup(st.PID)
	if err != nil {
		return fmt.Sprintf("looking up pid %d: %v", st.PID, err)
	}
	if !ok {
		return fmt.Sprintf("pid %d has exited", st.PID)
	}
	if st.StartTicks != 0 && info.StartTicks != st.StartTicks {
		return fmt.Sprintf("pid %d now belongs to another process (it started at another time)", st.PID)
	}
	return isDaemon(info, st.PipeDir)
}

// isDaemon returns "" if the process runs the MPS control program in foreground mode for pipe,
// else why not. A process whose environment cannot be read passes on its command line alone.
func isDaemon(info ProcInfo, pipe string) string {
	isControl := slices.ContainsFunc(info.Args, func(a string) bool { return filepath.Base(a) == ControlBinary })
	if !isControl || !slices.ContainsFunc(info.Args, func(a string) bool { return a == "-f" || a == "-d" }) {
		return fmt.Sprintf("pid %d runs %q, not the MPS control daemon", info.PID, strings.Join(info.Args, " "))
	}
	if info.Env != nil {
		if v, _ := envValue(info.Env, EnvPipeDirectory); v != pipe {
			return fmt.Sprintf("pid %d is an MPS control daemon for pipe directory %q, not %q", info.PID, v, pipe)
		}
	}
	return ""
}

// adoptOrphan builds a state for a daemon that the pipe directory's PID file names, if that
// process is provably the daemon of this pipe directory (its environment says so). It returns nil
// otherwise.
func (m *Manager) adoptOrphan(g nvmlib.GPU, p Paths) *state {
	pid := readDaemonPidFile(p.Pipe)
	if pid == 0 {
		return nil
	}
	info, ok, err := m.procs.Lookup(pid)
	if err != nil || !ok || info.Env == nil || isDaemon(info, p.Pipe) != "" {
		return nil
	}
	return &state{
		Format: stateFormat, GPUUUID: g.UUID, GPUIndex: g.Index, BootID: bootID(),
		PID: pid, StartTicks: info.StartTicks, Control: m.control, Args: info.Args,
		PipeDir: p.Pipe, LogDir: p.Log,
		PreviousComputeMode: nvmlib.ComputeModeDefault, PreviousModeGuessed: true,
		MultiUser: slices.Contains(info.Args, FlagMultiUser), StartedAt: m.clock.Now().UTC(),
	}
}

// adopt takes over a running daemon: it checks it against cfg, makes sure the GPU is still in
// EXCLUSIVE_PROCESS mode, and sends changed limits.
func (m *Manager) adopt(ctx context.Context, g nvmlib.GPU, p Paths, st *state, cfg Config) (*Daemon, error) {
	if st.MultiUser != cfg.MultiUser {
		have := "without " + FlagMultiUser
		if st.MultiUser {
			have = "with " + FlagMultiUser
		}
		return nil, fmt.Errorf("%s: its MPS daemon (pid %d) runs %s; changing that needs a restart: stop it (no clients may be using it) and ensure it again", gpuName(g), st.PID, have)
	}
	if g.ComputeMode != nvmlib.ComputeModeExclusiveProcess {
		klog.InfoS("GPU left EXCLUSIVE_PROCESS compute mode under a running MPS daemon; setting it again", "gpu", g.Index, "computeMode", g.ComputeMode)
		if err := m.lib.SetComputeMode(g.Index, nvmlib.ComputeModeExclusiveProcess); err != nil {
			return nil, fmt.Errorf("%s: setting EXCLUSIVE_PROCESS compute mode: %w", gpuName(g), err)
		}
	}
	st.GPUIndex = g.Index
	d := &Daemon{m: m, gpu: g, paths: p, st: *st, adopted: true}
	if st.Limits != cfg.Limits {
		if err := d.setLimitsLocked(ctx, cfg.Limits); err != nil {
			return nil, err
		}
	} else if err := writeState(p, &d.st); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Re-adopted MPS control daemon", "gpu", g.Index, "uuid", g.UUID, "pid", st.PID)
	return d, nil
}

// start starts a daemon for the GPU. prev is the state a dead daemon left, whose previous compute
// mode is kept. On failure nothing it did stays: the daemon is stopped, the compute mode restored
// and the state removed.
func (m *Manager) start(ctx context.Context, g nvmlib.GPU, p Paths, prev *state, cfg Config) (d *Daemon, err error) {
	if g.ComputeMode == nvmlib.ComputeModeProhibited {
		return nil, fmt.Errorf("%s: compute mode is Prohibited, so no CUDA process may use it; someone set this on purpose: set it to Default (nvidia-smi -i %d -c DEFAULT) before giving the GPU to MPS", gpuName(g), g.Index)
	}
	procs, err := m.lib.Processes(g.Index)
	if err != nil {
		return nil, fmt.Errorf("%s: listing its compute processes: %w", gpuName(g), err)
	}
	if len(procs) > 0 {
		pids := make([]string, len(procs))
		for i, pr := range procs {
			pids[i] = strconv.Itoa(pr.PID)
		}
		return nil, fmt.Errorf("%s: %d compute process(es) outside MPS use it (pid %s), as a whole-GPU or time-sliced workload would: stop them or move the GPU's pods first; an MPS server cannot share the GPU with them", gpuName(g), len(procs), strings.Join(pids, ", "))
	}
	previous := g.ComputeMode
	guessed := false
	var clients []clientRecord
	if prev != nil {
		if prev.PreviousComputeMode != "" {
			previous, guessed = prev.PreviousComputeMode, prev.PreviousModeGuessed
		}
		// Clients handed out before the old daemon died are still allocated to their containers;
		// the front ends remove them when they release them.
		clients = prev.Clients
		for _, c := range clients {
			if err := fitsUnder(cfg.Limits, c.Limits); err != nil {
				klog.InfoS("A client of the previous MPS daemon has limits above the new daemon's; it gets the daemon's", "gpu", g.Index, "client", c.ID, "reason", err.Error())
			}
		}
	}
	for _, dir := range []string{p.Pipe, p.Log} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(p.Shm, 0o755); err != nil {
		return nil, err
	}
	if err := os.Chmod(p.Shm, 0o777|os.ModeSticky); err != nil {
		return nil, err
	}
	if err := clearDir(p.Pipe); err != nil {
		return nil, fmt.Errorf("%s: clearing what a dead daemon left in %s: %w", gpuName(g), p.Pipe, err)
	}
	args := []string{m.control, "-f"}
	if cfg.MultiUser {
		args = append(args, FlagMultiUser)
	}
	st := &state{
		Format: stateFormat, GPUUUID: g.UUID, GPUIndex: g.Index, BootID: bootID(),
		Control: m.control, Args: args, PipeDir: p.Pipe, LogDir: p.Log,
		PreviousComputeMode: previous, PreviousModeGuessed: guessed, MultiUser: cfg.MultiUser,
		Clients: clients, StartedAt: m.clock.Now().UTC(),
	}
	// The previous mode is on disk before the GPU's mode changes, so no crash can lose it.
	if err := writeState(p, st); err != nil {
		return nil, err
	}
	defer func() {
		if err == nil {
			return
		}
		if st.PID > 0 {
			if terr := m.terminate(context.WithoutCancel(ctx), st, false); terr != nil {
				err = errors.Join(err, fmt.Errorf("stopping the daemon that failed (pid %d): %w", st.PID, terr))
				return // keep the state: the next Ensure or Stop finds the process
			}
		}
		if rerr := m.restoreComputeMode(g, st); rerr != nil {
			err = errors.Join(err, rerr)
			return
		}
		_ = removeState(p)
	}()
	if g.ComputeMode != nvmlib.ComputeModeExclusiveProcess {
		if err := m.lib.SetComputeMode(g.Index, nvmlib.ComputeModeExclusiveProcess); err != nil {
			return nil, fmt.Errorf("%s: setting EXCLUSIVE_PROCESS compute mode: %w", gpuName(g), err)
		}
	}
	pid, err := m.procs.Start(args, daemonEnv(g.UUID, p), p.Output)
	if err != nil {
		return nil, fmt.Errorf("%s: starting %s: %w", gpuName(g), m.control, err)
	}
	st.PID = pid
	if info, ok, lerr := m.procs.Lookup(pid); lerr == nil && ok {
		st.StartTicks = info.StartTicks
	}
	if err := writeState(p, st); err != nil {
		return nil, err
	}
	if err := m.waitReady(ctx, st, p); err != nil {
		return nil, fmt.Errorf("%s: %w", gpuName(g), err)
	}
	d = &Daemon{m: m, gpu: g, paths: p, st: *st}
	if err := d.sendLimits(ctx, Limits{}, cfg.Limits, nil); err != nil {
		return nil, err
	}
	d.st.Limits = cfg.Limits
	if err := writeState(p, &d.st); err != nil {
		return nil, err
	}
	*st = d.st
	klog.InfoS("Started MPS control daemon", "gpu", g.Index, "uuid", g.UUID, "pid", pid, "limits", cfg.Limits.String(), "multiUser", cfg.MultiUser, "previousComputeMode", previous)
	return d, nil
}

// waitReady waits until the new daemon accepts commands, fails if it exits first or takes longer
// than the ready timeout.
func (m *Manager) waitReady(ctx context.Context, st *state, p Paths) error {
	deadline := m.clock.Now().Add(m.readyTimeout)
	for {
		if why := m.identify(st); why != "" {
			return fmt.Errorf("the MPS control daemon exited at start (%s)%s", why, outputTail(p.Output))
		}
		ok, err := m.ready(p.Pipe, st.PID)
		if err != nil {
			return fmt.Errorf("checking whether the MPS control daemon (pid %d) is ready: %w", st.PID, err)
		}
		if ok {
			return nil
		}
		if m.clock.Now().After(deadline) {
			return fmt.Errorf("the MPS control daemon (pid %d) did not create %s/%s within %s%s", st.PID, p.Pipe, daemonSocket, m.readyTimeout, outputTail(p.Output))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.clock.After(m.poll):
		}
	}
}

// socketReady is the default ReadyFunc: the daemon has made its control socket or PID file.
func socketReady(pipe string, _ int) (bool, error) {
	for _, name := range []string{daemonSocket, daemonPidFile} {
		if _, err := os.Stat(filepath.Join(pipe, name)); err == nil {
			return true, nil
		}
	}
	return false, nil
}

// terminate stops the daemon st records: quit (if asked), then SIGTERM and SIGKILL to its process
// group, each after the stop timeout.
func (m *Manager) terminate(ctx context.Context, st *state, quit bool) error {
	if quit {
		d := &Daemon{m: m, st: *st}
		if _, err := d.command(ctx, "quit"); err != nil {
			klog.InfoS("MPS control daemon did not take quit; signalling it", "pid", st.PID, "err", err)
		} else if m.waitExit(ctx, st) {
			return nil
		}
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		if m.identify(st) != "" {
			return nil
		}
		klog.InfoS("Signalling MPS control daemon", "pid", st.PID, "signal", sig)
		if err := m.procs.Signal(st.PID, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			return err
		}
		if m.waitExit(ctx, st) {
			return nil
		}
	}
	return fmt.Errorf("pid %d is still running after SIGKILL", st.PID)
}

// waitExit waits up to the stop timeout for the daemon to be gone.
func (m *Manager) waitExit(ctx context.Context, st *state) bool {
	deadline := m.clock.Now().Add(m.stopTimeout)
	for {
		if m.identify(st) != "" {
			return true
		}
		if m.clock.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-m.clock.After(m.poll):
		}
	}
}

// restoreComputeMode puts the GPU back into the mode it had before MPS, unless someone changed it
// from EXCLUSIVE_PROCESS since (then it is theirs) or it was EXCLUSIVE_PROCESS before.
func (m *Manager) restoreComputeMode(g nvmlib.GPU, st *state) error {
	prev := st.PreviousComputeMode
	if prev == "" {
		prev = nvmlib.ComputeModeDefault
	}
	cur, err := m.lib.GPU(g.Index)
	if err != nil {
		return fmt.Errorf("%s: reading its compute mode to restore %s: %w", gpuName(g), prev, err)
	}
	if cur.UUID != g.UUID || cur.ComputeMode != nvmlib.ComputeModeExclusiveProcess || prev == nvmlib.ComputeModeExclusiveProcess {
		return nil
	}
	if err := m.lib.SetComputeMode(g.Index, prev); err != nil {
		return fmt.Errorf("%s: restoring compute mode %s: %w", gpuName(g), prev, err)
	}
	return nil
}

// daemonEnv is the control daemon's environment: this process's, without any CUDA variable, plus
// the GPU and the daemon's directories.
func daemonEnv(uuid string, p Paths) []string {
	return append(baseEnv(), EnvVisibleDevices+"="+uuid, EnvPipeDirectory+"="+p.Pipe, EnvLogDirectory+"="+p.Log)
}

// baseEnv is this process's environment without CUDA variables, which would change what a daemon
// or a control client sees.
func baseEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CUDA_") {
			out = append(out, kv)
		}
	}
	return out
}

// outputTail is the end of a daemon's output file, for errors.
func outputTail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil || len(strings.TrimSpace(string(data))) == 0 {
		return ""
	}
	s := strings.TrimSpace(string(data))
	if len(s) > 1000 {
		s = "…" + s[len(s)-1000:]
	}
	return "; its output: " + s
}
