package cdi_test

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// dev is an expected linux.devices entry.
type dev struct {
	path         string
	major, minor int64
	mode         os.FileMode
}

// controlDevs are the devices every container gets on a simulated host (it has all four nodes).
var controlDevs = []dev{
	{"/dev/nvidiactl", host.NvidiaMajor, host.NvidiaCtlMinor, 0o666},
	{"/dev/nvidia-uvm", host.UVMMajor, host.UVMMinor, 0o666},
	{"/dev/nvidia-uvm-tools", host.UVMMajor, host.UVMToolsMinor, 0o666},
	{"/dev/nvidia-modeset", host.NvidiaMajor, host.NvidiaModesetMinor, 0o666},
}

// checkInjected checks what the injection put into the OCI spec, beyond the golden file: exactly
// these device nodes (in order, with type, numbers and mode), an allow rule for each in the device
// cgroup after the base deny-all, the legacy-hook guard, the driver's libraries and the hooks.
func checkInjected(t *testing.T, e *env, s *oci.Spec, devs []dev, hooks bool) {
	t.Helper()
	want := append(slices.Clone(controlDevs), devs...)
	var got []dev
	for _, d := range s.Linux.Devices {
		if d.Type != "c" || d.FileMode == nil {
			t.Errorf("device %s: type %q, mode %v: not fully specified", d.Path, d.Type, d.FileMode)
			continue
		}
		got = append(got, dev{d.Path, d.Major, d.Minor, *d.FileMode})
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("linux.devices:\n got %v\nwant %v", got, want)
	}
	rules := s.Linux.Resources.Devices
	if len(rules) != 1+len(want) || rules[0].Allow {
		t.Fatalf("device cgroup rules %+v: want the base deny-all and %d allows", rules, len(want))
	}
	for i, d := range want {
		r := rules[i+1]
		if !r.Allow || r.Type != "c" || r.Major == nil || *r.Major != d.major || r.Minor == nil || *r.Minor != d.minor || r.Access != "rwm" {
			t.Errorf("cgroup rule %d = %+v, want allow c %d:%d rwm", i+1, r, d.major, d.minor)
		}
	}
	if !slices.Contains(s.Process.Env, cdi.VisibleDevicesVoid) {
		t.Errorf("env %v lacks %s", s.Process.Env, cdi.VisibleDevicesVoid)
	}
	lib := filepath.Join(e.host.LibPath(), "libcuda.so.570.133.20")
	if !slices.ContainsFunc(s.Mounts, func(m oci.Mount) bool {
		return m.Source == lib && m.Destination == "/usr/lib/x86_64-linux-gnu/libcuda.so.570.133.20"
	}) {
		t.Errorf("no mount of %s", lib)
	}
	for _, m := range s.Mounts {
		if strings.HasPrefix(m.Source, e.host.Root()) {
			if _, err := os.Stat(m.Source); err != nil {
				t.Errorf("mount source %s: %v", m.Source, err)
			}
		}
	}
	if hooks {
		var names []string
		for _, h := range s.Hooks.CreateContainer {
			if h.Path != e.hook || len(h.Args) < 2 || h.Args[0] != "nvidia-cdi-hook" {
				t.Errorf("hook %+v", h)
				continue
			}
			names = append(names, h.Args[1])
		}
		if want := []string{"create-symlinks", "enable-cuda-compat", "update-ldcache"}; !slices.Equal(names, want) {
			t.Errorf("createContainer hooks %v, want %v", names, want)
		}
	}
}

// TestInjectGolden writes a node spec (whole GPUs, GPU 1's seven MIG devices, two time-sliced
// replicas of GPU 0, an MPS fraction of GPU 2) and a claim spec for a simulated dgx-a100, and
// injects one device of each kind into an OCI spec with the CDI library, as containerd 2.x and
// CRI-O do. The results are compared with golden files reviewed by eye once.
func TestInjectGolden(t *testing.T) {
	e := newEnv(t, "gpu1-all-1g")
	g := e.generator(t)
	snap := e.snapshot(t)
	gpu0, gpu1, gpu2, gpu3 := snap.GPUs[0], snap.GPUs[1], snap.GPUs[2], snap.GPUs[3]
	if len(gpu1.MigDevices) != 7 || len(gpu0.MigDevices) != 0 {
		t.Fatalf("layout: GPU 0 has %d MIG devices, GPU 1 %d", len(gpu0.MigDevices), len(gpu1.MigDevices))
	}
	mps := cdi.MPS{
		Replica: 0, PipeDir: filepath.Join(e.tmp, "mps", "gpu2", "pipe"), ShmDir: filepath.Join(e.tmp, "mps", "shm"),
		ActiveThreadPercentage: 50, PinnedMemoryLimitMiB: 10240,
	}
	for _, d := range []string{mps.PipeDir, mps.ShmDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	whole0 := cdi.WholeGPU(gpu0.GPU)
	devices := cdi.FromSnapshot(snap)
	devices = append(devices, whole0.Replica(0), whole0.Replica(1), cdi.WholeGPU(gpu2.GPU).MPSFraction(mps))
	path, err := g.WriteNodeSpec(devices)
	if err != nil {
		t.Fatal(err)
	}
	if path != filepath.Join(e.specDir, "tessera.dev-gpu.json") {
		t.Errorf("node spec path %s", path)
	}

	gpuDev := func(gpu int) dev { return dev{fmt.Sprintf("/dev/nvidia%d", gpu), host.NvidiaMajor, int64(gpu), 0o666} }
	capDev := func(minor int) dev {
		return dev{fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", minor), host.CapsMajor, int64(minor), 0o444}
	}
	m1 := gpu1.MigDevices[0]
	m1b := gpu1.MigDevices[3]
	claimUID := "4f9d2c1e-8a7b-4c3d-9e2f-0123456789ab"

	for _, tc := range []struct {
		name    string
		devices []string // qualified names to inject
		same    []string // other names that must inject the same
		want    []dev
		setup   func(t *testing.T) []string
	}{
		{
			name:    "whole-gpu",
			devices: []string{"tessera.dev/gpu=0"},
			same:    []string{"tessera.dev/gpu=" + gpu0.UUID},
			want:    []dev{gpuDev(gpu0.Minor)},
		},
		{
			name:    "mig",
			devices: []string{fmt.Sprintf("tessera.dev/gpu=1:%d:%d", m1.GI, m1.CI)},
			same:    []string{"tessera.dev/gpu=" + m1.UUID},
			want:    []dev{gpuDev(gpu1.Minor), capDev(host.GIMinor(gpu1.Minor, m1.GI)), capDev(host.CIMinor(gpu1.Minor, m1.GI, m1.CI))},
		},
		{
			name:    "time-sliced",
			devices: []string{"tessera.dev/gpu=" + gpu0.UUID + "::1"},
			want:    []dev{gpuDev(gpu0.Minor)},
		},
		{
			name:    "mps",
			devices: []string{"tessera.dev/gpu=" + gpu2.UUID + "::mps-0"},
			want:    []dev{gpuDev(gpu2.Minor)},
		},
		{
			name: "claim",
			want: []dev{gpuDev(gpu1.Minor), capDev(host.GIMinor(gpu1.Minor, m1b.GI)), capDev(host.CIMinor(gpu1.Minor, m1b.GI, m1b.CI)), gpuDev(gpu3.Minor)},
			setup: func(t *testing.T) []string {
				names, err := g.WriteClaimSpec(claimUID, []cdi.Device{cdi.WholeGPU(gpu3.GPU), cdi.MIGDevice(gpu1.GPU, m1b)})
				if err != nil {
					t.Fatal(err)
				}
				want := []string{
					"tessera.dev/gpu=" + claimUID + "_" + gpu3.UUID,
					"tessera.dev/gpu=" + claimUID + "_" + m1b.UUID,
				}
				if !slices.Equal(names, want) {
					t.Errorf("claim device names %v, want %v", names, want)
				}
				data, err := os.ReadFile(filepath.Join(e.specDir, "tessera.dev-gpu_"+claimUID+".json"))
				if err != nil {
					t.Fatal(err)
				}
				golden(t, "claim-spec", []byte(e.normalize(string(data), nil)))
				// The MIG device sorts first in the spec and in linux.devices; the names keep the order asked.
				return []string{names[1], names[0]}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			names := tc.devices
			if tc.setup != nil {
				names = tc.setup(t)
			}
			s := e.inject(t, names...)
			checkInjected(t, e, s, tc.want, true)
			got := marshal(t, s)
			golden(t, "inject-"+tc.name, []byte(e.normalize(string(got), nil)))
			for _, other := range tc.same {
				if o := marshal(t, e.inject(t, other)); string(o) != string(got) {
					t.Errorf("%s injects differently from %s", other, names[0])
				}
			}
		})
	}

	// Replica and MPS environment, and MPS mounts, checked by hand too.
	s := e.inject(t, "tessera.dev/gpu="+gpu0.UUID+"::1")
	if !slices.Contains(s.Process.Env, cdi.ReplicaEnv+"="+gpu0.UUID+"::1") {
		t.Errorf("replica env missing: %v", s.Process.Env)
	}
	s = e.inject(t, "tessera.dev/gpu="+gpu2.UUID+"::mps-0")
	for _, v := range []string{"CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50",
		"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M"} {
		if !slices.Contains(s.Process.Env, v) {
			t.Errorf("MPS env lacks %s: %v", v, s.Process.Env)
		}
	}
	shm := 0
	for _, m := range s.Mounts {
		if m.Destination == "/dev/shm" {
			shm++
			if m.Source != mps.ShmDir {
				t.Errorf("/dev/shm from %s, want %s", m.Source, mps.ShmDir)
			}
		}
	}
	if shm != 1 {
		t.Errorf("%d /dev/shm mounts, want exactly the MPS one", shm)
	}
}

// TestAll1gDGXA100 is the done-when: on sim:dgx-a100 with every GPU cut into seven 1g.5gb
// instances, the node spec validates, has the minimum cdiVersion, and every one of its devices
// injects its GPU node and, for MIG devices, the right nvidia-caps nodes.
func TestAll1gDGXA100(t *testing.T) {
	e := newEnv(t, "all-1g")
	g := e.generator(t)
	snap := e.snapshot(t)
	devices := cdi.FromSnapshot(snap)
	if len(devices) != 8+8*7 {
		t.Fatalf("%d devices, want 64", len(devices))
	}
	path, err := g.WriteNodeSpec(devices)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := cdiapi.ReadSpec(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Version != "0.5.0" {
		t.Errorf("cdiVersion %s, want 0.5.0 (device names start with digits; nothing newer is used)", spec.Version)
	}
	if err := specs.ValidateVersion(spec.Spec); err != nil {
		t.Error(err)
	}
	if len(spec.Devices) != 128 {
		t.Errorf("%d devices in the spec, want 128", len(spec.Devices))
	}
	l, err := cdi.List(e.specDir, g.Kind())
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Devices) != 128 || len(l.Errors) != 0 {
		t.Fatalf("listed %d devices, errors %v", len(l.Devices), l.Errors)
	}
	for _, gpu := range snap.GPUs {
		gdev := dev{fmt.Sprintf("/dev/nvidia%d", gpu.Minor), host.NvidiaMajor, int64(gpu.Minor), 0o666}
		for _, name := range []string{fmt.Sprint(gpu.Index), gpu.UUID} {
			checkInjected(t, e, e.inject(t, "tessera.dev/gpu="+name), []dev{gdev}, true)
		}
		for _, m := range gpu.MigDevices {
			want := []dev{gdev,
				{fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", host.GIMinor(gpu.Minor, m.GI)), host.CapsMajor, int64(host.GIMinor(gpu.Minor, m.GI)), 0o444},
				{fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", host.CIMinor(gpu.Minor, m.GI, m.CI)), host.CapsMajor, int64(host.CIMinor(gpu.Minor, m.GI, m.CI)), 0o444},
			}
			for _, name := range []string{fmt.Sprintf("%d:%d:%d", gpu.Index, m.GI, m.CI), m.UUID} {
				checkInjected(t, e, e.inject(t, "tessera.dev/gpu="+name), want, true)
			}
		}
	}
}

// The common edits hold what nvidia-ctk would mount from the simulated driver root, and the hooks
// carry nvidia-cdi-hook's arguments for container paths under the container driver root.
func TestCommonEdits(t *testing.T) {
	e := newEnv(t, "")
	g := e.generator(t, cdi.WithContainerDriverRoot("/usr/local/nvidia"))
	c := g.CommonEdits()
	var dst []string
	for _, m := range c.Mounts {
		dst = append(dst, m.ContainerPath)
		if !slices.Equal(m.Options, []string{"ro", "nosuid", "nodev", "rbind", "rprivate"}) {
			t.Errorf("mount %s options %v", m.ContainerPath, m.Options)
		}
	}
	lib := "/usr/local/nvidia/usr/lib/x86_64-linux-gnu/"
	want := []string{
		"/run/nvidia-persistenced/socket",
		"/usr/local/nvidia/lib/firmware/nvidia/570.133.20/gsp_ga10x.bin",
		"/usr/local/nvidia/lib/firmware/nvidia/570.133.20/gsp_tu10x.bin",
		"/usr/local/nvidia/usr/bin/nvidia-cuda-mps-control",
		"/usr/local/nvidia/usr/bin/nvidia-cuda-mps-server",
		"/usr/local/nvidia/usr/bin/nvidia-persistenced",
		"/usr/local/nvidia/usr/bin/nvidia-smi",
	}
	for _, l := range []string{"libcuda", "libcudadebugger", "libnvidia-allocator", "libnvidia-cfg", "libnvidia-gpucomp",
		"libnvidia-ml", "libnvidia-nvvm", "libnvidia-opencl", "libnvidia-pkcs11-openssl3", "libnvidia-pkcs11", "libnvidia-ptxjitcompiler"} {
		want = append(want, lib+l+".so.570.133.20")
	}
	slices.Sort(want)
	if !slices.Equal(dst, want) {
		t.Errorf("mounts\n got %q\nwant %q", dst, want)
	}
	if len(c.Hooks) != 3 {
		t.Fatalf("hooks %+v", c.Hooks)
	}
	links := c.Hooks[0].Args
	for _, l := range []string{"libcuda.so.570.133.20::" + lib + "libcuda.so.1", "libcuda.so.1::" + lib + "libcuda.so",
		"libnvidia-ml.so.570.133.20::" + lib + "libnvidia-ml.so.1", "libnvidia-nvvm.so.570.133.20::" + lib + "libnvidia-nvvm.so.4"} {
		if !slices.Contains(links, l) {
			t.Errorf("create-symlinks lacks --link %s: %v", l, links)
		}
	}
	if got := c.Hooks[1].Args; !slices.Equal(got, []string{"nvidia-cdi-hook", "enable-cuda-compat", "--host-driver-version=570.133.20"}) {
		t.Errorf("enable-cuda-compat args %v", got)
	}
	if got := c.Hooks[2].Args; !slices.Equal(got, []string{"nvidia-cdi-hook", "update-ldcache", "--folder", strings.TrimSuffix(lib, "/")}) {
		t.Errorf("update-ldcache args %v", got)
	}
	for _, h := range c.Hooks {
		if h.HookName != "createContainer" || h.Path != e.hook {
			t.Errorf("hook %s at %s", h.HookName, h.Path)
		}
	}

	// Without the compat hook, and with nvidia-ctk as the hook binary.
	ctk := filepath.Join(e.tmp, "toolkit", "nvidia-ctk")
	if err := os.WriteFile(ctk, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c = e.generator(t, cdi.WithHookPath(ctk), cdi.WithoutCUDACompatHook()).CommonEdits()
	if len(c.Hooks) != 2 || !slices.Equal(c.Hooks[1].Args[:3], []string{"nvidia-ctk", "hook", "update-ldcache"}) {
		t.Errorf("hooks %+v", c.Hooks)
	}
	// Waived hooks.
	if c = e.generator(t, cdi.WithoutHooks(), cdi.WithHookPath("/nonexistent")).CommonEdits(); len(c.Hooks) != 0 {
		t.Errorf("hooks despite WithoutHooks: %+v", c.Hooks)
	}
}

// A plugin in a container reads the driver's files where it mounted the host's driver root, but the
// specs name the host's paths, which the runtime resolves.
func TestHostDriverRoot(t *testing.T) {
	e := newEnv(t, "")
	const hostRoot = "/run/nvidia/driver"
	c := e.generator(t, cdi.WithHostDriverRoot(hostRoot)).CommonEdits()
	if len(c.Mounts) == 0 {
		t.Fatal("no mounts")
	}
	for _, m := range c.Mounts {
		if !strings.HasPrefix(m.HostPath, hostRoot+"/") {
			t.Errorf("mount %s from %s, want a host path under %s", m.ContainerPath, m.HostPath, hostRoot)
		}
		if strings.Contains(m.HostPath, e.host.DriverRoot()) {
			t.Errorf("mount %s names the plugin's view %s", m.ContainerPath, m.HostPath)
		}
	}
	// Without it, the driver root is the host's.
	for _, m := range e.generator(t).CommonEdits().Mounts {
		if !strings.HasPrefix(m.HostPath, e.host.DriverRoot()) {
			t.Errorf("mount %s from %s, want under %s", m.ContainerPath, m.HostPath, e.host.DriverRoot())
		}
	}
	if _, err := cdi.New(e.options(cdi.WithHostDriverRoot("relative/dir"))...); err == nil || !strings.Contains(err.Error(), "host driver root") {
		t.Errorf("relative host driver root: %v", err)
	}
}

// Missing things are errors that name the path.
func TestErrorsNamePaths(t *testing.T) {
	e := newEnv(t, "gpu1-all-1g")
	snap := e.snapshot(t)
	missing := filepath.Join(e.tmp, "no-such-driver")
	for _, tc := range []struct {
		name  string
		opts  []cdi.Option
		setup func(t *testing.T)
		want  []string
	}{
		{name: "driver root", opts: []cdi.Option{cdi.WithDriverRoot(missing)}, want: []string{missing}},
		{name: "hook", opts: []cdi.Option{cdi.WithHookPath("/opt/none/nvidia-cdi-hook")}, want: []string{"/opt/none/nvidia-cdi-hook", "--no-hooks"}},
		{name: "driver libraries", opts: []cdi.Option{cdi.WithDriverVersion("535.1.2")}, want: []string{e.host.DriverRoot(), "libcuda.so.535.1.2"}},
		{name: "proc version", opts: []cdi.Option{cdi.WithProcRoot(e.tmp)}, want: []string{filepath.Join(e.tmp, "devices")}},
		{
			name: "nvidiactl",
			setup: func(t *testing.T) {
				if err := os.Rename(filepath.Join(e.host.DevRoot(), "nvidiactl"), filepath.Join(e.tmp, "ctl")); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = os.Rename(filepath.Join(e.tmp, "ctl"), filepath.Join(e.host.DevRoot(), "nvidiactl")) })
			},
			want: []string{filepath.Join(e.host.DevRoot(), "nvidiactl")},
		},
		{name: "kind", opts: []cdi.Option{cdi.WithVendorClass("nvidia.com/gpu")}, want: []string{"nvidia.com/gpu", "collide"}},
		{name: "relative root", opts: []cdi.Option{cdi.WithDevRoot("dev")}, want: []string{`"dev"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup(t)
			}
			_, err := cdi.New(e.options(tc.opts...)...)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}

	g := e.generator(t)
	// A GPU's device node missing.
	gpu2 := snap.GPUs[2]
	node := filepath.Join(e.host.DevRoot(), fmt.Sprintf("nvidia%d", gpu2.Minor))
	if err := os.Rename(node, filepath.Join(e.tmp, "gpu2")); err != nil {
		t.Fatal(err)
	}
	_, err := g.WriteClaimSpec("uid-1", []cdi.Device{cdi.WholeGPU(gpu2.GPU)})
	if err == nil || !strings.Contains(err.Error(), node) {
		t.Errorf("missing %s: error %v", node, err)
	}
	if _, err := g.WriteNodeSpec(cdi.FromSnapshot(snap)); err == nil || !strings.Contains(err.Error(), node) {
		t.Errorf("node spec with %s missing: error %v", node, err)
	}
	if err := os.Rename(filepath.Join(e.tmp, "gpu2"), node); err != nil {
		t.Fatal(err)
	}
	// A MIG device that is gone.
	gone := cdi.MIGDevice(snap.GPUs[1].GPU, snap.GPUs[1].MigDevices[0])
	gone.MIG.GI = 14
	_, err = g.WriteClaimSpec("uid-2", []cdi.Device{gone})
	if want := e.host.GIAccessPath(snap.GPUs[1].Minor, 14); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("missing MIG device: error %v, want it to name %s", err, want)
	}
	// An MPS pipe directory that does not exist.
	pipe := filepath.Join(e.tmp, "no-mps")
	_, err = g.WriteClaimSpec("uid-3", []cdi.Device{cdi.WholeGPU(gpu2.GPU).MPSFraction(cdi.MPS{PipeDir: pipe})})
	if err == nil || !strings.Contains(err.Error(), pipe) {
		t.Errorf("missing MPS pipe dir: error %v", err)
	}
	// Nothing was written by the failures.
	entries, _ := os.ReadDir(e.specDir)
	if len(entries) != 0 {
		t.Errorf("failed writes left %v", entries)
	}
}

// Claim specs are written and removed per claim; a rewrite replaces; removal is idempotent.
func TestClaimSpecLifecycle(t *testing.T) {
	e := newEnv(t, "")
	g := e.generator(t)
	snap := e.snapshot(t)
	uid := "0b6a7a8e-1111-4222-8333-944445555666"
	names, err := g.WriteClaimSpec(uid, []cdi.Device{cdi.WholeGPU(snap.GPUs[0].GPU)})
	if err != nil {
		t.Fatal(err)
	}
	names2, err := g.WriteClaimSpec(uid, []cdi.Device{cdi.WholeGPU(snap.GPUs[5].GPU), cdi.WholeGPU(snap.GPUs[5].GPU).Replica(3)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := cdi.List(e.specDir, "")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range l.Devices {
		got = append(got, d.Name)
	}
	if !slices.Equal(got, names2) || slices.Contains(got, names[0]) || len(l.Errors) > 0 {
		t.Errorf("after rewrite: devices %v (want %v), errors %v", got, names2, l.Errors)
	}
	for range 2 {
		if err := g.RemoveClaimSpec(uid); err != nil {
			t.Fatal(err)
		}
	}
	if entries, _ := os.ReadDir(e.specDir); len(entries) != 0 {
		t.Errorf("left after removal: %v", entries)
	}
	for _, bad := range []string{"", "../x", "a/b", "-a", "a_b"} {
		if _, err := g.WriteClaimSpec(bad, []cdi.Device{cdi.WholeGPU(snap.GPUs[0].GPU)}); err == nil {
			t.Errorf("claim UID %q accepted", bad)
		}
	}
	if _, err := g.WriteClaimSpec(uid, nil); err == nil {
		t.Error("a claim without devices was accepted")
	}
	d := cdi.WholeGPU(snap.GPUs[0].GPU)
	if _, err := g.WriteClaimSpec(uid, []cdi.Device{d, d}); err == nil {
		t.Error("a device listed twice was accepted")
	}
}

// Claim specs for different claims are written concurrently without interfering (run with -race).
func TestConcurrentClaims(t *testing.T) {
	e := newEnv(t, "gpu1-all-1g")
	g := e.generator(t)
	snap := e.snapshot(t)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			uid := fmt.Sprintf("claim-%02d", i)
			var d cdi.Device
			if i%2 == 0 {
				d = cdi.WholeGPU(snap.GPUs[i%8].GPU).Replica(i)
			} else {
				d = cdi.MIGDevice(snap.GPUs[1].GPU, snap.GPUs[1].MigDevices[i%7])
			}
			if _, err := g.WriteClaimSpec(uid, []cdi.Device{d}); err != nil {
				errs <- err
				return
			}
			if i%4 == 3 {
				if err := g.RemoveClaimSpec(uid); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	l, err := cdi.List(e.specDir, g.Kind())
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Devices) != 48 || len(l.Errors) != 0 {
		t.Errorf("%d devices (want 48), errors %v", len(l.Devices), l.Errors)
	}
}

// CleanupStale removes only our files: by name prefix and kind.
func TestCleanupStale(t *testing.T) {
	e := newEnv(t, "")
	g := e.generator(t)
	snap := e.snapshot(t)
	if _, err := g.WriteNodeSpec(cdi.FromSnapshot(snap)); err != nil {
		t.Fatal(err)
	}
	for _, uid := range []string{"keep-me", "stale-1", "stale-2"} {
		if _, err := g.WriteClaimSpec(uid, []cdi.Device{cdi.WholeGPU(snap.GPUs[0].GPU)}); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string, age time.Duration) {
		p := filepath.Join(e.specDir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if age > 0 {
			old := time.Now().Add(-age)
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	other := `{"cdiVersion":"0.5.0","kind":"example.com/gpu","devices":[{"name":"x","containerEdits":{"env":["A=1"]}}]}`
	write("tessera.dev-gpu_foreign.json", other, 0)      // our prefix, another kind: kept
	write("nvidia.yaml", other, 0)                       // not ours: kept
	write("tessera.dev-gpu_broken.json", "{not json", 0) // our prefix, unparseable: kept, reported
	write(".tessera.dev-gpu.1-old.tmp", "x", time.Hour)  // our old temporary file: removed
	write(".tessera.dev-gpu.2-new.tmp", "x", 0)          // a write in progress: kept
	write(".other.1-old.tmp", "x", time.Hour)            // not ours: kept

	removed, err := g.CleanupStale(cdi.Stale{Claims: true, KeepClaims: []string{"keep-me"}})
	if err == nil || !strings.Contains(err.Error(), "tessera.dev-gpu_broken.json") {
		t.Errorf("error %v should report the unparseable file", err)
	}
	var got []string
	for _, p := range removed {
		got = append(got, filepath.Base(p))
	}
	slices.Sort(got)
	if want := []string{".tessera.dev-gpu.1-old.tmp", "tessera.dev-gpu_stale-1.json", "tessera.dev-gpu_stale-2.json"}; !slices.Equal(got, want) {
		t.Errorf("removed %v, want %v", got, want)
	}
	for _, kept := range []string{"tessera.dev-gpu.json", "tessera.dev-gpu_keep-me.json", "tessera.dev-gpu_foreign.json",
		"nvidia.yaml", "tessera.dev-gpu_broken.json", ".tessera.dev-gpu.2-new.tmp", ".other.1-old.tmp"} {
		if _, err := os.Stat(filepath.Join(e.specDir, kept)); err != nil {
			t.Errorf("%s: %v", kept, err)
		}
	}
	if err := os.Remove(filepath.Join(e.specDir, "tessera.dev-gpu_broken.json")); err != nil {
		t.Fatal(err)
	}
	removed, err = g.CleanupStale(cdi.Stale{NodeSpec: true})
	if err != nil || len(removed) != 1 || filepath.Base(removed[0]) != "tessera.dev-gpu.json" {
		t.Errorf("NodeSpec cleanup: removed %v, %v", removed, err)
	}
	if _, err := os.Stat(filepath.Join(e.specDir, "tessera.dev-gpu_keep-me.json")); err != nil {
		t.Errorf("a node-spec cleanup removed a claim spec: %v", err)
	}
	// A missing directory is nothing to clean.
	g2 := e.generator(t, cdi.WithSpecDir(filepath.Join(e.tmp, "none")))
	if removed, err := g2.CleanupStale(cdi.Stale{Claims: true, NodeSpec: true}); err != nil || len(removed) > 0 {
		t.Errorf("missing dir: %v %v", removed, err)
	}
}

// The same devices give the same bytes, whatever their order; a YAML twin of ours is replaced.
func TestDeterministicAndTwin(t *testing.T) {
	e := newEnv(t, "gpu1-all-1g")
	g := e.generator(t)
	devices := cdi.FromSnapshot(e.snapshot(t))
	a, err := g.NodeSpec(devices)
	if err != nil {
		t.Fatal(err)
	}
	rev := slices.Clone(devices)
	slices.Reverse(rev)
	b, err := g.NodeSpec(rev)
	if err != nil {
		t.Fatal(err)
	}
	if string(marshal(t, a)) != string(marshal(t, b)) {
		t.Error("device order changes the spec")
	}
	if _, err := g.NodeSpec(append(devices, devices[0])); err == nil {
		t.Error("a device listed twice was accepted")
	}
	// An older YAML node spec of ours would define the same devices: writing removes it.
	if err := os.MkdirAll(e.specDir, 0o755); err != nil {
		t.Fatal(err)
	}
	twin := filepath.Join(e.specDir, "tessera.dev-gpu.yaml")
	if err := os.WriteFile(twin, marshal(t, a), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := g.WriteNodeSpec(devices); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(twin); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("YAML twin still there: %v", err)
	}
	l, err := cdi.List(e.specDir, "")
	if err != nil || len(l.Errors) > 0 {
		t.Errorf("list: %v %v", err, l.Errors)
	}
	fi, err := os.Stat(filepath.Join(e.specDir, "tessera.dev-gpu.json"))
	if err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("spec file mode: %v %v", fi, err)
	}
}

// Device names are valid CDI names, distinct between kinds of device, and never contain '_' except
// in claim specs.
func TestDeviceNames(t *testing.T) {
	g := cdi.GPU{Index: 3, Minor: 5, UUID: "GPU-8668a704-bef6-5503-914a-3dca6fa7f5f7"}
	whole := cdi.Device{GPU: g}
	m := cdi.Device{GPU: g, MIG: &cdi.MIG{GI: 7, CI: 0, UUID: "MIG-daf77836-154f-5f98-8c40-cc29a3b266ad"}}
	for _, tc := range []struct {
		d    cdi.Device
		want []string
	}{
		{whole, []string{g.UUID, "3"}},
		{m, []string{m.MIG.UUID, "3:7:0"}},
		{whole.Replica(2), []string{g.UUID + "::2"}},
		{m.Replica(0), []string{m.MIG.UUID + "::0"}},
		{whole.MPSFraction(cdi.MPS{Replica: 4, PipeDir: "/run/mps"}), []string{g.UUID + "::mps-4"}},
	} {
		if got := tc.d.Names(); !slices.Equal(got, tc.want) {
			t.Errorf("%s: names %v, want %v", tc.d, got, tc.want)
		}
		if err := tc.d.Validate(); err != nil {
			t.Errorf("%s: %v", tc.d, err)
		}
		for _, n := range tc.d.Names() {
			if strings.Contains(n, "_") {
				t.Errorf("node-spec name %s contains '_'", n)
			}
		}
	}
	if n := cdi.ClaimDeviceName("4f9d2c1e-8a7b", m); n != "4f9d2c1e-8a7b_"+m.MIG.UUID {
		t.Errorf("claim device name %s", n)
	}
	for _, bad := range []cdi.Device{
		{GPU: cdi.GPU{Index: 0}},
		{GPU: g, MIG: &cdi.MIG{GI: 1}},
		{GPU: g, TimeSlice: &cdi.TimeSlice{}, MPS: &cdi.MPS{PipeDir: "/x"}},
		whole.MPSFraction(cdi.MPS{PipeDir: "relative"}),
		whole.MPSFraction(cdi.MPS{PipeDir: "/x", ActiveThreadPercentage: 101}),
		{GPU: cdi.GPU{UUID: "GPU-x!"}},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// BenchmarkWriteClaimSpec is the DRA driver's hot path: one claim with one MIG device, written
// (validated, fsynced, renamed) and removed.
func BenchmarkWriteClaimSpec(b *testing.B) {
	e := newEnv(b, "gpu1-all-1g")
	g := e.generator(b)
	snap := e.snapshot(b)
	d := cdi.MIGDevice(snap.GPUs[1].GPU, snap.GPUs[1].MigDevices[2])
	for i := 0; b.Loop(); i++ {
		uid := fmt.Sprintf("bench-%d", i)
		if _, err := g.WriteClaimSpec(uid, []cdi.Device{d}); err != nil {
			b.Fatal(err)
		}
		if err := g.RemoveClaimSpec(uid); err != nil {
			b.Fatal(err)
		}
	}
}

// A device's extra environment reaches the container that gets it, and nothing else; a bad entry
// is refused.
func TestDeviceEnv(t *testing.T) {
	e := newEnv(t, "")
	g := e.generator(t)
	snap := e.snapshot(t)
	uid := "0b6a7a8e-1111-4222-8333-944445555777"
	d := cdi.WholeGPU(snap.GPUs[1].GPU).WithEnv("TESSERA_MEMORY_LIMIT_MIB=10240", "TESSERA_COMPUTE_PERCENT=20")
	names, err := g.WriteClaimSpec(uid, []cdi.Device{d})
	if err != nil {
		t.Fatal(err)
	}
	if want := g.QualifiedName(uid + "_" + snap.GPUs[1].GPU.UUID); names[0] != want {
		t.Errorf("name %s, want %s (env is not part of the name)", names[0], want)
	}
	s := e.inject(t, names[0])
	for _, kv := range []string{"TESSERA_MEMORY_LIMIT_MIB=10240", "TESSERA_COMPUTE_PERCENT=20"} {
		if !slices.Contains(s.Process.Env, kv) {
			t.Errorf("container env %v lacks %s", s.Process.Env, kv)
		}
	}
	for _, bad := range []string{"NOVALUE", "1X=2", "=x", "A B=1"} {
		if _, err := g.WriteClaimSpec(uid, []cdi.Device{cdi.WholeGPU(snap.GPUs[1].GPU).WithEnv(bad)}); err == nil || !strings.Contains(err.Error(), "environment entry") {
			t.Errorf("env %q: %v", bad, err)
		}
	}
	if d2 := d.WithEnv("X=1"); len(d.Env) != 2 || len(d2.Env) != 3 {
		t.Errorf("WithEnv changed its receiver: %v %v", d.Env, d2.Env)
	}
}
