package dra

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
)

// CheckpointFormat is the format of the claim checkpoints this driver writes. A driver reads every
// format up to its own, so a claim prepared by one release unprepares under the next; a checkpoint
// of a newer format is refused (a downgrade with prepared claims is not supported) and left alone.
const CheckpointFormat = 1

// Phase is how far a Prepare got.
type Phase string

// Phases. A checkpoint is written PrepareStarted before Prepare changes anything on the node and
// PrepareCompleted after the last change, each time fsynced with its directory.
const (
	PhaseStarted   Phase = "PrepareStarted"
	PhaseCompleted Phase = "PrepareCompleted"
	// PhaseDestroyPending: the claim was unprepared, but a MIG instance Prepare created could not be
	// destroyed (processes still run on it, NVML's ERROR_IN_USE). The driver keeps trying; until it
	// succeeds the placements it overlaps are tainted, and Prepare refuses them.
	PhaseDestroyPending Phase = "UnprepareDestroyPending"
)

// ClaimRef names a claim.
type ClaimRef struct {
	UID       types.UID `json:"uid"`
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
}

func (c ClaimRef) String() string { return c.Namespace + "/" + c.Name + " (" + string(c.UID) + ")" }

// PreparedDevice is one allocated device of a claim, with everything needed to undo its preparation
// without the claim or the current inventory.
// changesNode reports whether preparing the checkpoint's devices changes anything on the node
// besides the claim's CDI spec: a time-slice interval set, a MIG instance made, an MPS client added.
func (c *Checkpoint) changesNode() bool {
	return slices.ContainsFunc(c.Devices, func(pd PreparedDevice) bool {
		return pd.Interval != "" || pd.Dynamic != nil || pd.MPSClient != ""
	})
}

type PreparedDevice struct {
	// Requests are the claim requests the device serves (as in the allocation result).
	Requests []string `json:"requests"`
	Pool     string   `json:"pool"`
	Device   string   `json:"device"`
	// ShareID is set when the device is shared (time-sliced).
	ShareID string `json:"shareID,omitempty"`
	// AdminAccess is set for an admin-access allocation (monitoring a device in use): it does not
	// count as using the device.
	AdminAccess bool     `json:"adminAccess,omitempty"`
	Mode        api.Mode `json:"mode"`
	// CDI is what the container gets; CDIDeviceID is its qualified name in the claim's spec.
	CDI         cdi.Device `json:"cdi"`
	CDIDeviceID string     `json:"cdiDeviceID,omitempty"`
	// Interval is a time-slice interval the claim's parameters set on an exclusive GPU; Unprepare
	// puts the GPU back to Default.
	Interval api.TimeSliceInterval `json:"interval,omitempty"`
	// Dynamic is the MIG instance Prepare creates for a mig-dynamic device (GI and CI are -1 in the
	// PrepareStarted checkpoint, written before it exists).
	Dynamic *DynamicMIG `json:"dynamic,omitempty"`
	// MemoryMiB and ComputePercent are the share of a GPU in mode shared the claim consumed (the
	// allocation's consumedCapacity), Isolation the GPU's isolation then. Optional: format 1
	// checkpoints without them read as before.
	MemoryMiB      uint64   `json:"memoryMiB,omitempty"`
	ComputePercent int      `json:"computePercent,omitempty"`
	Isolation      api.Mode `json:"isolation,omitempty"`
	// MPSClient is the client registered with the GPU's MPS daemon for a shared GPU with isolation
	// mps (claim UID/share ID); its limits are CDI.MPS's. Unprepare removes it.
	MPSClient string `json:"mpsClient,omitempty"`
}

// Checkpoint is one claim's preparation record, one file per claim.
type Checkpoint struct {
	Format int `json:"format"`
	// DriverVersion is the release of the driver that wrote it.
	DriverVersion string   `json:"driverVersion"`
	Claim         ClaimRef `json:"claim"`
	// BootID is the node's boot ID when the claim was prepared: what a boot prepared does not
	// survive the next (CDI specs live in a tmpfs, MIG devices vanish).
	BootID  string           `json:"bootID"`
	Phase   Phase            `json:"phase"`
	Devices []PreparedDevice `json:"devices"`
}

// GPUs returns the UUIDs of the GPUs the claim's devices are on, sorted.
func (c *Checkpoint) GPUs() []string {
	seen := map[string]bool{}
	var out []string
	for _, d := range c.Devices {
		if !seen[d.CDI.GPU.UUID] {
			seen[d.CDI.GPU.UUID] = true
			out = append(out, d.CDI.GPU.UUID)
		}
	}
	sort.Strings(out)
	return out
}

// envelope is the file: the checkpoint and a checksum of its bytes, so a damaged file is detected
// instead of trusted.
type envelope struct {
	Checksum   string          `json:"checksum"`
	Checkpoint json.RawMessage `json:"checkpoint"`
}

// checkpoints stores one file per claim in a directory: <uid>.json.
type checkpoints struct {
	dir string
}

const checkpointExt = ".json"

func newCheckpoints(dir string) (*checkpoints, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the checkpoint directory: %w", err)
	}
	return &checkpoints{dir: dir}, nil
}

func (s *checkpoints) path(uid types.UID) string {
	return filepath.Join(s.dir, string(uid)+checkpointExt)
}

func validUID(uid types.UID) error {
	u := string(uid)
	if u == "" || len(u) > 128 || strings.ContainsAny(u, `/\`) || strings.HasPrefix(u, ".") {
		return fmt.Errorf("claim UID %q cannot name a checkpoint file", u)
	}
	return nil
}

// write stores the checkpoint durably: a temporary file, fsync, rename, fsync of the directory.
func (s *checkpoints) write(c *Checkpoint) error {
	if err := validUID(c.Claim.UID); err != nil {
		return err
	}
	body, err := json.Marshal(c)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(body)
	data, err := json.MarshalIndent(envelope{Checksum: "sha256:" + hex.EncodeToString(sum[:]), Checkpoint: body}, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(s.path(c.Claim.UID), append(data, '\n')); err != nil {
		return fmt.Errorf("writing the checkpoint of claim %s (%s): %w", c.Claim, c.Phase, err)
	}
	return nil
}

// ErrNoCheckpoint is returned by read for a claim without checkpoint.
var ErrNoCheckpoint = errors.New("no checkpoint")

// read loads a claim's checkpoint.
func (s *checkpoints) read(uid types.UID) (*Checkpoint, error) {
	if err := validUID(uid); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(s.path(uid))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoCheckpoint
	}
	if err != nil {
		return nil, err
	}
	return decodeCheckpoint(data)
}

func decodeCheckpoint(data []byte) (*Checkpoint, error) {
	var env envelope
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return nil, fmt.Errorf("checkpoint is not readable: %w", err)
	}
	// The checksum is of the compact JSON (the file is indented for people reading it).
	var compact bytes.Buffer
	if err := json.Compact(&compact, env.Checkpoint); err != nil {
		return nil, fmt.Errorf("checkpoint is not readable: %w", err)
	}
	sum := sha256.Sum256(compact.Bytes())
	if env.Checksum != "sha256:"+hex.EncodeToString(sum[:]) {
		return nil, errors.New("checkpoint checksum does not match its content: the file is damaged")
	}
	var head struct {
		Format int `json:"format"`
	}
	if err := json.Unmarshal(env.Checkpoint, &head); err != nil {
		return nil, fmt.Errorf("checkpoint is not readable: %w", err)
	}
	switch {
	case head.Format < 1:
		return nil, fmt.Errorf("checkpoint has no format")
	case head.Format > CheckpointFormat:
		return nil, fmt.Errorf("checkpoint format %d was written by a newer driver (this one reads up to %d); unprepare its claim with that driver", head.Format, CheckpointFormat)
	}
	// Format 1 is the current one. A later format adds a case that converts older ones here.
	var c Checkpoint
	if err := json.Unmarshal(env.Checkpoint, &c); err != nil {
		return nil, fmt.Errorf("checkpoint format %d is not readable: %w", head.Format, err)
	}
	if err := validUID(c.Claim.UID); err != nil {
		return nil, err
	}
	return &c, nil
}

// remove deletes a claim's checkpoint; a missing one is not an error. The removal is not fsynced:
// only a power loss can undo it, and a checkpoint that comes back then is of an earlier boot, which
// start-up drops with its spec. (A process crash cannot undo it.) Writes stay fsynced.
func (s *checkpoints) remove(uid types.UID) error {
	if err := validUID(uid); err != nil {
		return err
	}
	if err := os.Remove(s.path(uid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the checkpoint of claim %s: %w", uid, err)
	}
	return nil
}

// list returns the UIDs that have a checkpoint file, sorted.
func (s *checkpoints) list() ([]types.UID, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []types.UID
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, ".") || !strings.HasSuffix(n, checkpointExt) || !e.Type().IsRegular() {
			continue
		}
		out = append(out, types.UID(strings.TrimSuffix(n, checkpointExt)))
	}
	return out, nil
}

// tempMaxAge is how old a temporary file must be before start-up takes it for a crash's leftover:
// in a rolling update the instance being replaced may be writing one right now.
const tempMaxAge = time.Minute

// cleanTemp removes temporary files a crash left behind.
func (s *checkpoints) cleanTemp() {
	ents, _ := os.ReadDir(s.dir)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") || !strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) < tempMaxAge {
			continue
		}
		_ = os.Remove(filepath.Join(s.dir, e.Name()))
	}
}

// writeFileSync writes data to path atomically and durably.
func writeFileSync(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
