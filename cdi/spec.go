package cdi

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// specExt is the extension of the specs we write. JSON is read the same by every version of the CDI
// library a runtime may vendor.
const specExt = ".json"

// DeviceEdits returns the edits a container gets for one device, besides the common ones: its GPU's
// device node, for a MIG device the nvidia-caps nodes of its GPU and compute instance, and for a
// replica or MPS fraction the environment (and for MPS the mounts) that go with it.
func (g *Generator) DeviceEdits(d Device) (specs.ContainerEdits, error) {
	if err := d.Validate(); err != nil {
		return specs.ContainerEdits{}, err
	}
	var e specs.ContainerEdits
	hostPath := filepath.Join(g.cfg.devRoot, "nvidia"+strconv.Itoa(d.GPU.Minor))
	major, minor, mode, err := hostNode(hostPath, g.majors[procFrontend], int64(d.GPU.Minor))
	if err != nil {
		return e, fmt.Errorf("%s: %w", d, err)
	}
	e.DeviceNodes = append(e.DeviceNodes, g.node("/dev/nvidia"+strconv.Itoa(d.GPU.Minor), hostPath, major, minor, mode))

	if d.MIG != nil {
		caps, err := g.migCapNodes(d)
		if err != nil {
			return e, fmt.Errorf("%s: %w", d, err)
		}
		e.DeviceNodes = append(e.DeviceNodes, caps...)
	}

	switch {
	case d.TimeSlice != nil:
		e.Env = append(e.Env, ReplicaEnv+"="+d.Name())
	case d.MPS != nil:
		m := d.MPS
		if err := isDir(m.PipeDir); err != nil {
			return e, fmt.Errorf("%s: MPS pipe directory: %w", d, err)
		}
		e.Env = append(e.Env, "CUDA_MPS_PIPE_DIRECTORY="+MPSPipeDir)
		if m.ActiveThreadPercentage > 0 {
			e.Env = append(e.Env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="+strconv.Itoa(m.ActiveThreadPercentage))
		}
		if m.PinnedMemoryLimitMiB > 0 {
			e.Env = append(e.Env, fmt.Sprintf("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=%dM", m.PinnedMemoryLimitMiB))
		}
		e.Env = append(e.Env, ReplicaEnv+"="+d.Name())
		// Read-only: a client connects to the daemon's sockets and must not replace them.
		e.Mounts = append(e.Mounts, &specs.Mount{HostPath: filepath.Clean(m.PipeDir), ContainerPath: MPSPipeDir,
			Options: slices.Clone(mountOptions)})
		if m.ShmDir != "" {
			if err := isDir(m.ShmDir); err != nil {
				return e, fmt.Errorf("%s: MPS shared memory directory: %w", d, err)
			}
			e.Mounts = append(e.Mounts, &specs.Mount{HostPath: filepath.Clean(m.ShmDir), ContainerPath: "/dev/shm",
				Options: slices.Clone(rwMountOptions)})
		}
	}
	e.Env = append(e.Env, d.Env...)
	return e, nil
}

// migCapNodes are /dev/nvidia-caps/nvidia-cap<N> for the device's GPU instance and compute instance,
// with the minors the driver gives them in /proc/driver/nvidia/capabilities and the nvidia-caps major
// of /proc/devices. The host nodes need not exist (nvidia-modprobe makes them on first use); when
// they do, their numbers must agree.
func (g *Generator) migCapNodes(d Device) ([]*specs.DeviceNode, error) {
	capsMajor, ok := g.majors[procCaps]
	if !ok {
		return nil, fmt.Errorf("%s lists no %s major (is the driver loaded with MIG support?)",
			filepath.Join(g.cfg.procRoot, "devices"), procCaps)
	}
	migDir := filepath.Join(g.cfg.procRoot, "driver", "nvidia", "capabilities", "gpu"+strconv.Itoa(d.GPU.Minor), "mig")
	giDir := filepath.Join(migDir, "gi"+strconv.Itoa(d.MIG.GI))
	var out []*specs.DeviceNode
	for _, access := range []string{
		filepath.Join(giDir, "access"),
		filepath.Join(giDir, "ci"+strconv.Itoa(d.MIG.CI), "access"),
	} {
		m, err := host.ReadCapMinor(access)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("MIG capability %s does not exist (is the MIG device still there?)", access)
			}
			return nil, err
		}
		name := "nvidia-cap" + strconv.Itoa(m)
		hostPath := filepath.Join(g.cfg.devRoot, "nvidia-caps", name)
		mode := defaultCapMode
		if _, err := os.Lstat(hostPath); err == nil {
			if _, _, mode, err = hostNode(hostPath, capsMajor, int64(m)); err != nil {
				return nil, err
			}
		}
		out = append(out, g.node("/dev/nvidia-caps/"+name, hostPath, capsMajor, int64(m), mode))
	}
	return out, nil
}

// NodeSpec builds the node spec for devices: every name of every device (see Device.Names), with
// the common edits. It is validated as WriteNodeSpec would validate it, but not written.
func (g *Generator) NodeSpec(devices []Device) (*specs.Spec, error) {
	ds := slices.Clone(devices)
	SortDevices(ds)
	spec := &specs.Spec{Kind: g.cfg.vendorClass, ContainerEdits: cloneEdits(g.common)}
	seen := map[string]Device{}
	for _, d := range ds {
		edits, err := g.DeviceEdits(d)
		if err != nil {
			return nil, err
		}
		for _, n := range d.Names() {
			if other, dup := seen[n]; dup {
				return nil, fmt.Errorf("%s and %s both have the device name %s", other, d, n)
			}
			seen[n] = d
			spec.Devices = append(spec.Devices, specs.Device{Name: n, ContainerEdits: cloneEdits(edits)})
		}
	}
	if err := g.finish(spec); err != nil {
		return nil, err
	}
	return spec, nil
}

// ClaimSpec builds the transient spec of a claim: one device per entry of devices, named
// ClaimDeviceName(claimUID, device), with the common edits. It returns the spec and the qualified
// device names in the order of devices.
func (g *Generator) ClaimSpec(claimUID string, devices []Device) (*specs.Spec, []string, error) {
	if err := validClaimUID(claimUID); err != nil {
		return nil, nil, err
	}
	if len(devices) == 0 {
		return nil, nil, fmt.Errorf("claim %s: no devices", claimUID)
	}
	names := make([]string, len(devices))
	ds := slices.Clone(devices)
	SortDevices(ds)
	spec := &specs.Spec{Kind: g.cfg.vendorClass, ContainerEdits: cloneEdits(g.common)}
	seen := map[string]bool{}
	for _, d := range ds {
		n := ClaimDeviceName(claimUID, d)
		if seen[n] {
			return nil, nil, fmt.Errorf("claim %s: %s is listed twice", claimUID, d)
		}
		seen[n] = true
		edits, err := g.DeviceEdits(d)
		if err != nil {
			return nil, nil, fmt.Errorf("claim %s: %w", claimUID, err)
		}
		spec.Devices = append(spec.Devices, specs.Device{Name: n, ContainerEdits: edits})
	}
	for i, d := range devices {
		names[i] = g.QualifiedName(ClaimDeviceName(claimUID, d))
	}
	if err := g.finish(spec); err != nil {
		return nil, nil, fmt.Errorf("claim %s: %w", claimUID, err)
	}
	return spec, names, nil
}

// finish sets the spec's version to the lowest one its content needs (so that older runtimes —
// containerd 1.7, CRI-O 1.27 — accept it) and checks our own rules on top of the CDI library's.
func (g *Generator) finish(spec *specs.Spec) error {
	v, err := specs.MinimumRequiredVersion(spec)
	if err != nil {
		return err
	}
	spec.Version = v
	if len(spec.Devices) == 0 {
		return errors.New("a spec needs at least one device")
	}
	if !slices.ContainsFunc(spec.ContainerEdits.DeviceNodes, func(n *specs.DeviceNode) bool { return n.Path == "/dev/nvidiactl" }) {
		return errors.New("the common edits have no /dev/nvidiactl")
	}
	check := func(where string, e *specs.ContainerEdits) error {
		for _, n := range e.DeviceNodes {
			if n.Type != "c" || n.Major <= 0 || n.FileMode == nil {
				return fmt.Errorf("%s: device node %s is not fully specified (type %q, major %d)", where, n.Path, n.Type, n.Major)
			}
		}
		return nil
	}
	if err := check("common edits", &spec.ContainerEdits); err != nil {
		return err
	}
	for i := range spec.Devices {
		d := &spec.Devices[i]
		if !slices.ContainsFunc(d.ContainerEdits.DeviceNodes, func(n *specs.DeviceNode) bool {
			return strings.HasPrefix(n.Path, "/dev/nvidia") && n.Path != "/dev/nvidiactl"
		}) {
			return fmt.Errorf("device %s has no GPU device node", d.Name)
		}
		if err := check("device "+d.Name, &d.ContainerEdits); err != nil {
			return err
		}
	}
	return nil
}

// NodeSpecName is the file name of the node spec: <vendor>-<class>.json.
func (g *Generator) NodeSpecName() string {
	return cdiapi.GenerateSpecName(g.vendor, g.class) + specExt
}

// ClaimSpecName is the file name of a claim's spec: <vendor>-<class>_<claim UID>.json.
func (g *Generator) ClaimSpecName(claimUID string) string {
	return cdiapi.GenerateTransientSpecName(g.vendor, g.class, claimUID) + specExt
}

// WriteNodeSpec writes the node spec for devices (see NodeSpec) atomically and returns its path.
func (g *Generator) WriteNodeSpec(devices []Device) (string, error) {
	spec, err := g.NodeSpec(devices)
	if err != nil {
		return "", fmt.Errorf("cdi: node spec: %w", err)
	}
	path, err := g.write(spec, g.NodeSpecName(), true)
	if err != nil {
		return "", fmt.Errorf("cdi: node spec: %w", err)
	}
	klog.V(2).InfoS("CDI node spec written", "path", path, "devices", len(spec.Devices), "cdiVersion", spec.Version)
	return path, nil
}

// RemoveNodeSpec removes the node spec, if there is one.
func (g *Generator) RemoveNodeSpec() error {
	return g.remove(g.NodeSpecName())
}

// WriteClaimSpec writes the transient spec of a claim atomically, replacing an earlier one of the
// same claim, and returns the qualified CDI device names for devices, in their order. It is meant for
// the DRA driver's NodePrepareResources: it holds no lock, and calls for different claims are
// independent.
func (g *Generator) WriteClaimSpec(claimUID string, devices []Device) ([]string, error) {
	spec, names, err := g.ClaimSpec(claimUID, devices)
	if err != nil {
		return nil, fmt.Errorf("cdi: %w", err)
	}
	if _, err := g.write(spec, g.ClaimSpecName(claimUID), false); err != nil {
		return nil, fmt.Errorf("cdi: claim %s: %w", claimUID, err)
	}
	return names, nil
}

// RemoveClaimSpec removes a claim's spec; a claim without one is not an error.
func (g *Generator) RemoveClaimSpec(claimUID string) error {
	if err := validClaimUID(claimUID); err != nil {
		return fmt.Errorf("cdi: %w", err)
	}
	return g.remove(g.ClaimSpecName(claimUID))
}

func (g *Generator) remove(name string) error {
	base := strings.TrimSuffix(name, specExt)
	for _, ext := range []string{specExt, ".yaml"} {
		err := os.Remove(filepath.Join(g.cfg.specDir, base+ext))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("cdi: %w", err)
		}
	}
	return nil
}

// tmpPrefix starts the names of our temporary files: hidden, and ending in .tmp, so that no CDI
// cache reads them.
func (g *Generator) tmpPrefix() string {
	return "." + cdiapi.GenerateSpecName(g.vendor, g.class)
}

// write validates spec with the CDI library's rules (validate), writes it to a temporary file in the
// spec directory and renames it over name, so a runtime never reads half a spec. A YAML twin of the
// file (same name, .yaml), if ours, is removed, as its devices would collide with the new file's.
//
// With durable, the file and the directory are fsynced (the node spec, written once at start). A
// claim's spec is not: it serves only this boot — a process crash leaves it in the page cache, and
// after a power loss the boot ID has changed and start-up drops the claims of the earlier boot with
// their specs — and on a node the spec directory is a tmpfs anyway. Its checkpoints are fsynced.
func (g *Generator) write(spec *specs.Spec, name string, durable bool) (string, error) {
	data, err := encode(spec)
	if err != nil {
		return "", err
	}
	return g.writeData(data, name, durable)
}

// encode validates a spec and returns the bytes write puts in its file.
func encode(spec *specs.Spec) ([]byte, error) {
	if err := validate(spec); err != nil {
		return nil, fmt.Errorf("the spec failed validation and was not written: %w", err)
	}
	data, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// writeData is write's atomic replacement of name by data, encoded already.
func (g *Generator) writeData(data []byte, name string, durable bool) (string, error) {
	dir := g.cfg.specDir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, fmt.Sprintf("%s.%d-%s.tmp", g.tmpPrefix(), time.Now().UnixNano(), hex.EncodeToString(rnd[:])))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", err
	}
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Chmod(0o644) // explicit: the umask must not make it unreadable
	}
	if werr == nil && durable {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	path := filepath.Join(dir, name)
	if werr == nil {
		werr = os.Rename(tmp, path)
	}
	if werr != nil {
		_ = os.Remove(tmp)
		return "", werr
	}
	if durable {
		syncDir(dir)
	}
	if twin := strings.TrimSuffix(path, specExt) + ".yaml"; g.isOurs(twin) {
		_ = os.Remove(twin)
	}
	return path, nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// isOurs reports whether path is a spec file of our kind.
func (g *Generator) isOurs(path string) bool {
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	raw, err := cdiapi.ParseSpec(data)
	return err == nil && raw != nil && raw.Kind == g.cfg.vendorClass
}

// Stale says which of our files in the spec directory CleanupStale removes, besides temporary files
// left by interrupted writes (older than a minute), which it always removes.
type Stale struct {
	// Claims: remove the claim specs of claims not in KeepClaims. For the DRA driver at start, which
	// owns every claim spec, with the claims it still has prepared.
	Claims     bool
	KeepClaims []string
	// NodeSpec: remove the node spec. For a front end that no longer writes one; one that does
	// replaces it with WriteNodeSpec instead, so that it never disappears.
	NodeSpec bool
}

// tmpMaxAge is how old a temporary file of ours must be to count as left over: a write takes
// milliseconds, and another process of ours may be writing now.
const tmpMaxAge = time.Minute

// CleanupStale removes our stale files from the spec directory and returns their paths. A file is
// ours when its name starts with <vendor>-<class> and it is a spec of our kind; nothing else is
// touched. A file with our name that cannot be parsed is left in place and reported in the error.
func (g *Generator) CleanupStale(s Stale) ([]string, error) {
	entries, err := os.ReadDir(g.cfg.specDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cdi: %w", err)
	}
	keep := map[string]bool{}
	for _, uid := range s.KeepClaims {
		keep[uid] = true
	}
	base := cdiapi.GenerateSpecName(g.vendor, g.class)
	var removed []string
	var errs []error
	now := time.Now()
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(g.cfg.specDir, name)
		if e.IsDir() {
			continue
		}
		if strings.HasPrefix(name, g.tmpPrefix()+".") && strings.HasSuffix(name, ".tmp") {
			if fi, err := e.Info(); err == nil && now.Sub(fi.ModTime()) > tmpMaxAge {
				if err := os.Remove(path); err == nil {
					removed = append(removed, path)
				}
			}
			continue
		}
		ext := filepath.Ext(name)
		if ext != ".json" && ext != ".yaml" {
			continue
		}
		stem := strings.TrimSuffix(name, ext)
		switch {
		case stem == base:
			if !s.NodeSpec {
				continue
			}
		case strings.HasPrefix(stem, base+"_"):
			if !s.Claims || keep[strings.TrimPrefix(stem, base+"_")] {
				continue
			}
		default:
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		raw, err := cdiapi.ParseSpec(data)
		if err != nil || raw == nil {
			errs = append(errs, fmt.Errorf("%s has our name but cannot be parsed; left in place: %v", path, err))
			continue
		}
		if raw.Kind != g.cfg.vendorClass {
			continue
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, path)
	}
	if len(removed) > 0 {
		klog.InfoS("CDI: removed stale specs", "dir", g.cfg.specDir, "files", removed)
	}
	if len(errs) > 0 {
		return removed, fmt.Errorf("cdi: cleaning up %s: %w", g.cfg.specDir, errors.Join(errs...))
	}
	return removed, nil
}
