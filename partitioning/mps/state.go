package mps

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Files under a GPU's directory (<root>/<gpu-uuid>/).
const (
	stateFile  = "state.json" // what the daemon is and what it was told; see state
	pidFile    = "daemon.pid" // the control daemon's PID, one decimal line, for people and probes
	outputFile = "daemon.out" // the control daemon's stdout and stderr
	lockName   = "lock"       // flock held while the daemon is started, adopted, changed or stopped
	pipeName   = "pipe"       // CUDA_MPS_PIPE_DIRECTORY
	logName    = "log"        // CUDA_MPS_LOG_DIRECTORY

	// daemonPidFile is the file the control daemon itself writes in its pipe directory, holding
	// its PID (NVIDIA's MPS documentation, "nvidia-cuda-mps-control").
	daemonPidFile = "nvidia-cuda-mps-control.pid"
	// daemonSocket is the control daemon's socket in its pipe directory.
	daemonSocket = "control"
)

// maxSocketPath is the longest path a Unix socket may have on Linux (sun_path holds 108 bytes with
// the terminating NUL). The daemon makes sockets named up to "control_privileged" in its pipe
// directory, so the directory's path must leave room for that.
const (
	maxSocketPath     = 107
	longestSocketName = "control_privileged"
)

const stateFormat = 1

// state is <root>/<gpu-uuid>/state.json: everything needed to re-adopt the GPU's daemon after a
// restart of whatever started it, and to undo what MPS changed on the GPU.
type state struct {
	Format   int    `json:"format"`
	GPUUUID  string `json:"gpuUUID"`
	GPUIndex int    `json:"gpuIndex"`
	// BootID is the kernel boot the daemon was started in; a PID from another boot means nothing.
	BootID string `json:"bootID,omitempty"`
	// PID is the control daemon's; 0 while it is being started.
	PID int `json:"pid"`
	// StartTicks is the daemon's start time (/proc/<pid>/stat), which tells it from a process that
	// reused its PID.
	StartTicks uint64   `json:"startTicks,omitempty"`
	Control    string   `json:"control"`
	Args       []string `json:"args"`
	PipeDir    string   `json:"pipeDir"`
	LogDir     string   `json:"logDir"`
	// PreviousComputeMode is the GPU's compute mode before MPS first took it; Stop restores it. It
	// survives daemon restarts: a new daemon started after a crash keeps the original value.
	PreviousComputeMode nvmlib.ComputeMode `json:"previousComputeMode"`
	// PreviousModeGuessed is set when the daemon was adopted from its own PID file without a state
	// file, so that the previous mode is not known (Default is assumed).
	PreviousModeGuessed bool `json:"previousComputeModeGuessed,omitempty"`
	MultiUser           bool `json:"multiUser,omitempty"`
	// Limits are the daemon's default limits as last sent to it.
	Limits Limits `json:"limits"`
	// Clients are the clients handed out, sorted by ID.
	Clients   []clientRecord `json:"clients,omitempty"`
	StartedAt time.Time      `json:"startedAt"`
}

type clientRecord struct {
	ID     string `json:"id"`
	Limits Limits `json:"limits"`
}

// readState returns the state in path, or nil if there is none.
func readState(path string) (*state, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w (remove the file if no MPS daemon runs for this GPU)", path, err)
	}
	if st.Format != stateFormat {
		return nil, fmt.Errorf("%s: format %d, this Tessera understands %d", path, st.Format, stateFormat)
	}
	return &st, nil
}

// writeState writes the state file and the PID file, each atomically.
func writeState(p Paths, st *state) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(p.State, append(data, '\n'), 0o644); err != nil {
		return err
	}
	if st.PID > 0 {
		return writeAtomic(p.PIDFile, []byte(strconv.Itoa(st.PID)+"\n"), 0o644)
	}
	return removeIfExists(p.PIDFile)
}

func removeState(p Paths) error {
	return errors.Join(removeIfExists(p.State), removeIfExists(p.PIDFile))
}

func writeAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	if werr == nil {
		werr = tmp.Chmod(perm)
	}
	if werr == nil {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), path)
	}
	if werr != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("writing %s: %w", path, werr)
	}
	return nil
}

func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// readDaemonPidFile returns the PID the control daemon wrote in its pipe directory, or 0.
func readDaemonPidFile(pipe string) int {
	data, err := os.ReadFile(filepath.Join(pipe, daemonPidFile))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// clearDir removes everything inside dir (a dead daemon's sockets, pipes and PID file), keeping dir.
func clearDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
	}
	return errors.Join(errs...)
}
