package mps

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Daemon is one GPU's MPS control daemon. Its methods re-read the state file under the GPU's lock,
// so Daemons of the same GPU in several processes see each other's changes.
type Daemon struct {
	m       *Manager
	gpu     nvmlib.GPU
	paths   Paths
	st      state
	adopted bool
}

// GPU is the GPU the daemon serves, as NVML described it when the Daemon was made.
func (d *Daemon) GPU() nvmlib.GPU { return d.gpu }

// PID is the control daemon's process ID.
func (d *Daemon) PID() int { return d.st.PID }

// Adopted reports whether the daemon was already running (started by an earlier process or
// another Manager) rather than started by the call that returned this Daemon.
func (d *Daemon) Adopted() bool { return d.adopted }

// Paths are the daemon's files on the host.
func (d *Daemon) Paths() Paths { return d.paths }

// Limits are the daemon's limits for every client, as last sent to it.
func (d *Daemon) Limits() Limits { return d.st.Limits }

// MultiUser reports whether the daemon runs with -multiuser-server.
func (d *Daemon) MultiUser() bool { return d.st.MultiUser }

// PreviousComputeMode is the compute mode Stop restores.
func (d *Daemon) PreviousComputeMode() nvmlib.ComputeMode { return d.st.PreviousComputeMode }

// Command sends one command line to the control daemon (as `echo LINE | nvidia-cuda-mps-control`
// with the daemon's pipe directory) and returns what the control program printed.
func (d *Daemon) Command(ctx context.Context, line string) (string, error) {
	return d.command(ctx, line)
}

func (d *Daemon) command(ctx context.Context, line string) (string, error) {
	if strings.ContainsAny(line, "\n\r") {
		return "", fmt.Errorf("MPS control command %q: one line only", line)
	}
	ctx, cancel := context.WithTimeout(ctx, d.m.commandTimeout)
	defer cancel()
	env := append(baseEnv(), EnvPipeDirectory+"="+d.st.PipeDir, EnvLogDirectory+"="+d.st.LogDir)
	out, err := d.m.procs.Run(ctx, []string{d.st.Control}, env, line+"\n")
	klog.V(4).InfoS("MPS control command", "pipe", d.st.PipeDir, "command", line, "output", strings.TrimSpace(out), "err", err)
	if err != nil {
		if t := strings.TrimSpace(out); t != "" && !strings.Contains(err.Error(), t) {
			err = fmt.Errorf("%w: %s", err, t)
		}
		return out, fmt.Errorf("MPS control command %q (pipe directory %s): %w", line, d.st.PipeDir, err)
	}
	return out, nil
}

// ServerPIDs lists the MPS servers the daemon runs now (get_server_list).
func (d *Daemon) ServerPIDs(ctx context.Context) ([]int, error) {
	out, err := d.command(ctx, "get_server_list")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(out) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid <= 0 {
			return nil, fmt.Errorf("MPS control command get_server_list printed %q, not a list of PIDs", strings.TrimSpace(out))
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// SetLimits changes the daemon's limits for every client: as defaults for servers it starts later,
// and for each server running now (for its clients that connect from now on; clients already
// connected keep the limits they started with, as MPS does). Lowering a limit below what a
// registered client was given is refused.
func (d *Daemon) SetLimits(ctx context.Context, l Limits) error {
	if err := l.validate("limits", d.gpu); err != nil {
		return fmt.Errorf("%s: %w", gpuName(d.gpu), err)
	}
	return d.locked(ctx, func() error { return d.setLimitsLocked(ctx, l) })
}

func (d *Daemon) setLimitsLocked(ctx context.Context, l Limits) error {
	for _, c := range d.st.Clients {
		if err := fitsUnder(l, c.Limits); err != nil {
			return fmt.Errorf("%s: client %s: %w: remove the client first", gpuName(d.gpu), c.ID, err)
		}
	}
	servers, err := d.ServerPIDs(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", gpuName(d.gpu), err)
	}
	if err := d.sendLimits(ctx, d.st.Limits, l, servers); err != nil {
		return err
	}
	d.st.Limits = l
	return writeState(d.paths, &d.st)
}

// sendLimits sends the commands that change the daemon's limits from old to l: defaults, and the
// same limits for each running server.
func (d *Daemon) sendLimits(ctx context.Context, old, l Limits, servers []int) error {
	var cmds []string
	if l.ActiveThreadPercentage != old.ActiveThreadPercentage {
		v := strconv.Itoa(cmp0(l.ActiveThreadPercentage, 100))
		cmds = append(cmds, "set_default_active_thread_percentage "+v)
		for _, pid := range servers {
			cmds = append(cmds, "set_active_thread_percentage "+strconv.Itoa(pid)+" "+v)
		}
	}
	if l.PinnedMemoryMiB != old.PinnedMemoryMiB {
		mib := l.PinnedMemoryMiB
		if mib == 0 {
			// MPS has no command to remove a memory limit; the GPU's whole memory is none.
			mib = d.gpu.MemoryMiB
		}
		if mib > 0 {
			v := memValue(mib)
			cmds = append(cmds, "set_default_device_pinned_mem_limit "+daemonDevice+" "+v)
			for _, pid := range servers {
				cmds = append(cmds, "set_device_pinned_mem_limit "+strconv.Itoa(pid)+" "+daemonDevice+" "+v)
			}
		}
	}
	for _, c := range cmds {
		if _, err := d.command(ctx, c); err != nil {
			return fmt.Errorf("%s: %w", gpuName(d.gpu), err)
		}
	}
	return nil
}

// memValue is a memory limit as MPS commands and variables take it: whole MiB with the M suffix.
func memValue(mib uint64) string { return strconv.FormatUint(mib, 10) + "M" }

func cmp0(v, zero int) int {
	if v == 0 {
		return zero
	}
	return v
}

// fitsUnder checks that a client's own limits are not above the daemon's (they could not take
// effect: a client's variables only lower the daemon's limits).
func fitsUnder(daemon, own Limits) error {
	if daemon.PinnedMemoryMiB > 0 && own.PinnedMemoryMiB > daemon.PinnedMemoryMiB {
		return fmt.Errorf("its %d MiB is above the daemon's limit of %d MiB for every client", own.PinnedMemoryMiB, daemon.PinnedMemoryMiB)
	}
	if daemon.ActiveThreadPercentage > 0 && own.ActiveThreadPercentage > daemon.ActiveThreadPercentage {
		return fmt.Errorf("its %d%% of threads is above the daemon's limit of %d%% for every client", own.ActiveThreadPercentage, daemon.ActiveThreadPercentage)
	}
	return nil
}

// Mount is a host directory a client container gets.
type Mount struct {
	HostPath      string `json:"hostPath"`
	ContainerPath string `json:"containerPath"`
	ReadOnly      bool   `json:"readOnly,omitempty"`
}

// Client is one MPS client handed out: a container (a device-plugin replica, a DRA claim).
type Client struct {
	ID string `json:"id"`
	// Limits are the client's own limits (zero fields: the daemon's).
	Limits Limits `json:"limits"`
	// Env and Mounts are what the container gets.
	Env    map[string]string `json:"env"`
	Mounts []Mount           `json:"mounts"`
	// Enforcement says how the limits hold against the container.
	Enforcement Enforcement `json:"enforcement"`
}

// ClientEnv is the environment a client container gets for its own limits own: the pipe
// directory, and a thread percentage and a memory limit if own has them. The daemon's limits bind
// the container anyway; these can only lower them.
func ClientEnv(own Limits) map[string]string {
	env := map[string]string{EnvPipeDirectory: ClientPipeDir}
	if own.ActiveThreadPercentage > 0 {
		env[EnvActiveThreadPercentage] = strconv.Itoa(own.ActiveThreadPercentage)
	}
	if own.PinnedMemoryMiB > 0 {
		env[EnvPinnedDeviceMemLimit] = daemonDevice + "=" + memValue(own.PinnedMemoryMiB)
	}
	return env
}

// ClientMounts are the host directories a client container of this daemon gets: the pipe
// directory, read-only (a client connects to the daemon's sockets; it must not replace them), at
// ClientPipeDir, and the daemons' shared-memory directory at /dev/shm. The log directory is not
// mounted: it records every client of the GPU.
func (d *Daemon) ClientMounts() []Mount {
	return []Mount{
		{HostPath: d.paths.Pipe, ContainerPath: ClientPipeDir, ReadOnly: true},
		{HostPath: d.paths.Shm, ContainerPath: ClientShmDir},
	}
}

func (d *Daemon) client(r clientRecord) Client {
	return Client{ID: r.ID, Limits: r.Limits, Env: ClientEnv(r.Limits), Mounts: d.ClientMounts(), Enforcement: Enforce(d.st.Limits, r.Limits)}
}

// Clients lists the registered clients, sorted by ID.
func (d *Daemon) Clients() []Client {
	out := make([]Client, 0, len(d.st.Clients))
	for _, r := range d.st.Clients {
		out = append(out, d.client(r))
	}
	return out
}

// AddClient registers a client with its own limits and returns what its container gets. Adding
// the same ID with the same limits again returns the same client. It refuses limits above the
// daemon's (they could not take effect), more than MaxClients clients, and memory limits that
// together exceed the GPU's memory.
func (d *Daemon) AddClient(ctx context.Context, id string, own Limits) (Client, error) {
	if id == "" {
		return Client{}, errors.New("a client needs an ID (a replica ID, a claim UID)")
	}
	field := "client " + strconv.Quote(id)
	if err := own.validate(field, d.gpu); err != nil {
		return Client{}, fmt.Errorf("%s: %w", gpuName(d.gpu), err)
	}
	var out Client
	err := d.locked(ctx, func() error {
		i, found := slices.BinarySearchFunc(d.st.Clients, id, func(c clientRecord, id string) int { return strings.Compare(c.ID, id) })
		if found {
			if d.st.Clients[i].Limits != own {
				return fmt.Errorf("%s: %s is registered with %s, not %s: remove it first", gpuName(d.gpu), field, d.st.Clients[i].Limits, own)
			}
			out = d.client(d.st.Clients[i])
			return nil
		}
		if err := fitsUnder(d.st.Limits, own); err != nil {
			return fmt.Errorf("%s: %s: %w: raise the daemon's limits (SetLimits) or lower the client's", gpuName(d.gpu), field, err)
		}
		if len(d.st.Clients)+1 > MaxClients {
			return fmt.Errorf("%s: %s: the daemon has %d clients, an MPS server serves at most %d per GPU", gpuName(d.gpu), field, len(d.st.Clients), MaxClients)
		}
		total := Enforce(d.st.Limits, own).MemoryLimitMiB
		for _, c := range d.st.Clients {
			total += Enforce(d.st.Limits, c.Limits).MemoryLimitMiB
		}
		if d.gpu.MemoryMiB > 0 && total > d.gpu.MemoryMiB {
			return fmt.Errorf("%s: %s: with it the clients' memory limits add up to %d MiB, the GPU has %d MiB: lower its limit or remove clients", gpuName(d.gpu), field, total, d.gpu.MemoryMiB)
		}
		r := clientRecord{ID: id, Limits: own}
		d.st.Clients = slices.Insert(d.st.Clients, i, r)
		if err := writeState(d.paths, &d.st); err != nil {
			return err
		}
		out = d.client(r)
		return nil
	})
	return out, err
}

// RemoveClient unregisters a client; an unknown ID is not an error.
func (d *Daemon) RemoveClient(ctx context.Context, id string) error {
	return d.locked(ctx, func() error {
		n := len(d.st.Clients)
		d.st.Clients = slices.DeleteFunc(d.st.Clients, func(c clientRecord) bool { return c.ID == id })
		if len(d.st.Clients) == n {
			return nil
		}
		return writeState(d.paths, &d.st)
	})
}

// locked runs fn under the GPU's lock with the state re-read from disk, after checking that the
// daemon still runs.
func (d *Daemon) locked(ctx context.Context, fn func() error) error {
	unlock, err := lockFile(ctx, d.paths.Lock)
	if err != nil {
		return err
	}
	defer unlock()
	st, err := readState(d.paths.State)
	if err != nil {
		return err
	}
	if st == nil || st.PID != d.st.PID {
		return fmt.Errorf("%s: the MPS daemon (pid %d) was stopped or replaced: %w", gpuName(d.gpu), d.st.PID, ErrNotRunning)
	}
	if why := d.m.identify(st); why != "" {
		return fmt.Errorf("%s: %w (%s)", gpuName(d.gpu), ErrNotRunning, why)
	}
	d.st = *st
	return fn()
}
