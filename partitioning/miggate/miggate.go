// Package miggate is the node-local handshake between the MIG manager (`tessera mig manager`) and
// the two front ends (device plugin, DRA driver) that serve a node's MIG devices.
//
// It is a directory of small JSON files, each written by one process with an atomic rename:
//
//   - plan.json, written by the manager: the selected layout, its state (pending, applying, success,
//     failed), the boot it was made in, the GPUs it manages, and the devices the front ends must stop
//     advertising (holds) while a change is pending or applying;
//   - ack-<front end>.json, written by each front end: the plan generation whose holds it has
//     applied, which GPUs it owns and in which mode, which held devices are still in use, and a
//     heartbeat.
//
// A change therefore goes: the manager writes holds (pending) → each front end withdraws the held
// devices and acknowledges with what is still in use → once nothing held is in use, the manager
// applies (applying) → success or failed, holds released → the front ends re-read the changed GPUs
// and advertise their new devices. Devices the change does not touch are never withdrawn.
//
// A plan from an earlier boot means MIG instances are gone (a reboot keeps MIG mode only): the front
// ends then hold every device of the GPUs that plan managed until the manager reports success in the
// current boot. No plan at all means no MIG manager runs on the node: nothing is held.
//
// Files, not the API server, carry the handshake: it works before the API server is reachable after
// a reboot, and the device plugin's Allocate path never waits for it.
package miggate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultDir is where the handshake lives on a real node. On a simulated node it is
// <sim state dir>/mig-manager, so that every process on one simulated node finds it.
const DefaultDir = "/var/lib/tessera/mig-manager"

// State is the manager's state, as in the node label tessera.dev/mig.config.state.
type State string

// States.
const (
	StatePending  State = "pending"
	StateApplying State = "applying"
	StateSuccess  State = "success"
	StateFailed   State = "failed"
)

// Front ends.
const (
	FrontEndDevicePlugin = "device-plugin"
	FrontEndDRA          = "dra"
)

// Hold is what a front end must not advertise on one GPU.
type Hold struct {
	// All holds every device of the GPU (its MIG mode changes, or its layout is unknown after a
	// reboot).
	All bool `json:"all,omitempty"`
	// Placements holds the MIG devices whose GPU instance starts at these memory-slice placements
	// (the instances the change destroys).
	Placements []int `json:"placements,omitempty"`
}

// Covers reports whether the hold covers a device of its GPU: the whole GPU (mig nil) or the MIG
// device whose GPU instance starts at placement start.
func (h Hold) Covers(isMIG bool, start int) bool {
	if h.All {
		return true
	}
	return isMIG && slices.Contains(h.Placements, start)
}

// Plan is the manager's word to the front ends.
type Plan struct {
	// Generation increases with every change the manager starts.
	Generation int64 `json:"generation"`
	// BootID is the boot the plan was made in.
	BootID string `json:"bootID"`
	// Config is the selected layout's name.
	Config  string `json:"config"`
	State   State  `json:"state"`
	Message string `json:"message,omitempty"`
	// Managed are the GPUs the selected layout sets and the manager manages.
	Managed []int `json:"managed"`
	// Changed are the GPUs this generation changes (or changed): front ends re-read them.
	Changed []int `json:"changed,omitempty"`
	// Holds are the devices withdrawn while the change is pending or applying, by GPU index.
	Holds   map[int]Hold `json:"holds,omitempty"`
	Updated time.Time    `json:"updated"`
}

// Active reports whether the plan's holds are in force.
func (p *Plan) Active() bool { return p.State == StatePending || p.State == StateApplying }

// GPUOwnership is how a front end serves one GPU.
type GPUOwnership struct {
	Mode string `json:"mode"`
	// Layout is set when the sharing profile names the GPU's MIG layout itself (the front end
	// applies it): the manager leaves such a GPU alone.
	Layout string `json:"layout,omitempty"`
}

// Busy is a held device still in use.
type Busy struct {
	GPU    int    `json:"gpu"`
	Device string `json:"device"`
	// User says who holds it when known (a claim, a pod).
	User string `json:"user,omitempty"`
}

func (b Busy) String() string {
	s := fmt.Sprintf("GPU %d: %s", b.GPU, b.Device)
	if b.User != "" {
		s += " used by " + b.User
	}
	return s
}

// Ack is a front end's answer.
type Ack struct {
	FrontEnd string `json:"frontEnd"`
	BootID   string `json:"bootID"`
	// Generation is the plan generation whose holds the front end has applied (0: none yet).
	Generation int64 `json:"generation"`
	// GPUs are the GPUs the front end owns, by index.
	GPUs map[int]GPUOwnership `json:"gpus"`
	// Busy are held devices still in use.
	Busy      []Busy    `json:"busy,omitempty"`
	Heartbeat time.Time `json:"heartbeat"`
}

// Fresh reports whether the ack was written recently enough to speak for a running front end.
func (a *Ack) Fresh(now time.Time, staleAfter time.Duration) bool {
	return now.Sub(a.Heartbeat) <= staleAfter
}

// Dir is a handshake directory.
type Dir struct{ Path string }

const planFile = "plan.json"

func ackFile(frontEnd string) string { return "ack-" + frontEnd + ".json" }

// ReadPlan reads the plan; (nil, nil) when there is none.
func (d Dir) ReadPlan() (*Plan, error) {
	data, err := os.ReadFile(filepath.Join(d.Path, planFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the MIG manager's plan: %w", err)
	}
	var p Plan
	if err := json.Unmarshal(data, &p); err != nil {
		return nil, fmt.Errorf("MIG manager plan %s is not valid JSON (delete it; the manager writes it again): %w", filepath.Join(d.Path, planFile), err)
	}
	return &p, nil
}

// WritePlan replaces the plan atomically.
func (d Dir) WritePlan(p *Plan) error { return d.write(planFile, p) }

// WriteAck replaces a front end's ack atomically.
func (d Dir) WriteAck(a *Ack) error {
	if a.FrontEnd == "" || strings.ContainsAny(a.FrontEnd, "/\\") {
		return fmt.Errorf("ack: bad front end name %q", a.FrontEnd)
	}
	return d.write(ackFile(a.FrontEnd), a)
}

// ReadAcks reads every front end's ack, by front end. Unreadable files are skipped and reported.
func (d Dir) ReadAcks() (map[string]*Ack, error) {
	ents, err := os.ReadDir(d.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]*Ack{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]*Ack{}
	var errs []error
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, "ack-") || !strings.HasSuffix(n, ".json") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(d.Path, n))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var a Ack
		if err := json.Unmarshal(data, &a); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		out[a.FrontEnd] = &a
	}
	return out, errors.Join(errs...)
}

func (d Dir) write(name string, v any) error {
	if err := os.MkdirAll(d.Path, 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(d.Path, "."+name+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(append(data, '\n'))
	if werr == nil {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), filepath.Join(d.Path, name))
	}
	if werr != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("writing %s: %w", filepath.Join(d.Path, name), werr)
	}
	return nil
}

// HoldsFor returns the holds a front end must apply for a plan read in boot bootID: the plan's
// holds while it is active; every device of the managed GPUs when the plan is from an earlier boot
// (MIG instances did not survive it) until the manager succeeds again; nothing otherwise.
func HoldsFor(p *Plan, bootID string) map[int]Hold {
	if p == nil {
		return nil
	}
	if p.BootID != bootID {
		out := make(map[int]Hold, len(p.Managed))
		for _, i := range p.Managed {
			out[i] = Hold{All: true}
		}
		return out
	}
	if p.Active() {
		return maps.Clone(p.Holds)
	}
	return nil
}

// FormatHolds describes holds for logs and Events, sorted by GPU.
func FormatHolds(h map[int]Hold) string {
	var parts []string
	for _, i := range slices.Sorted(maps.Keys(h)) {
		x := h[i]
		if x.All {
			parts = append(parts, "GPU "+strconv.Itoa(i)+": every device")
			continue
		}
		var ps []string
		for _, s := range x.Placements {
			ps = append(ps, strconv.Itoa(s))
		}
		parts = append(parts, "GPU "+strconv.Itoa(i)+": MIG devices at placements "+strings.Join(ps, ","))
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, "; ")
}
