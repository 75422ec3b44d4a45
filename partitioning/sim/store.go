package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/google/uuid"
)

// The simulator keeps its state in a directory, like a GPU keeps its MIG mode across process
// restarts. Several processes (a device plugin, a DRA driver, the CLI) share it: each GPU has its own
// state file guarded by its own lock file (flock) and an in-process mutex, so operations on different
// GPUs never wait for each other. Writes replace the file atomically.
//
//	<dir>/node.json        the resolved node, boot ID (rewritten only by a simulated reboot)
//	<dir>/gpu<N>.json      GPU N's mutable state; gpu<N>.lock guards it
//	<dir>/events.jsonl     injected events, appended; events.lock guards appends
//	<dir>/host/            the simulated host filesystem (dev, proc, driver root)
const stateVersion = 1

type nodeState struct {
	Version int       `json:"version"`
	Node    *Resolved `json:"node"`
	BootID  string    `json:"bootID"`
	Boots   int       `json:"boots"`
}

type gpuState struct {
	MigEnabled  bool        `json:"migEnabled"`
	MigPending  bool        `json:"migPending"`
	ComputeMode int         `json:"computeMode"`
	Lost        bool        `json:"lost,omitempty"`
	GIs         []giState   `json:"gpuInstances,omitempty"`
	MigSerial   uint64      `json:"migSerial"`
	Readings    readings    `json:"readings"`
	Processes   []procState `json:"processes,omitempty"`
	ECC         eccCounts   `json:"ecc"`
	LastXID     uint64      `json:"lastXID,omitempty"`
}

type giState struct {
	ID        int       `json:"id"`
	ProfileID int       `json:"profileID"`
	Start     int       `json:"start"`
	Size      int       `json:"size"`
	CIs       []ciState `json:"computeInstances,omitempty"`
}

type ciState struct {
	ID     int    `json:"id"`
	Slices int    `json:"slices"`
	Start  int    `json:"start"`
	UUID   string `json:"uuid"`
}

type readings struct {
	UtilGPU    int    `json:"utilizationGPU"`
	UtilMemory int    `json:"utilizationMemory"`
	MemUsedMiB uint64 `json:"memoryUsedMiB"`
	PowerMW    int    `json:"powerMilliwatts"`
	TempC      int    `json:"temperatureC"`
	SMClockMHz int    `json:"smClockMHz"`
}

type procState struct {
	PID    int    `json:"pid"`
	MemMiB uint64 `json:"memoryMiB"`
	GI     int    `json:"gpuInstance"`
	CI     int    `json:"computeInstance"`
	// SMPercent is the process's share of the GPU's SMs over the last sample (NVML's process
	// utilization), settable with SetProcessUtilization.
	SMPercent int `json:"smPercent,omitempty"`
}

// eccCounts are volatile counters (a GPU reset clears them) and their aggregates (which persist).
type eccCounts struct {
	SingleBit          uint64 `json:"singleBit"`
	DoubleBit          uint64 `json:"doubleBit"`
	AggregateSingleBit uint64 `json:"aggregateSingleBit"`
	AggregateDoubleBit uint64 `json:"aggregateDoubleBit"`
}

type fileKey struct {
	ino  uint64
	size int64
	mod  int64
}

// store is one process's view of a state directory.
type store struct {
	dir  string
	node *Resolved
	gpus []*gpuFile
}

type gpuFile struct {
	mu     sync.Mutex
	path   string
	lock   string
	key    fileKey
	cached *gpuState
}

func statKey(path string) (fileKey, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileKey{}, err
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	k := fileKey{size: fi.Size(), mod: fi.ModTime().UnixNano()}
	if st != nil {
		k.ino = st.Ino
	}
	return k, nil
}

// flock takes a lock file's flock until the returned function is called.
func flock(path string, how int) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

func writeJSONAtomic(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return nil
}

func newBootID() string { return uuid.NewString() }

// openStore opens (creating on first use) the state directory of a node.
func openStore(dir string, r *Resolved) (*store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating simulator state directory: %w (set another with --sim-state-dir or TESSERA_SIM_STATE)", err)
	}
	unlock, err := flock(filepath.Join(dir, "node.lock"), syscall.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlock()
	nodePath := filepath.Join(dir, "node.json")
	var ns nodeState
	data, err := os.ReadFile(nodePath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		ns = nodeState{Version: stateVersion, Node: r, BootID: newBootID(), Boots: 1}
		if err := writeJSONAtomic(nodePath, ns); err != nil {
			return nil, fmt.Errorf("writing simulator state: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("reading simulator state: %w", err)
	default:
		if err := json.Unmarshal(data, &ns); err != nil || ns.Node == nil {
			return nil, fmt.Errorf("simulator state %s is damaged (%v): remove the directory or run `tessera sim wipe` to start the node afresh", nodePath, err)
		}
		if ns.Version != stateVersion {
			return nil, fmt.Errorf("simulator state %s has version %d, this build reads %d: run `tessera sim wipe`", nodePath, ns.Version, stateVersion)
		}
		if err := ns.Node.rehydrate(); err != nil {
			return nil, err
		}
		if !sameNode(ns.Node, r) {
			return nil, fmt.Errorf("simulator state directory %s holds node %q (%d GPUs), not %q (%d GPUs): choose another --sim-state-dir, or run `tessera sim wipe` to replace it",
				dir, ns.Node.Spec.Name, len(ns.Node.GPUs), r.Spec.Name, len(r.GPUs))
		}
	}
	s := &store{dir: dir, node: ns.Node}
	for i := range ns.Node.GPUs {
		gf := &gpuFile{path: filepath.Join(dir, fmt.Sprintf("gpu%d.json", i)), lock: filepath.Join(dir, fmt.Sprintf("gpu%d.lock", i))}
		if _, err := os.Stat(gf.path); errors.Is(err, fs.ErrNotExist) {
			if err := writeJSONAtomic(gf.path, initialGPUState(ns.Node, i)); err != nil {
				return nil, fmt.Errorf("writing simulator state: %w", err)
			}
		}
		s.gpus = append(s.gpus, gf)
	}
	return s, nil
}

func sameNode(a, b *Resolved) bool {
	if a.Spec.Name != b.Spec.Name || len(a.GPUs) != len(b.GPUs) || a.Spec.DriverVersion != b.Spec.DriverVersion {
		return false
	}
	for i := range a.GPUs {
		if a.GPUs[i] != b.GPUs[i] {
			return false
		}
	}
	return true
}

func initialGPUState(r *Resolved, i int) gpuState {
	m := r.Model(i)
	return gpuState{
		Readings: readings{PowerMW: m.IdlePowerW * 1000, TempC: 31, SMClockMHz: idleClockMHz},
	}
}

const idleClockMHz = 345

// readGPU returns GPU i's state. The result is shared: callers must not modify it.
func (s *store) readGPU(i int) (*gpuState, error) {
	gf := s.gpus[i]
	gf.mu.Lock()
	defer gf.mu.Unlock()
	k, err := statKey(gf.path)
	if err != nil {
		return nil, err
	}
	if gf.cached != nil && k == gf.key {
		return gf.cached, nil
	}
	unlock, err := flock(gf.lock, syscall.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	st, k, err := loadGPU(gf.path)
	if err != nil {
		return nil, err
	}
	gf.cached, gf.key = st, k
	return st, nil
}

func loadGPU(path string) (*gpuState, fileKey, error) {
	k, err := statKey(path)
	if err != nil {
		return nil, k, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, k, err
	}
	var st gpuState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, k, fmt.Errorf("simulator state %s is damaged: %w", path, err)
	}
	return &st, k, nil
}

// errAbort tells updateGPU to write nothing.
var errAbort = errors.New("abort")

// updateGPU runs fn on a fresh copy of GPU i's state under the GPU's locks and saves the result
// unless fn returns an error.
func (s *store) updateGPU(i int, fn func(*gpuState) error) error {
	gf := s.gpus[i]
	gf.mu.Lock()
	defer gf.mu.Unlock()
	unlock, err := flock(gf.lock, syscall.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	st, _, err := loadGPU(gf.path)
	if err != nil {
		return err
	}
	if err := fn(st); err != nil {
		return err
	}
	if err := writeJSONAtomic(gf.path, st); err != nil {
		return err
	}
	gf.cached = nil
	return nil
}

// readNode re-reads node.json (its boot ID changes with a simulated reboot).
func (s *store) readNode() (nodeState, error) {
	var ns nodeState
	data, err := os.ReadFile(filepath.Join(s.dir, "node.json"))
	if err != nil {
		return ns, err
	}
	err = json.Unmarshal(data, &ns)
	return ns, err
}
