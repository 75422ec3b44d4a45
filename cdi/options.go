package cdi

import (
	"fmt"
	"path/filepath"
	"runtime"
)

// Defaults of a Generator's options.
const (
	// DefaultVendorClass is the CDI kind of Tessera's specs. It differs from nvidia-ctk's
	// nvidia.com/gpu, so no device of ours can ever collide with one of NVIDIA's (the CDI cache drops
	// every device that two specs of the same priority define).
	DefaultVendorClass = "tessera.dev/gpu"
	// DefaultSpecDir is where containerd and CRI-O look for transient specs by default.
	DefaultSpecDir = "/var/run/cdi"
	// DefaultHookPath is where the NVIDIA Container Toolkit installs nvidia-cdi-hook.
	DefaultHookPath = "/usr/bin/nvidia-cdi-hook"
)

// reservedKinds are kinds whose device names we would collide with: nvidia-ctk cdi generate names
// its nvidia.com/gpu devices by index, UUID and "all" as we do.
var reservedKinds = map[string]bool{"nvidia.com/gpu": true}

// Option configures a Generator.
type Option func(*config)

type config struct {
	driverRoot          string
	hostDriverRoot      string
	containerDriverRoot string
	devRoot             string
	procRoot            string
	specDir             string
	vendorClass         string
	hookPath            string
	noHooks             bool
	noCUDACompatHook    bool
	driverVersion       string
	libDirs             []string
}

func defaultConfig() config {
	return config{
		driverRoot:          "/",
		containerDriverRoot: "/",
		devRoot:             "/dev",
		procRoot:            "/proc",
		specDir:             DefaultSpecDir,
		vendorClass:         DefaultVendorClass,
		hookPath:            DefaultHookPath,
		libDirs:             defaultLibDirs(runtime.GOARCH),
	}
}

// WithDriverRoot sets the host driver root: the directory on the host under which the driver's
// user-space files (libraries, utilities, firmware, IPC sockets) are installed as they would be under /.
// It is "/" for a driver installed on the host and /run/nvidia/driver under the GPU operator. Mounts
// in the specs name host paths under it. Default "/".
func WithDriverRoot(dir string) Option { return func(c *config) { c.driverRoot = dir } }

// WithHostDriverRoot sets the driver root's path on the host when this process sees it elsewhere (a
// container that mounts the host's /run/nvidia/driver, or /, at /driver-root reads the driver's
// files at WithDriverRoot and must still name host paths in the specs the runtime reads). Default:
// the driver root.
func WithHostDriverRoot(dir string) Option { return func(c *config) { c.hostDriverRoot = dir } }

// WithContainerDriverRoot sets where containers see the driver root: a library found at
// <driver root>/usr/lib/x86_64-linux-gnu/libcuda.so.570.133.20 is mounted at
// <container driver root>/usr/lib/x86_64-linux-gnu/libcuda.so.570.133.20. Default "/".
func WithContainerDriverRoot(dir string) Option {
	return func(c *config) { c.containerDriverRoot = dir }
}

// WithDevRoot sets the host directory holding the NVIDIA device nodes (nvidia<N>, nvidiactl,
// nvidia-caps/, ...). Unlike nvidia-ctk's --dev-root it is the dev directory itself, not its parent.
// Default "/dev".
func WithDevRoot(dir string) Option { return func(c *config) { c.devRoot = dir } }

// WithProcRoot sets the host directory holding the kernel's procfs files the generator reads
// (devices, driver/nvidia/version, driver/nvidia/capabilities). Default "/proc".
func WithProcRoot(dir string) Option { return func(c *config) { c.procRoot = dir } }

// WithSpecDir sets the directory specs are written to. Default DefaultSpecDir.
func WithSpecDir(dir string) Option { return func(c *config) { c.specDir = dir } }

// WithVendorClass sets the CDI kind ("vendor/class"). Default DefaultVendorClass. nvidia.com/gpu
// is refused: our device names would collide with nvidia-ctk's.
func WithVendorClass(kind string) Option { return func(c *config) { c.vendorClass = kind } }

// WithHookPath sets the path of nvidia-cdi-hook (or nvidia-ctk) as the container runtime sees it.
// It must exist: a spec whose hook binary is missing makes every container start fail.
// Default DefaultHookPath.
func WithHookPath(path string) Option { return func(c *config) { c.hookPath = path } }

// WithoutHooks waives the nvidia-cdi-hook hooks (symlinks, CUDA compat, ldcache). Containers then
// get the driver's files, but CUDA finds libcuda only if the image's loader configuration already
// names the library directory. For nodes without the NVIDIA Container Toolkit, such as simulated ones.
func WithoutHooks() Option { return func(c *config) { c.noHooks = true } }

// WithoutCUDACompatHook leaves out the enable-cuda-compat hook, which nvidia-cdi-hook has had since
// NVIDIA Container Toolkit 1.17.5; an older hook binary fails containers that ask for it.
func WithoutCUDACompatHook() Option { return func(c *config) { c.noCUDACompatHook = true } }

// WithDriverVersion sets the driver version whose libraries are mounted. By default it is read from
// <proc root>/driver/nvidia/version.
func WithDriverVersion(v string) Option { return func(c *config) { c.driverVersion = v } }

// WithLibrarySearchPaths replaces the directories, relative to the driver root, searched for the
// driver's libraries (by default the usual 64-bit library directories of Debian, Ubuntu and RHEL
// derivatives for this architecture).
func WithLibrarySearchPaths(dirs ...string) Option {
	return func(c *config) { c.libDirs = append([]string(nil), dirs...) }
}

func defaultLibDirs(goarch string) []string {
	triplet := "x86_64-linux-gnu"
	if goarch == "arm64" {
		triplet = "aarch64-linux-gnu"
	}
	return []string{
		"usr/lib/" + triplet,
		"usr/lib/" + triplet + "/nvidia/current",
		"lib/" + triplet,
		"usr/lib64",
		"lib64",
		"usr/lib",
		"lib",
	}
}

// normalize checks the options and makes the roots absolute and clean.
func (c *config) normalize() error {
	if c.hostDriverRoot == "" {
		c.hostDriverRoot = c.driverRoot
	}
	for _, p := range []struct {
		name string
		v    *string
	}{
		{"driver root", &c.driverRoot},
		{"host driver root", &c.hostDriverRoot},
		{"container driver root", &c.containerDriverRoot},
		{"dev root", &c.devRoot},
		{"proc root", &c.procRoot},
		{"spec directory", &c.specDir},
	} {
		if *p.v == "" {
			return fmt.Errorf("%s is empty", p.name)
		}
		if !filepath.IsAbs(*p.v) {
			return fmt.Errorf("%s %q is not an absolute path", p.name, *p.v)
		}
		*p.v = filepath.Clean(*p.v)
	}
	if reservedKinds[c.vendorClass] {
		return fmt.Errorf("CDI kind %s is nvidia-ctk's: our device names would collide with its devices and the "+
			"container runtime would drop both; use another kind (default %s)", c.vendorClass, DefaultVendorClass)
	}
	if !c.noHooks && !filepath.IsAbs(c.hookPath) {
		return fmt.Errorf("hook path %q is not an absolute path", c.hookPath)
	}
	for _, d := range c.libDirs {
		if d == "" || filepath.IsAbs(d) {
			return fmt.Errorf("library search path %q must be relative to the driver root", d)
		}
	}
	return nil
}
