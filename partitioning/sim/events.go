package sim

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Events injected into a simulated node (by the CLI, a test, another process) are appended to
// <dir>/events.jsonl. An NVML event set created in any process reads the file from the position it had
// when the set was created, so a running plugin receives what `tessera sim inject` wrote.

type eventRecord struct {
	Time time.Time `json:"time"`
	GPU  int       `json:"gpu"`
	// Type is NVML's event type bit (EventTypeXidCriticalError, …).
	Type uint64 `json:"type"`
	// Data is the XID for XID events.
	Data uint64 `json:"data"`
	GI   int    `json:"gpuInstance"`
	CI   int    `json:"computeInstance"`
}

func (n *Node) eventsPath() string { return filepath.Join(n.store.dir, "events.jsonl") }

func (n *Node) appendEvent(r eventRecord) error {
	unlock, err := flock(filepath.Join(n.store.dir, "events.lock"), syscall.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	f, err := os.OpenFile(n.eventsPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	data, _ := json.Marshal(r)
	if _, err := f.Write(append(data, '\n')); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// eventPoll is how often a waiting event set looks for new events.
const eventPoll = 20 * time.Millisecond

type eventSet struct {
	nvml.EventSet
	node *Node

	mu      sync.Mutex
	offset  int64
	masks   map[int]uint64
	devs    map[int]*device
	pending []eventRecord
	freed   bool
}

func (n *Node) newEventSet() (*eventSet, error) {
	var off int64
	if fi, err := os.Stat(n.eventsPath()); err == nil {
		off = fi.Size()
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	return &eventSet{node: n, offset: off, masks: map[int]uint64{}, devs: map[int]*device{}}, nil
}

func (e *eventSet) register(d *device, types uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.masks[d.index] |= types
	e.devs[d.index] = d
}

// readNew reads complete lines appended since the last read and queues the events this set watches.
func (e *eventSet) readNew() error {
	f, err := os.Open(e.node.eventsPath())
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < e.offset { // the file was wiped: start over
		e.offset = 0
	}
	if fi.Size() == e.offset {
		return nil
	}
	if _, err := f.Seek(e.offset, io.SeekStart); err != nil {
		return err
	}
	r := bufio.NewReader(f)
	for {
		line, err := r.ReadBytes('\n')
		if err == io.EOF {
			return nil // an incomplete line is read next time
		}
		if err != nil {
			return err
		}
		e.offset += int64(len(line))
		var rec eventRecord
		if json.Unmarshal(bytes.TrimSpace(line), &rec) != nil {
			continue
		}
		if e.masks[rec.GPU]&rec.Type != 0 {
			e.pending = append(e.pending, rec)
		}
	}
}

// Wait returns the next event, or ERROR_TIMEOUT after timeoutMs milliseconds.
func (e *eventSet) Wait(timeoutMs uint32) (nvml.EventData, nvml.Return) {
	deadline := time.Now().Add(time.Duration(timeoutMs) * time.Millisecond)
	for {
		e.mu.Lock()
		if e.freed {
			e.mu.Unlock()
			return nvml.EventData{}, nvml.ERROR_UNINITIALIZED
		}
		if err := e.readNew(); err != nil {
			e.mu.Unlock()
			return nvml.EventData{}, nvml.ERROR_UNKNOWN
		}
		if len(e.pending) > 0 {
			rec := e.pending[0]
			e.pending = e.pending[1:]
			d := e.devs[rec.GPU]
			e.mu.Unlock()
			ev := nvml.EventData{Device: d, EventType: rec.Type, EventData: rec.Data, GpuInstanceId: 0xFFFFFFFF, ComputeInstanceId: 0xFFFFFFFF}
			if rec.GI >= 0 {
				ev.GpuInstanceId, ev.ComputeInstanceId = uint32(rec.GI), uint32(rec.CI)
			}
			return ev, nvml.SUCCESS
		}
		e.mu.Unlock()
		if !time.Now().Before(deadline) {
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		}
		time.Sleep(min(eventPoll, time.Until(deadline)))
	}
}

func (e *eventSet) Free() nvml.Return {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.freed = true
	return nvml.SUCCESS
}

// checkGPU validates a GPU index for control operations.
func (n *Node) checkGPU(gpu int) error {
	if gpu < 0 || gpu >= len(n.store.node.GPUs) {
		return fmt.Errorf("--gpu %d: the node %q has GPUs 0 to %d", gpu, n.store.node.Spec.Name, len(n.store.node.GPUs)-1)
	}
	return nil
}
