// Package sim is Tessera's simulated GPU node: a faithful stand-in for NVML on a machine without
// GPUs. It serves go-nvml's nvml.Interface from state kept on disk, enforces the MIG rules of real
// hardware with NVML's return codes, synthesizes MIG device handles, delivers injected XID/ECC events
// across processes, simulates GPU resets and node reboots, and lays out a host filesystem (/dev, /proc,
// driver root) so that CDI specs and containers on a simulated node look like the real thing.
package sim

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Node is an open simulated node.
type Node struct {
	store *store
	host  hostSyncer
}

// hostSyncer keeps the simulated host filesystem in step with the GPUs' MIG state.
type hostSyncer interface {
	syncMIG(gpu int, st *gpuState) error
}

// DefaultStateDir is where a node keeps its state when no directory is given:
// /var/lib/tessera/sim/<node> for root, else $XDG_STATE_HOME (or ~/.local/state)/tessera/sim/<node>.
func DefaultStateDir(node string) string {
	if os.Geteuid() == 0 {
		return filepath.Join("/var/lib/tessera/sim", node)
	}
	base := os.Getenv("XDG_STATE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = os.TempDir()
		}
		base = filepath.Join(home, ".local", "state")
	}
	return filepath.Join(base, "tessera", "sim", node)
}

// Open opens a node's state directory, creating it (GPUs fresh from the factory: MIG off, no
// instances) on first use. stateDir "" means DefaultStateDir.
func Open(spec NodeSpec, stateDir string) (*Node, error) {
	r, err := Resolve(spec)
	if err != nil {
		return nil, err
	}
	if stateDir == "" {
		stateDir = DefaultStateDir(spec.Name)
	}
	s, err := openStore(stateDir, r)
	if err != nil {
		return nil, err
	}
	n := &Node{store: s}
	h, err := newHost(n)
	if err != nil {
		return nil, err
	}
	n.host = h
	return n, nil
}

// ParseTarget reads a backend value's simulator part: "sim:<node>" or "sim-file:<path>".
func ParseTarget(v string) (NodeSpec, error) {
	switch {
	case strings.HasPrefix(v, "sim:"):
		return BuiltinNode(strings.TrimPrefix(v, "sim:"))
	case strings.HasPrefix(v, "sim-file:"):
		return LoadNodeFile(strings.TrimPrefix(v, "sim-file:"))
	}
	return NodeSpec{}, fmt.Errorf("%q is not a simulated node: use sim:<node> (one of %s) or sim-file:<path>", v, strings.Join(BuiltinNodes(), ", "))
}

// Dir returns the state directory.
func (n *Node) Dir() string { return n.store.dir }

// Spec returns the node as laid out.
func (n *Node) Spec() *Resolved { return n.store.node }

// BootID returns the node's current boot ID; a simulated reboot changes it.
func (n *Node) BootID() (string, error) {
	ns, err := n.store.readNode()
	return ns.BootID, err
}

// Wipe deletes a node's state directory: the next Open starts from the factory state.
func Wipe(stateDir string) error {
	if _, err := os.Stat(filepath.Join(stateDir, "node.json")); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return os.RemoveAll(stateDir)
}

// syncHost brings the host filesystem's MIG capability files in line with GPU i's state.
func (n *Node) syncHost(i int) {
	if n.host == nil {
		return
	}
	st, err := n.store.readGPU(i)
	if err == nil {
		err = n.host.syncMIG(i, st)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "simulated node: updating host files of GPU %d: %v\n", i, err)
	}
}

// Control operations: what tests, users and `tessera sim` do to a simulated node from outside NVML.

// InjectXID records an XID error on a GPU (gi/ci ≥ 0 for one MIG device) and delivers it as an NVML
// event to every event set watching the GPU. XID 79 (fallen off the bus) also marks the GPU lost.
func (n *Node) InjectXID(gpu int, xid uint64, gi, ci int) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	if err := n.store.updateGPU(gpu, func(st *gpuState) error {
		st.LastXID = xid
		switch xid {
		case 79:
			st.Lost = true
		case 48, 95: // double-bit / uncontained ECC errors count as uncorrected ECC errors
			st.ECC.DoubleBit++
			st.ECC.AggregateDoubleBit++
		}
		return nil
	}); err != nil {
		return err
	}
	if gi < 0 {
		ci = -1
	}
	return n.appendEvent(eventRecord{Time: time.Now(), GPU: gpu, Type: nvml.EventTypeXidCriticalError, Data: xid, GI: gi, CI: ci})
}

// InjectECC records an ECC error on a GPU and delivers the event.
func (n *Node) InjectECC(gpu int, doubleBit bool) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	typ := uint64(nvml.EventTypeSingleBitEccError)
	if err := n.store.updateGPU(gpu, func(st *gpuState) error {
		if doubleBit {
			st.ECC.DoubleBit++
			st.ECC.AggregateDoubleBit++
		} else {
			st.ECC.SingleBit++
			st.ECC.AggregateSingleBit++
		}
		return nil
	}); err != nil {
		return err
	}
	if doubleBit {
		typ = nvml.EventTypeDoubleBitEccError
	}
	return n.appendEvent(eventRecord{Time: time.Now(), GPU: gpu, Type: typ, GI: -1, CI: -1})
}

// InjectGPULost makes a GPU fall off the bus: XID 79, and every NVML call on it returns
// ERROR_GPU_IS_LOST until the GPU is reset, the node reboots, or the fault is cleared.
func (n *Node) InjectGPULost(gpu int) error { return n.InjectXID(gpu, 79, -1, -1) }

// Settings are readings and modes a user may set on a GPU; nil fields stay as they are.
type Settings struct {
	UtilizationGPU    *int
	UtilizationMemory *int
	MemoryUsedMiB     *uint64
	PowerMilliwatts   *int
	TemperatureC      *int
	SMClockMHz        *int
}

// Set changes a GPU's readings.
func (n *Node) Set(gpu int, s Settings) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	m := n.store.node.Model(gpu)
	pct := func(name string, v *int) error {
		if v != nil && (*v < 0 || *v > 100) {
			return fmt.Errorf("--%s %d: a percentage is 0 to 100", name, *v)
		}
		return nil
	}
	if err := errors.Join(pct("utilization", s.UtilizationGPU), pct("memory-utilization", s.UtilizationMemory)); err != nil {
		return err
	}
	if s.MemoryUsedMiB != nil && *s.MemoryUsedMiB > m.MemoryMiB {
		return fmt.Errorf("--memory-used %d: GPU %d (%s) has %d MiB", *s.MemoryUsedMiB, gpu, m.Name, m.MemoryMiB)
	}
	if s.PowerMilliwatts != nil && (*s.PowerMilliwatts < 0 || *s.PowerMilliwatts > 2*m.PowerLimitW*1000) {
		return fmt.Errorf("--power %d mW: use 0 to %d mW for %s", *s.PowerMilliwatts, 2*m.PowerLimitW*1000, m.Name)
	}
	if s.TemperatureC != nil && (*s.TemperatureC < 0 || *s.TemperatureC > 120) {
		return fmt.Errorf("--temperature %d: use 0 to 120 °C", *s.TemperatureC)
	}
	if s.SMClockMHz != nil && (*s.SMClockMHz < 0 || *s.SMClockMHz > 4000) {
		return fmt.Errorf("--sm-clock %d: use 0 to 4000 MHz", *s.SMClockMHz)
	}
	return n.store.updateGPU(gpu, func(st *gpuState) error {
		r := &st.Readings
		setIf(&r.UtilGPU, s.UtilizationGPU)
		setIf(&r.UtilMemory, s.UtilizationMemory)
		setIf(&r.MemUsedMiB, s.MemoryUsedMiB)
		setIf(&r.PowerMW, s.PowerMilliwatts)
		setIf(&r.TempC, s.TemperatureC)
		setIf(&r.SMClockMHz, s.SMClockMHz)
		return nil
	})
}

func setIf[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}

// AddProcess starts a simulated compute process on a GPU (gi/ci ≥ 0 to run it on a MIG device).
// Processes make MIG changes wait as they do on hardware.
func (n *Node) AddProcess(gpu, pid int, memMiB uint64, gi, ci int) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	if pid <= 0 {
		return fmt.Errorf("--pid %d: a process ID is positive", pid)
	}
	return n.store.updateGPU(gpu, func(st *gpuState) error {
		if st.Lost {
			return fmt.Errorf("GPU %d is lost: clear the fault or reset the GPU first", gpu)
		}
		if gi >= 0 {
			i, ok := findGI(st, gi)
			found := false
			if ok {
				for _, c := range st.GIs[i].CIs {
					found = found || c.ID == ci
				}
			}
			if !found {
				return fmt.Errorf("GPU %d has no MIG device gi %d / ci %d", gpu, gi, ci)
			}
		} else {
			gi, ci = -1, -1
		}
		for _, p := range st.Processes {
			if p.PID == pid {
				return fmt.Errorf("process %d already runs on GPU %d", pid, gpu)
			}
		}
		st.Processes = append(st.Processes, procState{PID: pid, MemMiB: memMiB, GI: gi, CI: ci})
		return nil
	})
}

// SetProcessUtilization sets the SM utilization (0–100 %) NVML reports for one process on a GPU.
func (n *Node) SetProcessUtilization(gpu, pid, smPercent int) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	if smPercent < 0 || smPercent > 100 {
		return fmt.Errorf("--sm-percent %d: a percentage is 0 to 100", smPercent)
	}
	return n.store.updateGPU(gpu, func(st *gpuState) error {
		for i := range st.Processes {
			if st.Processes[i].PID == pid {
				st.Processes[i].SMPercent = smPercent
				return nil
			}
		}
		return fmt.Errorf("no process %d runs on GPU %d (start it with `tessera sim process start`)", pid, gpu)
	})
}

// EndProcesses ends the simulated processes on a GPU (pid 0: all of them).
func (n *Node) EndProcesses(gpu, pid int) error {
	if err := n.checkGPU(gpu); err != nil {
		return err
	}
	return n.store.updateGPU(gpu, func(st *gpuState) error {
		kept := st.Processes[:0]
		for _, p := range st.Processes {
			if pid != 0 && p.PID != pid {
				kept = append(kept, p)
			}
		}
		st.Processes = kept
		return nil
	})
}

// Clear removes injected faults: a lost GPU is back, ECC counts and the last XID are cleared. gpu -1
// clears every GPU.
func (n *Node) Clear(gpu int) error {
	return n.eachGPU(gpu, func(i int, st *gpuState) {
		st.Lost = false
		st.ECC = eccCounts{}
		st.LastXID = 0
	})
}

// ResetGPU resets a GPU as `nvidia-smi -r` does (gpu -1: every GPU): the pending MIG mode applies,
// GPU and compute instances and processes are gone, faults are cleared.
func (n *Node) ResetGPU(gpu int) error {
	return n.eachGPU(gpu, func(i int, st *gpuState) {
		resetGPU(st, n.store.node.Model(i))
		st.ECC.SingleBit, st.ECC.DoubleBit = 0, 0 // volatile counters restart; aggregates persist
		st.LastXID = 0
	})
}

// Reboot simulates a node reboot: a new boot ID; MIG mode survives (the pending mode applies), GPU and
// compute instances do not; processes end and faults clear.
func (n *Node) Reboot() error {
	unlock, err := flock(filepath.Join(n.store.dir, "node.lock"), syscall.LOCK_EX)
	if err != nil {
		return err
	}
	ns, err := n.store.readNode()
	if err != nil {
		unlock()
		return err
	}
	ns.BootID = newBootID()
	ns.Boots++
	err = writeJSONAtomic(filepath.Join(n.store.dir, "node.json"), ns)
	unlock()
	if err != nil {
		return err
	}
	return n.ResetGPU(-1)
}

func (n *Node) eachGPU(gpu int, fn func(int, *gpuState)) error {
	idx := []int{gpu}
	if gpu < 0 {
		idx = idx[:0]
		for i := range n.store.node.GPUs {
			idx = append(idx, i)
		}
	} else if err := n.checkGPU(gpu); err != nil {
		return err
	}
	for _, i := range idx {
		if err := n.store.updateGPU(i, func(st *gpuState) error { fn(i, st); return nil }); err != nil {
			return err
		}
		n.syncHost(i)
	}
	return nil
}

// GPUStatus is what `tessera sim status` shows of a GPU beyond what NVML tells.
type GPUStatus struct {
	Index     int    `json:"index"`
	Lost      bool   `json:"lost"`
	LastXID   uint64 `json:"lastXID,omitempty"`
	ECCSingle uint64 `json:"eccSingleBit"`
	ECCDouble uint64 `json:"eccDoubleBit"`
	Processes int    `json:"processes"`
}

// Status reports every GPU's simulator-side state.
func (n *Node) Status() ([]GPUStatus, error) {
	var out []GPUStatus
	for i := range n.store.node.GPUs {
		st, err := n.store.readGPU(i)
		if err != nil {
			return nil, err
		}
		out = append(out, GPUStatus{Index: i, Lost: st.Lost, LastXID: st.LastXID, ECCSingle: st.ECC.SingleBit, ECCDouble: st.ECC.DoubleBit, Processes: len(st.Processes)})
	}
	return out, nil
}
