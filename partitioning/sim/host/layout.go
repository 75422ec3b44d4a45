package host

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Modes as the driver and nvidia-modprobe leave them.
const (
	gpuNodeMode = 0o666 // /dev/nvidia*, /dev/nvidia-uvm*, as nvidia-modprobe makes them
	procMode    = 0o444 // procfs files are r--r--r--
	libMode     = 0o644
	binMode     = 0o755
)

// Capability access files carry DeviceFileMode, the mode nvidia-modprobe gives the cap's device node:
// 256 (0400) for mig/config, 292 (0444) for mig/monitor and every GPU- and compute-instance access.
const (
	configCapMode = 0o400
	accessCapMode = 0o444
)

// capAccess renders a /proc/driver/nvidia/capabilities access file as the driver prints it.
func capAccess(minor int, mode os.FileMode) []byte {
	return fmt.Appendf(nil, "DeviceFileMinor: %d\nDeviceFileMode: %d\nDeviceFileModify: 1\n", minor, mode)
}

func (h *Host) ensureDev() error {
	dev := h.DevRoot()
	if err := mkdirs(0o755, dev, filepath.Join(dev, "nvidia-caps")); err != nil {
		return err
	}
	for _, m := range h.spec.GPUMinors {
		if err := h.node(filepath.Join(dev, fmt.Sprintf("nvidia%d", m)), NvidiaMajor, uint32(m), gpuNodeMode); err != nil {
			return err
		}
	}
	for _, n := range []struct {
		name         string
		major, minor uint32
		perm         os.FileMode
	}{
		{"nvidiactl", NvidiaMajor, NvidiaCtlMinor, gpuNodeMode},
		{"nvidia-modeset", NvidiaMajor, NvidiaModesetMinor, gpuNodeMode},
		{"nvidia-uvm", UVMMajor, UVMMinor, gpuNodeMode},
		{"nvidia-uvm-tools", UVMMajor, UVMToolsMinor, gpuNodeMode},
		{"nvidia-caps/nvidia-cap1", CapsMajor, MIGConfigCapMinor, configCapMode},
		{"nvidia-caps/nvidia-cap2", CapsMajor, MIGMonitorCapMinor, accessCapMode},
	} {
		if err := h.node(filepath.Join(dev, n.name), n.major, n.minor, n.perm); err != nil {
			return err
		}
	}
	return nil
}

func (h *Host) ensureProc() error {
	proc := h.ProcRoot()
	caps := h.capabilitiesDir()
	files := []struct {
		path string
		data []byte
	}{
		{filepath.Join(proc, "devices"), procDevices()},
		{filepath.Join(proc, "driver", "nvidia", "version"), procVersion(h.spec.DriverVersion)},
		{filepath.Join(caps, "mig", "config"), capAccess(MIGConfigCapMinor, configCapMode)},
		{filepath.Join(caps, "mig", "monitor"), capAccess(MIGMonitorCapMinor, accessCapMode)},
		{filepath.Join(proc, "driver", "nvidia-caps", "mig-minors"), migMinors()},
	}
	for _, f := range files {
		if err := h.writeFile(f.path, f.data, procMode); err != nil {
			return err
		}
	}
	return nil
}

// chrdev is one line of /proc/devices.
type chrdev struct {
	major int
	name  string
}

// procDevices renders /proc/devices for a typical x86_64 server with the NVIDIA driver loaded. The
// kernel prints each section sorted by major, "%3d %s" per line, with a blank line between sections.
func procDevices() []byte {
	char := []chrdev{
		{1, "mem"}, {4, "/dev/vc/0"}, {4, "tty"}, {4, "ttyS"}, {5, "/dev/tty"}, {5, "/dev/console"},
		{5, "/dev/ptmx"}, {5, "ttyprintk"}, {7, "vcs"}, {10, "misc"}, {13, "input"}, {21, "sg"}, {29, "fb"},
		{89, "i2c"}, {108, "ppp"}, {128, "ptm"}, {136, "pts"}, {180, "usb"}, {189, "usb_device"},
		{NvidiaMajor, "nvidia-frontend"}, {202, "cpu/msr"}, {203, "cpu/cpuid"}, {226, "drm"},
		{240, "ipmidev"}, {241, "nvme-generic"}, {242, "nvme"}, {243, "hidraw"}, {244, "ttyDBC"},
		{245, "bsg"}, {246, "watchdog"}, {247, "ptp"}, {248, "pps"}, {249, "rtc"}, {250, "dax"},
		{251, "dimmctl"}, {252, "ndctl"}, {253, "tpm"}, {254, "gpiochip"},
		{CapsMajor, "nvidia-caps"}, {ImexChannelsMajor, "nvidia-caps-imex-channels"}, {UVMMajor, "nvidia-uvm"},
	}
	block := []chrdev{
		{7, "loop"}, {8, "sd"}, {9, "md"}, {11, "sr"}, {65, "sd"}, {66, "sd"}, {67, "sd"}, {68, "sd"},
		{69, "sd"}, {70, "sd"}, {71, "sd"}, {128, "sd"}, {129, "sd"}, {130, "sd"}, {131, "sd"},
		{132, "sd"}, {133, "sd"}, {134, "sd"}, {135, "sd"}, {253, "device-mapper"}, {254, "mdp"},
		{259, "blkext"},
	}
	var b bytes.Buffer
	b.WriteString("Character devices:\n")
	for _, d := range char {
		fmt.Fprintf(&b, "%3d %s\n", d.major, d.name)
	}
	b.WriteString("\nBlock devices:\n")
	for _, d := range block {
		fmt.Fprintf(&b, "%3d %s\n", d.major, d.name)
	}
	return b.Bytes()
}

// procVersion renders /proc/driver/nvidia/version as the open kernel modules print it.
func procVersion(version string) []byte {
	return fmt.Appendf(nil, "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  %s  Release Build  "+
		"(tessera-sim@localhost)\nGCC version:  gcc version 12.3.0 (tessera simulated host)\n", version)
}

// migMinors renders /proc/driver/nvidia-caps/mig-minors: every MIG capability the driver's fixed
// table knows, in the table's order, whether or not the GPU or instance exists.
func migMinors() []byte {
	var b bytes.Buffer
	b.Grow(110 * 1024)
	fmt.Fprintf(&b, "config %d\nmonitor %d\n", MIGConfigCapMinor, MIGMonitorCapMinor)
	for gpu := range MaxMIGGPUs {
		for gi := range MaxGIs {
			fmt.Fprintf(&b, "gpu%d/gi%d/access %d\n", gpu, gi, GIMinor(gpu, gi))
			for ci := range MaxCIs {
				fmt.Fprintf(&b, "gpu%d/gi%d/ci%d/access %d\n", gpu, gi, ci, CIMinor(gpu, gi, ci))
			}
		}
	}
	return b.Bytes()
}

// driverLib is one of the driver's user-space libraries: <name>.so.<driver version>, with a soname link
// if the library has one that is not the versioned name itself.
type driverLib struct {
	name   string // e.g. "libcuda"
	soname string // e.g. "libcuda.so.1"; "" if the soname is the versioned file name
}

// driverLibs are the libraries nvidia-container-toolkit mounts for the utility and compute driver
// capabilities (libnvidia-container's utility_libs and compute_libs, less ones current drivers no longer
// ship: libnvidia-fatbinaryloader, libnvidia-compiler; and libnvidia-nscq, which comes with NVSwitch
// systems' separate package).
var driverLibs = []driverLib{
	{"libnvidia-ml", "libnvidia-ml.so.1"},
	{"libnvidia-cfg", "libnvidia-cfg.so.1"},
	{"libcuda", "libcuda.so.1"},
	{"libcudadebugger", "libcudadebugger.so.1"},
	{"libnvidia-opencl", "libnvidia-opencl.so.1"},
	{"libnvidia-gpucomp", ""},
	{"libnvidia-ptxjitcompiler", "libnvidia-ptxjitcompiler.so.1"},
	{"libnvidia-allocator", "libnvidia-allocator.so.1"},
	{"libnvidia-pkcs11", ""},
	{"libnvidia-pkcs11-openssl3", ""},
	{"libnvidia-nvvm", "libnvidia-nvvm.so.4"},
}

// firmwareFiles are the GSP firmware images the driver loads from lib/firmware/nvidia/<version>/.
var firmwareFiles = []string{"gsp_ga10x.bin", "gsp_tu10x.bin"}

// standInPrefix starts the content of every stand-in library and firmware file.
const standInPrefix = "tessera simulated driver "

func standInLib(file, version string) []byte {
	return fmt.Appendf(nil, "%slibrary %s %s\nThis is not an ELF object; it only stands in for NVIDIA's library.\n",
		standInPrefix, file, version)
}

func standInFirmware(file, version string) []byte {
	return fmt.Appendf(nil, "%sfirmware %s %s\nThis is not GSP firmware; it only stands in for NVIDIA's.\n",
		standInPrefix, file, version)
}

func (h *Host) ensureDriver() error {
	v := h.spec.DriverVersion
	lib := h.LibPath()
	for _, l := range driverLibs {
		file := l.name + ".so." + v
		if err := h.writeFile(filepath.Join(lib, file), standInLib(file, v), libMode); err != nil {
			return err
		}
		if l.soname != "" {
			if err := h.symlink(file, filepath.Join(lib, l.soname)); err != nil {
				return err
			}
		}
	}
	// The development link the CUDA runtime and the toolkit's libcuda.so hook look for.
	if err := h.symlink("libcuda.so.1", filepath.Join(lib, "libcuda.so")); err != nil {
		return err
	}
	fw := filepath.Join(h.DriverRoot(), "lib", "firmware", "nvidia", v)
	for _, f := range firmwareFiles {
		if err := h.writeFile(filepath.Join(fw, f), standInFirmware(f, v), libMode); err != nil {
			return err
		}
	}
	bin := filepath.Join(h.DriverRoot(), "usr", "bin")
	for _, t := range h.tools() {
		if err := h.writeFile(filepath.Join(bin, t.name), t.script, binMode); err != nil {
			return err
		}
	}
	// nvidia-persistenced's socket: a placeholder file where CDI generation looks for it, reachable
	// both as /run/... and as /var/run/... (a link to ../run, as on current distributions).
	run := filepath.Join(h.DriverRoot(), "run")
	if err := h.writeFile(filepath.Join(run, "nvidia-persistenced", "socket"), nil, 0o666); err != nil {
		return err
	}
	return h.symlink("../run", filepath.Join(h.DriverRoot(), "var", "run"))
}

func (h *Host) ensureRecordDir() error {
	// Anyone the simulation runs a tool as may append.
	if err := os.MkdirAll(h.RecordDir(), 0o777); err != nil {
		return err
	}
	return os.Chmod(h.RecordDir(), 0o777)
}

var (
	gpuNodeRE = regexp.MustCompile(`^nvidia([0-9]+)$`)
	capNodeRE = regexp.MustCompile(`^nvidia-cap([0-9]+)$`)
	gpuCapsRE = regexp.MustCompile(`^gpu([0-9]+)$`)
	libFileRE = regexp.MustCompile(`^(lib[a-z0-9_-]+)\.so\.([0-9]+(?:\.[0-9]+)+)$`)
)

// removeStale removes what an earlier spec laid out and this one does not: device nodes and MIG
// capabilities of GPUs no longer listed, and stand-in libraries and firmware of another driver version.
// Only entries this package makes are touched.
func (h *Host) removeStale() error {
	// /dev/nvidia<N>.
	if err := h.removeMatching(h.DevRoot(), gpuNodeRE, func(n int) bool { return !h.hasGPU(n) }); err != nil {
		return err
	}
	// MIG capabilities of GPUs not listed: the procfs tree, then the cap nodes.
	if err := h.removeMatching(h.capabilitiesDir(), gpuCapsRE, func(n int) bool { return !h.hasGPU(n) }); err != nil {
		return err
	}
	stale := func(minor int) bool {
		gpu, _, _, ok := capOwner(minor)
		return ok && !h.hasGPU(gpu)
	}
	if err := h.removeMatching(filepath.Join(h.DevRoot(), "nvidia-caps"), capNodeRE, stale); err != nil {
		return err
	}
	// Libraries of another driver version.
	lib := h.LibPath()
	entries, err := os.ReadDir(lib)
	if err != nil {
		return err
	}
	known := make([]string, 0, len(driverLibs))
	for _, l := range driverLibs {
		known = append(known, l.name)
	}
	for _, e := range entries {
		m := libFileRE.FindStringSubmatch(e.Name())
		if m == nil || m[2] == h.spec.DriverVersion || !slices.Contains(known, m[1]) || !e.Type().IsRegular() {
			continue
		}
		if err := removeStandIn(filepath.Join(lib, e.Name())); err != nil {
			return err
		}
	}
	// Firmware of another driver version.
	fwRoot := filepath.Join(h.DriverRoot(), "lib", "firmware", "nvidia")
	versions, err := os.ReadDir(fwRoot)
	if err != nil {
		return err
	}
	for _, d := range versions {
		if d.Name() == h.spec.DriverVersion || !d.IsDir() || !driverVersionRE.MatchString(d.Name()) {
			continue
		}
		dir := filepath.Join(fwRoot, d.Name())
		for _, f := range firmwareFiles {
			if err := removeStandIn(filepath.Join(dir, f)); err != nil {
				return err
			}
		}
		_ = os.Remove(dir) // only if now empty
	}
	return nil
}

// removeMatching removes the entries of dir whose names match re (one numeric group) and whose number
// stale says is stale. A missing dir has nothing to remove.
func (h *Host) removeMatching(dir string, re *regexp.Regexp, stale func(int) bool) error {
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		m := re.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		n, err := strconv.Atoi(m[1])
		if err != nil || !stale(n) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// removeStandIn removes path if it is one of this package's stand-in files.
func removeStandIn(path string) error {
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(data), standInPrefix) {
		return nil
	}
	return removeIfExists(path)
}
