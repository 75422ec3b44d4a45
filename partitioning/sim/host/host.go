// Package host lays out a simulated GPU host filesystem inside a simulated node's state directory, so
// that CDI specs generated for a simulated node, and containers started from them, see what they would
// see on a real NVIDIA host: device nodes under dev/, the driver's procfs files under proc/, and the
// driver's user-space files (libraries, firmware, tools) under driver/.
//
// Layout under the root:
//
//	host.json                      what was laid out, and whether dev/ holds real character devices
//	dev/                           nvidia<N>, nvidiactl, nvidia-modeset, nvidia-uvm, nvidia-uvm-tools,
//	                               nvidia-caps/nvidia-cap<M>
//	proc/devices                   character and block device majors, NVIDIA's included
//	proc/driver/nvidia/version     the NVRM version line
//	proc/driver/nvidia/capabilities/mig/{config,monitor}
//	proc/driver/nvidia/capabilities/gpu<N>/mig/gi<X>/access, …/gi<X>/ci<Y>/access   (SetMIG)
//	proc/driver/nvidia-caps/mig-minors
//	driver/<LibDir>/               stand-in driver libraries named by the driver version, soname links
//	driver/usr/bin/                stand-in nvidia-smi, nvidia-cuda-mps-control, nvidia-cuda-mps-server,
//	                               nvidia-persistenced (shell scripts that record their invocations)
//	driver/lib/firmware/nvidia/<version>/gsp_*.bin
//	driver/run/nvidia-persistenced/socket (placeholder), driver/var/run -> ../run
//	recorded/<tool>.log            what the stand-in tools were asked to do
//	sys/bus/pci/devices/<bdf>      the GPUs' PCI devices, if Spec.PCI gives them (see SysRoot)
//
// Nothing here is real NVIDIA software: libraries and firmware are short text files that say what they
// stand in for, so no dynamic loader can mistake them for loadable objects.
//
// Every file is written to a scratch directory (<root>/.tmp) and renamed into place, so no reader ever
// sees a partial file, and several processes may lay out the same root at once.
package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"k8s.io/klog/v2"
)

// Device majors. The NVIDIA frontend major is fixed by the driver; the others are allocated by the
// kernel when the modules load, so they differ between machines. The values here are ones real machines
// show (508 for nvidia-caps is the value in NVIDIA's MIG user guide).
const (
	NvidiaMajor       = 195 // nvidia-frontend: /dev/nvidia<N>, nvidiactl, nvidia-modeset
	CapsMajor         = 508 // nvidia-caps: /dev/nvidia-caps/nvidia-cap<M>
	ImexChannelsMajor = 509 // nvidia-caps-imex-channels (listed in proc/devices only; no channel nodes are made)
	UVMMajor          = 510 // nvidia-uvm: /dev/nvidia-uvm, /dev/nvidia-uvm-tools
)

// Device minors with fixed meanings.
const (
	NvidiaCtlMinor     = 255 // /dev/nvidiactl
	NvidiaModesetMinor = 254 // /dev/nvidia-modeset
	UVMMinor           = 0   // /dev/nvidia-uvm
	UVMToolsMinor      = 1   // /dev/nvidia-uvm-tools
	MIGConfigCapMinor  = 1   // /dev/nvidia-caps/nvidia-cap1, capabilities/mig/config
	MIGMonitorCapMinor = 2   // /dev/nvidia-caps/nvidia-cap2, capabilities/mig/monitor
)

// The driver's fixed table of MIG capabilities covers GPU minors 0..31, GPU instances 0..14 and compute
// instances 0..7 (see GIMinor).
const (
	MaxMIGGPUs = 32
	MaxGIs     = 15
	MaxCIs     = 8
)

// MaxGPUMinor is the largest minor /dev/nvidia<N> may have; 254 and 255 are nvidia-modeset and nvidiactl.
const MaxGPUMinor = 253

// DefaultLibDir is where the driver's libraries are, relative to the driver root, if Spec.LibDir is empty.
const DefaultLibDir = "usr/lib/x86_64-linux-gnu"

// Spec says what the host must contain.
type Spec struct {
	// DriverVersion, e.g. "570.133.20"; libraries and firmware are named by it.
	DriverVersion string
	// CUDAVersion is the CUDA version the driver supports, e.g. "12.8" (nvidia-smi prints it).
	CUDAVersion string
	// GPUMinors lists the GPUs: /dev/nvidia<N> is made for each.
	GPUMinors []int
	// LibDir is the library directory relative to the driver root; DefaultLibDir if empty.
	LibDir string
	// PCI places the GPUs on the PCI bus under sys/ (see SysRoot); optional.
	PCI []PCIDevice
}

// NodeKind says what the device nodes under dev/ are.
type NodeKind string

const (
	// CharDevices: dev/ holds character devices with the real majors and minors (made with mknod).
	CharDevices NodeKind = "char"
	// RegularFiles: the process could not mknod, so dev/ holds regular files with the same names and
	// modes, each saying which major:minor it stands for (see DeviceNumbers).
	RegularFiles NodeKind = "file"
)

// Host is a laid-out simulated host.
type Host struct {
	root  string
	spec  Spec
	nodes NodeKind
}

// metaFile is host.json: what was laid out. It is written last, so its presence means a layout
// completed at least once.
const metaFile = "host.json"

const metaFormat = 1

type meta struct {
	Format        int            `json:"format"`
	DriverVersion string         `json:"driverVersion"`
	CUDAVersion   string         `json:"cudaVersion"`
	GPUMinors     []int          `json:"gpuMinors"`
	LibDir        string         `json:"libDir"`
	DeviceNodes   NodeKind       `json:"deviceNodes"`
	Majors        map[string]int `json:"majors"`
}

var (
	driverVersionRE = regexp.MustCompile(`^[0-9]+(\.[0-9]+)+$`)
	cudaVersionRE   = regexp.MustCompile(`^[0-9]+\.[0-9]+$`)
)

// normalized validates s and returns a copy with defaults applied and GPU minors sorted.
func (s Spec) normalized() (Spec, error) {
	if !driverVersionRE.MatchString(s.DriverVersion) {
		return Spec{}, fmt.Errorf("driver version %q is not of the form 570.133.20", s.DriverVersion)
	}
	if !cudaVersionRE.MatchString(s.CUDAVersion) {
		return Spec{}, fmt.Errorf("CUDA version %q is not of the form 12.8", s.CUDAVersion)
	}
	out := Spec{DriverVersion: s.DriverVersion, CUDAVersion: s.CUDAVersion, LibDir: s.LibDir}
	if out.LibDir == "" {
		out.LibDir = DefaultLibDir
	}
	clean := filepath.Clean(out.LibDir)
	if filepath.IsAbs(out.LibDir) || clean == "." || clean == ".." || strings.HasPrefix(clean, "../") {
		return Spec{}, fmt.Errorf("library directory %q must be a path inside the driver root, relative to it", s.LibDir)
	}
	out.LibDir = clean
	out.GPUMinors = slices.Clone(s.GPUMinors)
	slices.Sort(out.GPUMinors)
	for i, m := range out.GPUMinors {
		if m < 0 || m > MaxGPUMinor {
			return Spec{}, fmt.Errorf("GPU minor %d is outside 0..%d", m, MaxGPUMinor)
		}
		if i > 0 && out.GPUMinors[i-1] == m {
			return Spec{}, fmt.Errorf("GPU minor %d is listed twice", m)
		}
	}
	for _, d := range s.PCI {
		bdf, err := normalizeBDF(d.BusID)
		if err != nil {
			return Spec{}, err
		}
		if d.NUMANode < 0 {
			d.NUMANode = 0 // no NUMA affinity reported: node 0, as a single-node machine has
		}
		out.PCI = append(out.PCI, PCIDevice{BusID: bdf, NUMANode: d.NUMANode})
	}
	return out, nil
}

// Ensure lays out the simulated host for spec under root, creating what is missing and replacing what
// differs; files that are already right are left alone (same inode, same mtime). Entries a previous
// spec left behind — device nodes of GPUs no longer listed, their MIG capabilities, libraries and
// firmware of another driver version — are removed. MIG capabilities of listed GPUs are kept.
//
// Several processes may call Ensure on the same root at once with the same spec; with different specs
// the last writer of each file wins. Whether dev/ holds character devices is decided by the first
// Ensure on a root (by trying mknod) and kept from then on, so dev/ never mixes the two kinds.
func Ensure(root string, spec Spec) (*Host, error) {
	spec, err := spec.normalized()
	if err != nil {
		return nil, fmt.Errorf("simulated host at %s: %w", root, err)
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("simulated host at %s: %w", root, err)
	}
	h := &Host{root: abs, spec: spec}
	if err := mkdirs(0o755, h.root, h.tmpDir(), h.lockDir()); err != nil {
		return nil, fmt.Errorf("simulated host at %s: %w", abs, err)
	}
	h.cleanTmp()

	prev, err := readMeta(abs)
	switch {
	case err == nil:
		h.nodes = prev.DeviceNodes
	case errors.Is(err, os.ErrNotExist):
		if h.nodes, err = h.probeNodeKind(); err != nil {
			return nil, fmt.Errorf("simulated host at %s: %w", abs, err)
		}
		klog.V(2).InfoS("Simulated host: device nodes decided", "root", abs, "deviceNodes", h.nodes)
	default:
		return nil, fmt.Errorf("simulated host at %s: %w", abs, err)
	}

	for _, step := range []struct {
		name string
		fn   func() error
	}{
		{"dev", h.ensureDev},
		{"proc", h.ensureProc},
		{"driver", h.ensureDriver},
		{"recorded", h.ensureRecordDir},
		{"sys", h.ensureSys},
		{"stale entries", h.removeStale},
	} {
		if err := step.fn(); err != nil {
			return nil, fmt.Errorf("simulated host at %s: %s: %w", abs, step.name, err)
		}
	}
	if err := h.writeMeta(); err != nil {
		return nil, fmt.Errorf("simulated host at %s: %w", abs, err)
	}
	klog.V(2).InfoS("Simulated host laid out", "root", abs, "driverVersion", spec.DriverVersion,
		"gpus", len(spec.GPUMinors), "deviceNodes", h.nodes)
	return h, nil
}

// Load opens a host an earlier Ensure laid out under root, without changing anything.
func Load(root string) (*Host, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	m, err := readMeta(abs)
	if err != nil {
		return nil, fmt.Errorf("simulated host at %s: %w", abs, err)
	}
	spec, err := Spec{DriverVersion: m.DriverVersion, CUDAVersion: m.CUDAVersion, GPUMinors: m.GPUMinors,
		LibDir: m.LibDir}.normalized()
	if err != nil {
		return nil, fmt.Errorf("simulated host at %s: %s: %w", abs, metaFile, err)
	}
	return &Host{root: abs, spec: spec, nodes: m.DeviceNodes}, nil
}

func readMeta(root string) (*meta, error) {
	data, err := os.ReadFile(filepath.Join(root, metaFile))
	if err != nil {
		return nil, err
	}
	var m meta
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", metaFile, err)
	}
	if m.Format != metaFormat {
		return nil, fmt.Errorf("%s: format %d, want %d", metaFile, m.Format, metaFormat)
	}
	if m.DeviceNodes != CharDevices && m.DeviceNodes != RegularFiles {
		return nil, fmt.Errorf("%s: unknown deviceNodes %q", metaFile, m.DeviceNodes)
	}
	return &m, nil
}

func (h *Host) writeMeta() error {
	m := meta{
		Format:        metaFormat,
		DriverVersion: h.spec.DriverVersion,
		CUDAVersion:   h.spec.CUDAVersion,
		GPUMinors:     h.spec.GPUMinors,
		LibDir:        h.spec.LibDir,
		DeviceNodes:   h.nodes,
		Majors: map[string]int{
			"nvidia-frontend":           NvidiaMajor,
			"nvidia-caps":               CapsMajor,
			"nvidia-caps-imex-channels": ImexChannelsMajor,
			"nvidia-uvm":                UVMMajor,
		},
	}
	if m.GPUMinors == nil {
		m.GPUMinors = []int{}
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return h.writeFile(filepath.Join(h.root, metaFile), append(data, '\n'), 0o644)
}

// Root is the directory the host is laid out in (absolute).
func (h *Host) Root() string { return h.root }

// DevRoot is <root>/dev.
func (h *Host) DevRoot() string { return filepath.Join(h.root, "dev") }

// ProcRoot is <root>/proc: devices, driver/nvidia/..., driver/nvidia-caps/mig-minors.
func (h *Host) ProcRoot() string { return filepath.Join(h.root, "proc") }

// DriverRoot is <root>/driver: the driver's files as they are laid out under / on a real host.
func (h *Host) DriverRoot() string { return filepath.Join(h.root, "driver") }

// RecordDir is <root>/recorded, where the stand-in tools append their logs.
func (h *Host) RecordDir() string { return filepath.Join(h.root, "recorded") }

// Spec is the spec the host was laid out for, with defaults applied and GPU minors sorted.
func (h *Host) Spec() Spec {
	s := h.spec
	s.GPUMinors = slices.Clone(s.GPUMinors)
	return s
}

// DeviceNodes says whether dev/ holds character devices or regular-file stand-ins.
func (h *Host) DeviceNodes() NodeKind { return h.nodes }

// LibPath is the directory holding the driver libraries (<root>/driver/<LibDir>).
func (h *Host) LibPath() string { return filepath.Join(h.DriverRoot(), h.spec.LibDir) }

// GIAccessPath is the procfs access file of GPU instance gi on GPU gpuMinor.
func (h *Host) GIAccessPath(gpuMinor, gi int) string {
	return filepath.Join(h.migDir(gpuMinor), fmt.Sprintf("gi%d", gi), "access")
}

// CIAccessPath is the procfs access file of compute instance ci of GPU instance gi on GPU gpuMinor.
func (h *Host) CIAccessPath(gpuMinor, gi, ci int) string {
	return filepath.Join(h.migDir(gpuMinor), fmt.Sprintf("gi%d", gi), fmt.Sprintf("ci%d", ci), "access")
}

// CapDevicePath is /dev/nvidia-caps/nvidia-cap<minor> under DevRoot.
func (h *Host) CapDevicePath(minor int) string {
	return filepath.Join(h.DevRoot(), "nvidia-caps", fmt.Sprintf("nvidia-cap%d", minor))
}

func (h *Host) capabilitiesDir() string {
	return filepath.Join(h.ProcRoot(), "driver", "nvidia", "capabilities")
}

func (h *Host) migDir(gpuMinor int) string {
	return filepath.Join(h.capabilitiesDir(), fmt.Sprintf("gpu%d", gpuMinor), "mig")
}

func (h *Host) hasGPU(minor int) bool {
	_, found := slices.BinarySearch(h.spec.GPUMinors, minor)
	return found
}

func mkdirs(perm os.FileMode, dirs ...string) error {
	for _, d := range dirs {
		if err := os.MkdirAll(d, perm); err != nil {
			return err
		}
	}
	return nil
}
