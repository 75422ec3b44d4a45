// Package cdi writes the Container Device Interface specs through which containers get Tessera's
// devices: whole GPUs, MIG devices, time-sliced replicas and MPS fractions, in one node spec (device
// plugin, `tessera cdi generate`) or in one transient spec per claim (DRA driver). containerd 2.x and
// CRI-O resolve them with tags.cncf.io/container-device-interface; a spec that is invalid or
// incomplete breaks containers on the whole node, so every spec is validated with that library before
// it is written, and written atomically.
//
// A Generator finds the driver's files once, at New, and keeps them: the driver's libraries,
// utilities, firmware and IPC sockets do not change while it is loaded. Per-device edits are computed
// on each call from a stat of the device node and, for MIG devices, two small procfs reads. No lock is
// held; calls for different claims touch different files.
//
// See docs/cdi.md for the device names, what a container gets, and the options.
package cdi

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/klog/v2"
	cdiparser "tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// VisibleDevicesVoid is set in every container that gets one of our devices, so that a legacy
// nvidia-container-runtime hook, if the node still has one, injects nothing on top of the spec.
const VisibleDevicesVoid = "NVIDIA_VISIBLE_DEVICES=void"

// mountOptions are the options of every read-only mount of the driver's files (nvidia-ctk's).
var mountOptions = []string{"ro", "nosuid", "nodev", "rbind", "rprivate"}

// rwMountOptions are those of the MPS shared-memory directory, which clients write to.
var rwMountOptions = []string{"nosuid", "nodev", "rbind", "rprivate"}

// The kernel's names of the NVIDIA character-device majors in /proc/devices.
const (
	procFrontend = "nvidia-frontend"
	procUVM      = "nvidia-uvm"
	procCaps     = "nvidia-caps"
)

// Default device-node modes when a node is not on the host: what nvidia-modprobe gives them.
const (
	defaultNodeMode fs.FileMode = 0o666
	defaultCapMode  fs.FileMode = 0o444
)

// Generator writes CDI specs for one node. It is safe for concurrent use.
type Generator struct {
	cfg           config
	vendor, class string
	driverVersion string
	// majors from <proc root>/devices, by name; absent when the module is not loaded.
	majors map[string]int64
	// common holds the spec-wide edits, found once. Never modified after New.
	common specs.ContainerEdits
}

// New checks the options and finds the edits every container gets: the control device nodes, the
// driver's libraries (those named by the driver version), utilities, firmware and IPC sockets, and
// the nvidia-cdi-hook hooks. A missing driver root, /dev/nvidiactl, driver library or hook binary is
// an error naming the path.
func New(opts ...Option) (*Generator, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.normalize(); err != nil {
		return nil, fmt.Errorf("cdi: %w", err)
	}
	vendor, class := cdiparser.ParseQualifier(cfg.vendorClass)
	if err := cdiparser.ValidateVendorName(vendor); err != nil {
		return nil, fmt.Errorf("cdi: CDI kind %q: %w", cfg.vendorClass, err)
	}
	if err := cdiparser.ValidateClassName(class); err != nil {
		return nil, fmt.Errorf("cdi: CDI kind %q: %w", cfg.vendorClass, err)
	}
	g := &Generator{cfg: cfg, vendor: vendor, class: class}
	if err := g.discover(); err != nil {
		return nil, fmt.Errorf("cdi: %w", err)
	}
	klog.V(2).InfoS("CDI generator ready", "kind", cfg.vendorClass, "driverRoot", cfg.driverRoot, "hostDriverRoot", cfg.hostDriverRoot,
		"containerDriverRoot", cfg.containerDriverRoot, "devRoot", cfg.devRoot, "driverVersion", g.driverVersion,
		"mounts", len(g.common.Mounts), "hooks", len(g.common.Hooks))
	return g, nil
}

// Kind is the CDI kind of the specs ("vendor/class").
func (g *Generator) Kind() string { return g.cfg.vendorClass }

// SpecDir is the directory specs are written to.
func (g *Generator) SpecDir() string { return g.cfg.specDir }

// DriverVersion is the driver version whose libraries the specs mount.
func (g *Generator) DriverVersion() string { return g.driverVersion }

// QualifiedName is the fully qualified CDI device name of an unqualified one: kind=name.
func (g *Generator) QualifiedName(name string) string {
	return cdiparser.QualifiedName(g.vendor, g.class, name)
}

// CommonEdits returns a copy of the edits every container given one of our devices gets.
func (g *Generator) CommonEdits() specs.ContainerEdits { return cloneEdits(g.common) }

func (g *Generator) discover() error {
	for _, d := range []struct{ what, path string }{
		{"driver root", g.cfg.driverRoot},
		{"dev root", g.cfg.devRoot},
		{"proc root", g.cfg.procRoot},
	} {
		if err := isDir(d.path); err != nil {
			return fmt.Errorf("%s: %w", d.what, err)
		}
	}
	majors, err := readProcDevices(filepath.Join(g.cfg.procRoot, "devices"))
	if err != nil {
		return err
	}
	g.majors = majors
	g.driverVersion = g.cfg.driverVersion
	if g.driverVersion == "" {
		if g.driverVersion, err = readDriverVersion(filepath.Join(g.cfg.procRoot, "driver", "nvidia", "version")); err != nil {
			return err
		}
	} else if !driverVersionRE.MatchString(g.driverVersion) {
		return fmt.Errorf("driver version %q is not of the form 570.133.20", g.driverVersion)
	}

	var e specs.ContainerEdits
	e.Env = []string{VisibleDevicesVoid}
	if e.DeviceNodes, err = g.controlNodes(); err != nil {
		return err
	}
	libs, links, err := g.driverLibraries()
	if err != nil {
		return err
	}
	e.Mounts = append(e.Mounts, libs...)
	e.Mounts = append(e.Mounts, g.driverBinaries()...)
	fw, err := g.firmware()
	if err != nil {
		return err
	}
	e.Mounts = append(e.Mounts, fw...)
	e.Mounts = append(e.Mounts, g.ipcSockets()...)
	slices.SortFunc(e.Mounts, func(a, b *specs.Mount) int { return strings.Compare(a.ContainerPath, b.ContainerPath) })
	if !g.cfg.noHooks {
		if e.Hooks, err = g.hooks(libs, links); err != nil {
			return err
		}
	}
	g.common = e
	return nil
}

func isDir(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", path)
	}
	return nil
}

// readProcDevices reads the character-device majors of /proc/devices, by name.
func readProcDevices(path string) (map[string]int64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading device majors: %w", err)
	}
	majors := map[string]int64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	inChar := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch line {
		case "Character devices:":
			inChar = true
			continue
		case "Block devices:":
			inChar = false
			continue
		}
		if !inChar || line == "" {
			continue
		}
		num, name, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		major, err := strconv.ParseInt(num, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: malformed line %q", path, line)
		}
		name = strings.TrimSpace(name)
		if _, dup := majors[name]; !dup {
			majors[name] = major
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return majors, nil
}

var (
	driverVersionRE = regexp.MustCompile(`^[0-9]+(\.[0-9]+)+$`)
)

// readDriverVersion takes the driver version from the NVRM line of /proc/driver/nvidia/version:
// the first field after "Module" that looks like a version
// ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build …").
func readDriverVersion(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading the driver version: %w (is the NVIDIA driver loaded, and --proc-root right?)", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "NVRM version:") {
			continue
		}
		_, rest, ok := strings.Cut(line, "Module")
		if !ok {
			rest = line
		}
		for _, f := range strings.Fields(rest) {
			if driverVersionRE.MatchString(f) {
				return f, nil
			}
		}
	}
	return "", fmt.Errorf("%s: no driver version in the NVRM version line", path)
}

// node is a character device node for a spec, fully specified (type, major, minor, mode), so the
// runtime never needs to stat the host to complete it. The host path is recorded when it differs.
func (g *Generator) node(containerPath, hostPath string, major, minor int64, mode fs.FileMode) *specs.DeviceNode {
	n := &specs.DeviceNode{
		Path:     containerPath,
		Type:     "c",
		Major:    major,
		Minor:    minor,
		FileMode: &mode,
	}
	if hostPath != containerPath {
		n.HostPath = hostPath
	}
	return n
}

// hostNode reads a host device node: its numbers and permission bits. wantMajor, if not 0, and
// wantMinor, if not -1, must match.
func hostNode(path string, wantMajor, wantMinor int64) (major, minor int64, mode fs.FileMode, err error) {
	maj, mnr, _, err := host.DeviceNumbers(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, 0, 0, fmt.Errorf("device node %s does not exist", path)
		}
		return 0, 0, 0, fmt.Errorf("device node %s: %w", path, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("device node %s: %w", path, err)
	}
	major, minor = int64(maj), int64(mnr)
	if (wantMajor != 0 && major != wantMajor) || (wantMinor >= 0 && minor != wantMinor) {
		want := fmt.Sprintf("%d:%d", wantMajor, wantMinor)
		if wantMajor == 0 {
			want = fmt.Sprintf("minor %d", wantMinor)
		} else if wantMinor < 0 {
			want = fmt.Sprintf("major %d", wantMajor)
		}
		return 0, 0, 0, fmt.Errorf("device node %s is %d:%d, want %s", path, major, minor, want)
	}
	return major, minor, fi.Mode().Perm(), nil
}

// controlNodes are /dev/nvidiactl (required) and, when present on the host, /dev/nvidia-uvm,
// /dev/nvidia-uvm-tools and /dev/nvidia-modeset.
func (g *Generator) controlNodes() ([]*specs.DeviceNode, error) {
	var out []*specs.DeviceNode
	for _, n := range []struct {
		name     string
		procName string
		minor    int64
		required bool
	}{
		{"nvidiactl", procFrontend, host.NvidiaCtlMinor, true},
		{"nvidia-uvm", procUVM, host.UVMMinor, false},
		{"nvidia-uvm-tools", procUVM, host.UVMToolsMinor, false},
		{"nvidia-modeset", procFrontend, host.NvidiaModesetMinor, false},
	} {
		hostPath := filepath.Join(g.cfg.devRoot, n.name)
		if _, err := os.Lstat(hostPath); errors.Is(err, fs.ErrNotExist) && !n.required {
			klog.V(2).InfoS("CDI: optional device node not on the host, left out", "path", hostPath)
			continue
		}
		major, minor, mode, err := hostNode(hostPath, g.majors[n.procName], n.minor)
		if err != nil {
			return nil, err
		}
		out = append(out, g.node("/dev/"+n.name, hostPath, major, minor, mode))
	}
	return out, nil
}

// mount is a read-only bind mount of a host file under the driver root at its place under the
// container driver root.
func (g *Generator) mount(rel string) *specs.Mount {
	return &specs.Mount{
		HostPath:      filepath.Join(g.cfg.hostDriverRoot, rel),
		ContainerPath: filepath.Join(g.cfg.containerDriverRoot, rel),
		Options:       slices.Clone(mountOptions),
	}
}

// libLink is a symlink the create-symlinks hook makes in a container library directory.
type libLink struct {
	dir    string // library directory, relative to the driver root
	name   string // the link's name
	target string // what it points to (a name in the same directory)
}

// driverLibraries finds the driver's libraries: every lib*.so.<driver version> in the library
// search paths (the first directory holding a name wins), and the symlinks pointing to them there.
// libcuda and libnvidia-ml must be among them.
func (g *Generator) driverLibraries() ([]*specs.Mount, []libLink, error) {
	suffix := ".so." + g.driverVersion
	var (
		mounts  []*specs.Mount
		links   []libLink
		seen    = map[string]bool{}
		visited []os.FileInfo
	)
	for _, rel := range g.cfg.libDirs {
		dir := filepath.Join(g.cfg.driverRoot, rel)
		fi, err := os.Stat(dir)
		if err != nil || !fi.IsDir() {
			continue
		}
		if slices.ContainsFunc(visited, func(o os.FileInfo) bool { return os.SameFile(o, fi) }) {
			continue // the same directory under another name (lib -> usr/lib)
		}
		visited = append(visited, fi)
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, nil, fmt.Errorf("reading driver library directory: %w", err)
		}
		found := map[string]bool{}
		for _, e := range entries {
			name := e.Name()
			if !strings.HasPrefix(name, "lib") || !strings.HasSuffix(name, suffix) || seen[name] {
				continue
			}
			if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || !fi.Mode().IsRegular() {
				continue
			}
			seen[name], found[name] = true, true
			mounts = append(mounts, g.mount(filepath.Join(rel, name)))
		}
		if len(found) == 0 {
			continue
		}
		links = append(links, libraryLinks(dir, rel, entries, found)...)
	}
	var missing []string
	for _, lib := range []string{"libcuda", "libnvidia-ml"} {
		if !seen[lib+suffix] {
			missing = append(missing, lib+suffix)
		}
	}
	if len(missing) > 0 {
		return nil, nil, fmt.Errorf("driver root %s: no %s in %s (is the driver root right, and is driver %s installed there?)",
			g.cfg.driverRoot, strings.Join(missing, " or "), strings.Join(g.cfg.libDirs, ", "), g.driverVersion)
	}
	return mounts, links, nil
}

// libraryLinks lists the symlinks of a library directory that lead, within the directory, to one of
// the libraries found (soname and development links such as libcuda.so.1 and libcuda.so), plus
// libcuda.so -> libcuda.so.1, which many applications dlopen and which not every host has.
func libraryLinks(dir, rel string, entries []os.DirEntry, found map[string]bool) []libLink {
	var out []libLink
	names := map[string]bool{}
	for _, e := range entries {
		if e.Type()&fs.ModeSymlink == 0 {
			continue
		}
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || strings.Contains(target, "/") {
			continue
		}
		// Follow the chain inside the directory.
		end := target
		for hops := 0; hops < 8; hops++ {
			next, err := os.Readlink(filepath.Join(dir, end))
			if err != nil || strings.Contains(next, "/") {
				break
			}
			end = next
		}
		if found[end] {
			out = append(out, libLink{dir: rel, name: e.Name(), target: target})
			names[e.Name()] = true
		}
	}
	for name := range found {
		if strings.HasPrefix(name, "libcuda.so.") && !names["libcuda.so"] {
			out = append(out, libLink{dir: rel, name: "libcuda.so", target: "libcuda.so.1"})
			break
		}
	}
	return out
}

// driverBinaries are the utilities found under the driver root (the first of the usual directories
// holding each): nvidia-smi, the MPS control daemon and server, and the others nvidia-ctk mounts.
func (g *Generator) driverBinaries() []*specs.Mount {
	var out []*specs.Mount
	for _, bin := range []string{
		"nvidia-smi", "nvidia-debugdump", "nvidia-persistenced",
		"nvidia-cuda-mps-control", "nvidia-cuda-mps-server",
		"nvidia-imex", "nvidia-imex-ctl",
	} {
		for _, dir := range []string{"usr/bin", "usr/sbin", "bin", "sbin", "usr/local/bin"} {
			rel := filepath.Join(dir, bin)
			fi, err := os.Stat(filepath.Join(g.cfg.driverRoot, rel))
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
				continue
			}
			out = append(out, g.mount(rel))
			break
		}
	}
	return out
}

// firmware lists the GSP firmware of the driver version: lib/firmware/nvidia/<version>/gsp*.bin.
func (g *Generator) firmware() ([]*specs.Mount, error) {
	var (
		out     []*specs.Mount
		visited []os.FileInfo
	)
	for _, fwDir := range []string{"lib/firmware/nvidia", "usr/lib/firmware/nvidia"} {
		rel := filepath.Join(fwDir, g.driverVersion)
		dir := filepath.Join(g.cfg.driverRoot, rel)
		fi, err := os.Stat(dir)
		if err != nil || !fi.IsDir() {
			continue
		}
		if slices.ContainsFunc(visited, func(o os.FileInfo) bool { return os.SameFile(o, fi) }) {
			continue
		}
		visited = append(visited, fi)
		files, err := filepath.Glob(filepath.Join(dir, "gsp*.bin"))
		if err != nil {
			return nil, err
		}
		slices.Sort(files)
		for _, f := range files {
			out = append(out, g.mount(filepath.Join(rel, filepath.Base(f))))
		}
	}
	return out, nil
}

// ipcSockets are the sockets of nvidia-persistenced and nvidia-fabricmanager under the driver root
// (run/…, or var/run/…), mounted at /run/… in the container.
func (g *Generator) ipcSockets() []*specs.Mount {
	var out []*specs.Mount
	for _, sock := range []string{"nvidia-persistenced/socket", "nvidia-fabricmanager/socket"} {
		for _, run := range []string{"run", "var/run"} {
			if _, err := os.Stat(filepath.Join(g.cfg.driverRoot, run, sock)); err != nil {
				continue
			}
			out = append(out, &specs.Mount{
				HostPath:      filepath.Join(g.cfg.hostDriverRoot, run, sock),
				ContainerPath: filepath.Join("/run", sock),
				Options:       slices.Clone(mountOptions),
			})
			break
		}
	}
	return out
}

// hooks are nvidia-cdi-hook's create-symlinks (the libraries' soname and .so links), enable-cuda-compat
// (CUDA forward compatibility when the image brings a newer libcuda) and update-ldcache (so that the
// loader finds the mounted libraries), all createContainer hooks, run in that order.
func (g *Generator) hooks(libs []*specs.Mount, links []libLink) ([]*specs.Hook, error) {
	path := g.cfg.hookPath
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("hook binary %s does not exist: install the NVIDIA Container Toolkit, point the hook "+
			"path at its nvidia-cdi-hook, or waive the hooks explicitly (--no-hooks)", path)
	case err != nil:
		return nil, fmt.Errorf("hook binary: %w", err)
	case !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0:
		return nil, fmt.Errorf("hook binary %s is not an executable file", path)
	}
	argv0 := []string{filepath.Base(path)}
	if argv0[0] == "nvidia-ctk" {
		argv0 = append(argv0, "hook")
	}
	hook := func(args ...string) *specs.Hook {
		return &specs.Hook{HookName: "createContainer", Path: path, Args: append(slices.Clone(argv0), args...)}
	}

	var out []*specs.Hook
	var linkArgs []string
	slices.SortFunc(links, func(a, b libLink) int {
		return strings.Compare(filepath.Join(a.dir, a.name), filepath.Join(b.dir, b.name))
	})
	for _, l := range links {
		linkArgs = append(linkArgs, "--link",
			l.target+"::"+filepath.Join(g.cfg.containerDriverRoot, l.dir, l.name))
	}
	if len(linkArgs) > 0 {
		out = append(out, hook(append([]string{"create-symlinks"}, linkArgs...)...))
	}
	if !g.cfg.noCUDACompatHook {
		out = append(out, hook("enable-cuda-compat", "--host-driver-version="+g.driverVersion))
	}
	var folders []string
	for _, m := range libs {
		if d := filepath.Dir(m.ContainerPath); !slices.Contains(folders, d) {
			folders = append(folders, d)
		}
	}
	slices.Sort(folders)
	ld := []string{"update-ldcache"}
	for _, f := range folders {
		ld = append(ld, "--folder", f)
	}
	out = append(out, hook(ld...))
	return out, nil
}

func cloneEdits(e specs.ContainerEdits) specs.ContainerEdits {
	out := specs.ContainerEdits{Env: slices.Clone(e.Env)}
	for _, n := range e.DeviceNodes {
		c := *n
		if n.FileMode != nil {
			m := *n.FileMode
			c.FileMode = &m
		}
		out.DeviceNodes = append(out.DeviceNodes, &c)
	}
	for _, m := range e.Mounts {
		c := *m
		c.Options = slices.Clone(m.Options)
		out.Mounts = append(out.Mounts, &c)
	}
	for _, h := range e.Hooks {
		c := *h
		c.Args, c.Env = slices.Clone(h.Args), slices.Clone(h.Env)
		out.Hooks = append(out.Hooks, &c)
	}
	return out
}
