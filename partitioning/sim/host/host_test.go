//go:build linux

package host

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var testSpec = Spec{DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{0, 1, 2, 3}}

const (
	helperEnv = "TESSERA_HOST_TEST_HELPER"
	rootEnv   = "TESSERA_HOST_TEST_ROOT"
)

// TestMain doubles as a helper process for the tests that need several processes or another user.
func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "ensure" {
		if _, err := Ensure(os.Getenv(rootEnv), testSpec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Unsetenv(recordDirEnv)
	os.Exit(m.Run())
}

func ensure(t *testing.T, root string, spec Spec) *Host {
	t.Helper()
	h, err := Ensure(root, spec)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	return h
}

// entry is what a snapshot knows of one path.
type entry struct {
	mode    fs.FileMode
	ino     uint64
	mtime   time.Time
	size    int64
	target  string
	content string
}

// snapshot describes every path under root except scratch space, locks and logs.
func snapshot(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if rel == ".tmp" || rel == ".locks" || rel == "recorded" {
			return filepath.SkipDir
		}
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		e := entry{mode: fi.Mode(), mtime: fi.ModTime(), size: fi.Size()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			e.ino = st.Ino
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			e.target, _ = os.Readlink(path)
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			e.content = string(data)
		}
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// diffSnapshots lists paths that differ in anything, inode and mtime included.
func diffSnapshots(a, b map[string]entry) []string {
	var diffs []string
	for p, ea := range a {
		eb, ok := b[p]
		switch {
		case !ok:
			diffs = append(diffs, "removed "+p)
		case ea != eb:
			diffs = append(diffs, fmt.Sprintf("changed %s: %+v -> %+v", p, ea, eb))
		}
	}
	for p := range b {
		if _, ok := a[p]; !ok {
			diffs = append(diffs, "added "+p)
		}
	}
	sort.Strings(diffs)
	return diffs
}

func assertNoScratch(t *testing.T, h *Host) {
	t.Helper()
	entries, err := os.ReadDir(h.tmpDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "trash-") {
			t.Errorf("scratch entry left behind: %s", e.Name())
		}
	}
}

func canMknod(t *testing.T) bool {
	t.Helper()
	p := filepath.Join(t.TempDir(), "probe")
	if err := mknodChar(p, 1, 3); err != nil {
		return false
	}
	return true
}

func TestEnsureLayout(t *testing.T) {
	root := t.TempDir()
	h := ensure(t, root, testSpec)

	if h.Root() != root || h.DevRoot() != root+"/dev" || h.ProcRoot() != root+"/proc" ||
		h.DriverRoot() != root+"/driver" || h.RecordDir() != root+"/recorded" {
		t.Fatalf("roots: %s %s %s %s %s", h.Root(), h.DevRoot(), h.ProcRoot(), h.DriverRoot(), h.RecordDir())
	}
	if got := h.Spec().LibDir; got != DefaultLibDir {
		t.Errorf("LibDir = %q, want default %q", got, DefaultLibDir)
	}

	// host.json says which kind of nodes there are, and the nodes are of that kind.
	wantKind := RegularFiles
	if canMknod(t) {
		wantKind = CharDevices
	}
	var m meta
	data, err := os.ReadFile(filepath.Join(root, "host.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	if m.DeviceNodes != wantKind || h.DeviceNodes() != wantKind {
		t.Errorf("host.json deviceNodes = %q, Host says %q, want %q", m.DeviceNodes, h.DeviceNodes(), wantKind)
	}
	if m.Majors["nvidia-caps"] != CapsMajor || m.Majors["nvidia-uvm"] != UVMMajor || m.Majors["nvidia-frontend"] != 195 {
		t.Errorf("host.json majors = %v", m.Majors)
	}

	nodes := []struct {
		path         string
		major, minor uint32
		perm         fs.FileMode
	}{
		{"nvidia0", 195, 0, 0o666}, {"nvidia3", 195, 3, 0o666},
		{"nvidiactl", 195, 255, 0o666}, {"nvidia-modeset", 195, 254, 0o666},
		{"nvidia-uvm", UVMMajor, 0, 0o666}, {"nvidia-uvm-tools", UVMMajor, 1, 0o666},
		{"nvidia-caps/nvidia-cap1", CapsMajor, 1, 0o400}, {"nvidia-caps/nvidia-cap2", CapsMajor, 2, 0o444},
	}
	for _, n := range nodes {
		p := filepath.Join(h.DevRoot(), n.path)
		major, minor, isChar, err := DeviceNumbers(p)
		if err != nil {
			t.Errorf("%s: %v", n.path, err)
			continue
		}
		if major != n.major || minor != n.minor || isChar != (wantKind == CharDevices) {
			t.Errorf("%s = %d:%d char=%v, want %d:%d char=%v", n.path, major, minor, isChar, n.major, n.minor,
				wantKind == CharDevices)
		}
		if fi, _ := os.Lstat(p); fi.Mode().Perm() != n.perm {
			t.Errorf("%s mode %v, want %v", n.path, fi.Mode().Perm(), n.perm)
		}
	}
	if _, err := os.Lstat(filepath.Join(h.DevRoot(), "nvidia4")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("nvidia4 exists though only minors 0..3 were asked for: %v", err)
	}

	// procfs.
	version, _ := os.ReadFile(filepath.Join(h.ProcRoot(), "driver/nvidia/version"))
	if !strings.HasPrefix(string(version), "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  ") {
		t.Errorf("version file: %q", version)
	}
	for name, want := range map[string]string{
		"config":  "DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\n",
		"monitor": "DeviceFileMinor: 2\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
	} {
		p := filepath.Join(h.ProcRoot(), "driver/nvidia/capabilities/mig", name)
		got, err := os.ReadFile(p)
		if err != nil || string(got) != want {
			t.Errorf("mig/%s = %q (%v), want %q", name, got, err, want)
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o444 {
			t.Errorf("mig/%s mode %v, want r--r--r--", name, fi.Mode().Perm())
		}
	}

	// Driver files: stand-in libraries that are not ELF, soname links that resolve, firmware, tools.
	lib := h.LibPath()
	for _, l := range driverLibs {
		file := filepath.Join(lib, l.name+".so.570.133.20")
		data, err := os.ReadFile(file)
		if err != nil {
			t.Errorf("library: %v", err)
			continue
		}
		if bytes.HasPrefix(data, []byte("\x7fELF")) || !bytes.HasPrefix(data, []byte("tessera simulated driver library "+l.name)) {
			t.Errorf("%s content %q", file, data)
		}
		if l.soname != "" {
			if got, err := filepath.EvalSymlinks(filepath.Join(lib, l.soname)); err != nil || got != file {
				t.Errorf("%s -> %q (%v), want %s", l.soname, got, err, file)
			}
		}
	}
	if got, err := filepath.EvalSymlinks(filepath.Join(lib, "libcuda.so")); err != nil || got != filepath.Join(lib, "libcuda.so.570.133.20") {
		t.Errorf("libcuda.so -> %q (%v)", got, err)
	}
	if got, _ := os.Readlink(filepath.Join(lib, "libnvidia-nvvm.so.4")); got != "libnvidia-nvvm.so.570.133.20" {
		t.Errorf("libnvidia-nvvm.so.4 -> %q", got)
	}
	for _, fw := range []string{"gsp_ga10x.bin", "gsp_tu10x.bin"} {
		if _, err := os.Stat(filepath.Join(h.DriverRoot(), "lib/firmware/nvidia/570.133.20", fw)); err != nil {
			t.Errorf("firmware: %v", err)
		}
	}
	for _, tool := range []string{ToolNvidiaSMI, ToolMPSControl, ToolMPSServer, ToolPersistenced, ToolCDIHook} {
		fi, err := os.Stat(h.ToolPath(tool))
		if err != nil || fi.Mode().Perm() != 0o755 {
			t.Errorf("%s: %v %v", tool, fi, err)
		}
	}
	if _, err := os.Stat(filepath.Join(h.DriverRoot(), "var/run/nvidia-persistenced/socket")); err != nil {
		t.Errorf("persistenced socket via /var/run: %v", err)
	}
	if fi, err := os.Stat(h.RecordDir()); err != nil || fi.Mode().Perm() != 0o777 {
		t.Errorf("record dir: %v %v", fi, err)
	}
	assertNoScratch(t, h)
}

func TestProcDevices(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	f, err := os.Open(filepath.Join(h.ProcRoot(), "devices"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	section := ""
	char := map[string]int{}
	last := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch line {
		case "Character devices:", "Block devices:":
			section = line
			continue
		case "":
			if section != "Character devices:" {
				t.Errorf("blank line not between the sections")
			}
			continue
		}
		if len(line) < 5 || line[3] != ' ' {
			t.Errorf("line %q is not \"%%3d %%s\"", line)
			continue
		}
		major, err := strconv.Atoi(strings.TrimSpace(line[:3]))
		if err != nil {
			t.Errorf("line %q: %v", line, err)
			continue
		}
		if major < last[section] {
			t.Errorf("%s not sorted at %q", section, line)
		}
		last[section] = major
		if section == "Character devices:" {
			char[line[4:]] = major
		} else if section == "" {
			t.Errorf("line %q before any section", line)
		}
	}
	for name, want := range map[string]int{"nvidia-frontend": NvidiaMajor, "nvidia-caps": CapsMajor,
		"nvidia-uvm": UVMMajor, "nvidia-caps-imex-channels": ImexChannelsMajor, "mem": 1, "tty": 4} {
		if got, ok := char[name]; !ok || got != want {
			t.Errorf("character device %s: major %d (listed %v), want %d", name, got, ok, want)
		}
	}
	if last["Block devices:"] == 0 {
		t.Errorf("no block devices")
	}
}

func TestEnsureIdempotent(t *testing.T) {
	root := t.TempDir()
	h := ensure(t, root, testSpec)
	if err := h.SetMIG(1, []MIGInstance{{GI: 2, CIs: []int{0}}}); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, root)
	time.Sleep(10 * time.Millisecond) // so a rewrite would show in mtimes even on coarse clocks
	h2 := ensure(t, root, Spec{DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{3, 2, 1, 0}})
	if diffs := diffSnapshots(before, snapshot(t, root)); len(diffs) > 0 {
		t.Errorf("second Ensure changed the tree:\n%s", strings.Join(diffs, "\n"))
	}
	if h2.DeviceNodes() != h.DeviceNodes() {
		t.Errorf("node kind changed: %s -> %s", h.DeviceNodes(), h2.DeviceNodes())
	}
	// Relative roots name the same host.
	wd, _ := os.Getwd()
	rel, err := filepath.Rel(wd, root)
	if err == nil {
		ensure(t, rel, testSpec)
		if diffs := diffSnapshots(before, snapshot(t, root)); len(diffs) > 0 {
			t.Errorf("Ensure with a relative root changed the tree:\n%s", strings.Join(diffs, "\n"))
		}
	}
	assertNoScratch(t, h)

	l, err := Load(root)
	if err != nil {
		t.Fatal(err)
	}
	if l.Root() != root || l.DeviceNodes() != h.DeviceNodes() || !slices.Equal(l.Spec().GPUMinors, []int{0, 1, 2, 3}) {
		t.Errorf("Load = %+v", l)
	}
	if _, err := Load(t.TempDir()); err == nil {
		t.Errorf("Load of an empty directory succeeded")
	}
}

func TestEnsureRepairs(t *testing.T) {
	root := t.TempDir()
	h := ensure(t, root, testSpec)
	before := snapshot(t, root)
	smi := h.ToolPath(ToolNvidiaSMI)
	if err := os.WriteFile(smi, []byte("#!/bin/sh\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	must(t, os.Remove(filepath.Join(h.DevRoot(), "nvidia2")))
	must(t, os.Remove(filepath.Join(h.LibPath(), "libcuda.so.1")))
	must(t, os.Chmod(filepath.Join(h.ProcRoot(), "devices"), 0o644))
	ensure(t, root, testSpec)
	after := snapshot(t, root)
	for _, p := range []string{"driver/usr/bin/nvidia-smi", "dev/nvidia2", "driver/" + DefaultLibDir + "/libcuda.so.1", "proc/devices"} {
		b, a := before[p], after[p]
		if a.content != b.content || a.mode != b.mode || a.target != b.target {
			t.Errorf("%s not repaired: %+v, want %+v", p, a, b)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestEnsureConcurrent(t *testing.T) {
	root := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Go(func() {
			if _, err := Ensure(root, testSpec); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent Ensure: %v", err)
	}
	// The tree the racing calls left is complete and right: one more Ensure changes nothing.
	before := snapshot(t, root)
	h := ensure(t, root, testSpec)
	if diffs := diffSnapshots(before, snapshot(t, root)); len(diffs) > 0 {
		t.Errorf("tree after concurrent Ensure was incomplete:\n%s", strings.Join(diffs, "\n"))
	}
	assertNoScratch(t, h)
}

func TestEnsureConcurrentProcesses(t *testing.T) {
	root := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for range 6 {
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"=ensure", rootEnv+"="+root)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		must(t, cmd.Start())
		cmds = append(cmds, cmd)
		outs = append(outs, &out)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("process %d: %v: %s", i, err, outs[i])
		}
	}
	before := snapshot(t, root)
	ensure(t, root, testSpec)
	if diffs := diffSnapshots(before, snapshot(t, root)); len(diffs) > 0 {
		t.Errorf("tree after concurrent processes was incomplete:\n%s", strings.Join(diffs, "\n"))
	}
}

// An unprivileged process cannot mknod: it lays out regular files and says so in host.json.
func TestEnsureUnprivileged(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux only")
	}
	if os.Geteuid() != 0 {
		if canMknod(t) {
			t.Skip("not root, yet may mknod")
		}
		h := ensure(t, t.TempDir(), testSpec)
		if h.DeviceNodes() != RegularFiles {
			t.Fatalf("unprivileged Ensure made %s", h.DeviceNodes())
		}
		return
	}
	// Run Ensure as nobody in a child process. Everything it needs must be reachable by nobody.
	dir := t.TempDir()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		must(t, os.Chmod(d, 0o755))
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "host.test")
	must(t, os.WriteFile(bin, data, 0o755))
	root := filepath.Join(dir, "root")
	must(t, os.Mkdir(root, 0o777))
	must(t, os.Chmod(root, 0o777))
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = []string{helperEnv + "=ensure", rootEnv + "=" + root, "PATH=/usr/bin:/bin"}
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("Ensure as nobody: %v: %s", err, out)
	}
	h, err := Load(root)
	if err != nil {
		t.Fatal(err)
	}
	if h.DeviceNodes() != RegularFiles {
		t.Fatalf("Ensure as nobody made %s", h.DeviceNodes())
	}
	fi, err := os.Lstat(filepath.Join(root, "dev/nvidia1"))
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o666 {
		t.Fatalf("dev/nvidia1: %v %v", fi, err)
	}
	major, minor, isChar, err := DeviceNumbers(filepath.Join(root, "dev/nvidia-uvm-tools"))
	if err != nil || isChar || major != UVMMajor || minor != 1 {
		t.Errorf("DeviceNumbers(nvidia-uvm-tools) = %d:%d char=%v %v", major, minor, isChar, err)
	}
	// Root may mknod, but the host keeps the kind it was first laid out with.
	h = ensure(t, root, testSpec)
	if err := h.SetMIG(0, []MIGInstance{{GI: 1, CIs: []int{0}}}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(h.CapDevicePath(13)); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("cap node for a host of regular files: %v %v", fi, err)
	}
}

// A host whose host.json records regular files gets regular-file nodes, whoever lays it out.
func TestEnsureKeepsRecordedNodeKind(t *testing.T) {
	root := t.TempDir()
	seed := `{"format": 1, "driverVersion": "570.133.20", "cudaVersion": "12.8", "gpuMinors": [0],
		"libDir": "usr/lib/x86_64-linux-gnu", "deviceNodes": "file"}`
	must(t, os.WriteFile(filepath.Join(root, "host.json"), []byte(seed), 0o644))
	h := ensure(t, root, testSpec)
	if h.DeviceNodes() != RegularFiles {
		t.Fatalf("node kind %s, want the recorded %s", h.DeviceNodes(), RegularFiles)
	}
	for _, name := range []string{"nvidia0", "nvidia3", "nvidiactl", "nvidia-caps/nvidia-cap1"} {
		p := filepath.Join(h.DevRoot(), name)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			t.Errorf("%s: %v %v", name, fi, err)
		}
	}
	major, minor, isChar, err := DeviceNumbers(filepath.Join(h.DevRoot(), "nvidiactl"))
	if err != nil || isChar || major != 195 || minor != 255 {
		t.Errorf("DeviceNumbers(nvidiactl) = %d:%d %v %v", major, minor, isChar, err)
	}
	if _, _, _, err := DeviceNumbers(filepath.Join(h.ProcRoot(), "devices")); err == nil {
		t.Errorf("DeviceNumbers accepted proc/devices")
	}
}

func TestEnsureSpecChange(t *testing.T) {
	root := t.TempDir()
	h := ensure(t, root, testSpec)
	must(t, h.SetMIG(3, []MIGInstance{{GI: 1, CIs: []int{0}}}))
	must(t, h.SetMIG(1, []MIGInstance{{GI: 2, CIs: []int{0}}}))
	unrelated := filepath.Join(h.LibPath(), "libfoo.so.1.2.3")
	must(t, os.WriteFile(unrelated, []byte("not ours"), 0o644))
	notOurs := filepath.Join(h.LibPath(), "libcuda.so.535.1.1")
	must(t, os.WriteFile(notOurs, []byte("\x7fELF real library"), 0o644))

	h = ensure(t, root, Spec{DriverVersion: "580.95.05", CUDAVersion: "13.0", GPUMinors: []int{0, 1}})
	gone := []string{
		"dev/nvidia2", "dev/nvidia3", "proc/driver/nvidia/capabilities/gpu3",
		"dev/nvidia-caps/nvidia-cap" + strconv.Itoa(GIMinor(3, 1)),
		"dev/nvidia-caps/nvidia-cap" + strconv.Itoa(CIMinor(3, 1, 0)),
		"driver/" + DefaultLibDir + "/libcuda.so.570.133.20",
		"driver/lib/firmware/nvidia/570.133.20",
	}
	for _, p := range gone {
		if _, err := os.Lstat(filepath.Join(root, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there after the spec dropped it (%v)", p, err)
		}
	}
	kept := []string{
		"dev/nvidia1", "proc/driver/nvidia/capabilities/gpu1/mig/gi2/ci0/access",
		"dev/nvidia-caps/nvidia-cap" + strconv.Itoa(CIMinor(1, 2, 0)),
		"driver/" + DefaultLibDir + "/libcuda.so.580.95.05",
		"driver/lib/firmware/nvidia/580.95.05/gsp_ga10x.bin",
	}
	for _, p := range kept {
		if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	for _, p := range []string{unrelated, notOurs} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("a file this package did not make was removed: %v", err)
		}
	}
	if got, _ := os.Readlink(filepath.Join(h.LibPath(), "libcuda.so.1")); got != "libcuda.so.580.95.05" {
		t.Errorf("libcuda.so.1 -> %q", got)
	}
	out, err := exec.Command(h.ToolPath(ToolNvidiaSMI)).Output()
	if err != nil || !strings.Contains(string(out), "Driver Version: 580.95.05") || !strings.Contains(string(out), "CUDA Version: 13.0") {
		t.Errorf("nvidia-smi after the upgrade: %v\n%s", err, out)
	}
}

func TestEnsureRejectsBadSpecs(t *testing.T) {
	for name, spec := range map[string]Spec{
		"no driver version":   {CUDAVersion: "12.8"},
		"odd driver version":  {DriverVersion: "570.133.20; rm -rf /", CUDAVersion: "12.8"},
		"bad cuda version":    {DriverVersion: "570.133.20", CUDAVersion: "12"},
		"negative minor":      {DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{-1}},
		"nvidiactl minor":     {DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{255}},
		"duplicate minor":     {DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{1, 0, 1}},
		"absolute lib dir":    {DriverVersion: "570.133.20", CUDAVersion: "12.8", LibDir: "/usr/lib64"},
		"escaping lib dir":    {DriverVersion: "570.133.20", CUDAVersion: "12.8", LibDir: "../lib"},
		"lib dir is the root": {DriverVersion: "570.133.20", CUDAVersion: "12.8", LibDir: "."},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Ensure(t.TempDir(), spec); err == nil {
				t.Errorf("Ensure accepted %+v", spec)
			}
		})
	}
	h := ensure(t, t.TempDir(), Spec{DriverVersion: "570.133.20", CUDAVersion: "12.8", LibDir: "usr/lib64/"})
	if _, err := os.Lstat(filepath.Join(h.DriverRoot(), "usr/lib64/libcuda.so.1")); err != nil {
		t.Errorf("custom LibDir: %v", err)
	}
}

func TestGIAndCIMinors(t *testing.T) {
	// Values NVIDIA documents: gpu0/gi0/access is 3, gpu0/gi1/access 12, gpu0/gi2/access 21,
	// gpu31/gi14/ci7/access 4322.
	for _, c := range []struct{ got, want int }{
		{GIMinor(0, 0), 3}, {CIMinor(0, 0, 0), 4}, {CIMinor(0, 0, 2), 6}, {GIMinor(0, 1), 12},
		{CIMinor(0, 1, 0), 13}, {GIMinor(0, 2), 21}, {GIMinor(1, 0), 138}, {CIMinor(31, 14, 6), 4321},
		{CIMinor(31, 14, 7), 4322},
		{GIMinor(32, 0), -1}, {GIMinor(-1, 0), -1}, {GIMinor(0, 15), -1}, {CIMinor(0, 0, 8), -1},
		{CIMinor(0, -1, 0), -1}, {CIMinor(0, 0, -1), -1},
	} {
		if c.got != c.want {
			t.Errorf("got %d, want %d", c.got, c.want)
		}
	}
	seen := map[int]string{MIGConfigCapMinor: "config", MIGMonitorCapMinor: "monitor"}
	for gpu := range MaxMIGGPUs {
		for gi := range MaxGIs {
			names := map[int]string{GIMinor(gpu, gi): fmt.Sprintf("gpu%d/gi%d", gpu, gi)}
			for ci := range MaxCIs {
				names[CIMinor(gpu, gi, ci)] = fmt.Sprintf("gpu%d/gi%d/ci%d", gpu, gi, ci)
			}
			for m, name := range names {
				if other, dup := seen[m]; dup {
					t.Fatalf("minor %d is both %s and %s", m, other, name)
				}
				seen[m] = name
				g, i, c, ok := capOwner(m)
				if !ok || fmt.Sprintf("gpu%d/gi%d", g, i)+map[bool]string{true: "", false: "/ci" + strconv.Itoa(c)}[c < 0] != name {
					t.Errorf("capOwner(%d) = %d %d %d %v, want %s", m, g, i, c, ok, name)
				}
			}
		}
	}
	if len(seen) != 2+MaxMIGGPUs*MaxGIs*MaxCIs+MaxMIGGPUs*MaxGIs {
		t.Errorf("%d distinct minors", len(seen))
	}
}

// mig-minors lists every capability with the minor GIMinor/CIMinor give, in the driver's order.
func TestMIGMinorsFile(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	data, err := os.ReadFile(filepath.Join(h.ProcRoot(), "driver/nvidia-caps/mig-minors"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if want := 2 + MaxMIGGPUs*MaxGIs*(1+MaxCIs); len(lines) != want {
		t.Fatalf("%d lines, want %d", len(lines), want)
	}
	if lines[0] != "config 1" || lines[1] != "monitor 2" || lines[2] != "gpu0/gi0/access 3" ||
		lines[3] != "gpu0/gi0/ci0/access 4" || lines[len(lines)-1] != "gpu31/gi14/ci7/access 4322" {
		t.Errorf("unexpected lines: %q %q %q %q ... %q", lines[0], lines[1], lines[2], lines[3], lines[len(lines)-1])
	}
	prev := 0
	for _, line := range lines[2:] {
		var gpu, gi, ci, minor int
		if n, _ := fmt.Sscanf(line, "gpu%d/gi%d/ci%d/access %d", &gpu, &gi, &ci, &minor); n == 4 {
			if CIMinor(gpu, gi, ci) != minor {
				t.Errorf("%q: CIMinor says %d", line, CIMinor(gpu, gi, ci))
			}
		} else if n, _ := fmt.Sscanf(line, "gpu%d/gi%d/access %d", &gpu, &gi, &minor); n == 3 {
			if GIMinor(gpu, gi) != minor {
				t.Errorf("%q: GIMinor says %d", line, GIMinor(gpu, gi))
			}
		} else {
			t.Fatalf("malformed line %q", line)
		}
		if minor != prev+1 && prev != 0 {
			t.Errorf("%q does not follow minor %d", line, prev)
		}
		prev = minor
	}
}

// migState lists the relative paths under the GPU's mig directory and the cap minors of its nodes.
func migState(t *testing.T, h *Host, gpu int) (paths []string, minors []int) {
	t.Helper()
	dir := h.migDir(gpu)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != dir {
			rel, _ := filepath.Rel(dir, path)
			paths = append(paths, rel)
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(filepath.Join(h.DevRoot(), "nvidia-caps"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		m, _ := strconv.Atoi(strings.TrimPrefix(e.Name(), "nvidia-cap"))
		if g, _, _, ok := capOwner(m); ok && g == gpu {
			minors = append(minors, m)
		}
	}
	slices.Sort(minors)
	return paths, minors
}

func TestSetMIG(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	must(t, h.SetMIG(1, []MIGInstance{{GI: 1, CIs: []int{0, 1}}, {GI: 2, CIs: []int{0}}}))
	must(t, h.SetMIG(2, []MIGInstance{{GI: 0, CIs: []int{0}}}))

	paths, minors := migState(t, h, 1)
	wantPaths := []string{"gi1", "gi1/access", "gi1/ci0", "gi1/ci0/access", "gi1/ci1", "gi1/ci1/access",
		"gi2", "gi2/access", "gi2/ci0", "gi2/ci0/access"}
	wantMinors := []int{GIMinor(1, 1), CIMinor(1, 1, 0), CIMinor(1, 1, 1), GIMinor(1, 2), CIMinor(1, 2, 0)}
	if !slices.Equal(paths, wantPaths) || !slices.Equal(minors, wantMinors) {
		t.Fatalf("GPU 1: paths %v minors %v, want %v %v", paths, minors, wantPaths, wantMinors)
	}
	for _, c := range []struct {
		path  string
		minor int
	}{
		{h.GIAccessPath(1, 1), 147}, {h.CIAccessPath(1, 1, 1), 149}, {h.CIAccessPath(1, 2, 0), 157},
	} {
		got, err := ReadCapMinor(c.path)
		if err != nil || got != c.minor {
			t.Errorf("ReadCapMinor(%s) = %d, %v; want %d", c.path, got, err, c.minor)
		}
		content, _ := os.ReadFile(c.path)
		if want := fmt.Sprintf("DeviceFileMinor: %d\nDeviceFileMode: 292\nDeviceFileModify: 1\n", c.minor); string(content) != want {
			t.Errorf("%s = %q, want %q", c.path, content, want)
		}
		major, minor, _, err := DeviceNumbers(h.CapDevicePath(c.minor))
		if err != nil || major != CapsMajor || int(minor) != c.minor {
			t.Errorf("cap node %d = %d:%d %v", c.minor, major, minor, err)
		}
		if fi, _ := os.Lstat(h.CapDevicePath(c.minor)); fi.Mode().Perm() != 0o444 {
			t.Errorf("cap node %d mode %v", c.minor, fi.Mode().Perm())
		}
	}

	// The same layout again rewrites nothing.
	before := snapshot(t, h.Root())
	must(t, h.SetMIG(1, []MIGInstance{{GI: 2, CIs: []int{0}}, {GI: 1, CIs: []int{1, 0}}}))
	if diffs := diffSnapshots(before, snapshot(t, h.Root())); len(diffs) > 0 {
		t.Errorf("repeating SetMIG changed the tree:\n%s", strings.Join(diffs, "\n"))
	}

	// Replace: gi1 goes with its nodes, gi2 loses nothing, gi5 comes.
	must(t, h.SetMIG(1, []MIGInstance{{GI: 2, CIs: []int{0}}, {GI: 5, CIs: []int{3}}}))
	paths, minors = migState(t, h, 1)
	wantPaths = []string{"gi2", "gi2/access", "gi2/ci0", "gi2/ci0/access", "gi5", "gi5/access", "gi5/ci3", "gi5/ci3/access"}
	wantMinors = []int{GIMinor(1, 2), CIMinor(1, 2, 0), GIMinor(1, 5), CIMinor(1, 5, 3)}
	if !slices.Equal(paths, wantPaths) || !slices.Equal(minors, wantMinors) {
		t.Fatalf("GPU 1 after replace: paths %v minors %v, want %v %v", paths, minors, wantPaths, wantMinors)
	}

	// Other GPUs and the global caps are untouched.
	if paths, minors := migState(t, h, 2); !slices.Equal(paths, []string{"gi0", "gi0/access", "gi0/ci0", "gi0/ci0/access"}) ||
		!slices.Equal(minors, []int{GIMinor(2, 0), CIMinor(2, 0, 0)}) {
		t.Errorf("GPU 2 disturbed: %v %v", paths, minors)
	}
	for _, m := range []int{1, 2} {
		if _, err := os.Lstat(h.CapDevicePath(m)); err != nil {
			t.Errorf("nvidia-cap%d: %v", m, err)
		}
	}

	// No instances: an empty mig directory and no nodes for the GPU.
	must(t, h.SetMIG(1, nil))
	if paths, minors := migState(t, h, 1); len(paths) != 0 || len(minors) != 0 {
		t.Errorf("GPU 1 after clearing: %v %v", paths, minors)
	}
	if fi, err := os.Stat(h.migDir(1)); err != nil || !fi.IsDir() {
		t.Errorf("mig dir after clearing: %v %v", fi, err)
	}
	assertNoScratch(t, h)
}

func TestSetMIGRejects(t *testing.T) {
	h := ensure(t, t.TempDir(), Spec{DriverVersion: "570.133.20", CUDAVersion: "12.8", GPUMinors: []int{0, 40}})
	for name, c := range map[string]struct {
		gpu  int
		inst []MIGInstance
	}{
		"GPU not on host":     {7, nil},
		"GPU beyond table":    {40, nil},
		"GI out of range":     {0, []MIGInstance{{GI: 15}}},
		"negative GI":         {0, []MIGInstance{{GI: -1}}},
		"CI out of range":     {0, []MIGInstance{{GI: 1, CIs: []int{8}}}},
		"GI twice":            {0, []MIGInstance{{GI: 1}, {GI: 1}}},
		"CI twice in one GI":  {0, []MIGInstance{{GI: 1, CIs: []int{0, 0}}}},
		"valid then bad part": {0, []MIGInstance{{GI: 1, CIs: []int{0}}, {GI: 2, CIs: []int{-3}}}},
	} {
		t.Run(name, func(t *testing.T) {
			if err := h.SetMIG(c.gpu, c.inst); err == nil {
				t.Errorf("SetMIG(%d, %+v) succeeded", c.gpu, c.inst)
			}
			if paths, minors := migState(t, h, 0); len(paths) != 0 || len(minors) != 0 {
				t.Errorf("a rejected SetMIG left %v %v", paths, minors)
			}
		})
	}
}

// Readers never see a half-replaced tree: every listing of the mig directory is exactly one of the
// layouts SetMIG was given.
func TestSetMIGAtomic(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	x, y := filepath.Join(h.tmpDir(), "x"), filepath.Join(h.tmpDir(), "y")
	must(t, os.Mkdir(x, 0o755))
	must(t, os.Mkdir(y, 0o755))
	if err := exchange(x, y); errors.Is(err, errNoExchange) {
		t.Skip("the test directory's filesystem cannot exchange paths atomically; SetMIG falls back to two renames there")
	}
	must(t, os.Remove(x))
	must(t, os.Remove(y))
	a := []MIGInstance{{GI: 1, CIs: []int{0}}, {GI: 2, CIs: []int{0}}}
	b := []MIGInstance{{GI: 3, CIs: []int{0, 1}}, {GI: 5, CIs: []int{0}}, {GI: 6}}
	must(t, h.SetMIG(0, a))
	dir := h.migDir(0)
	stop := make(chan struct{})
	var reads, bad int
	var badList []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			// Open, pause, then list: a reader holding the old tree while it is swapped out must
			// still read it whole.
			f, err := os.Open(dir)
			if err != nil {
				bad++
				badList = append(badList, err.Error())
				continue
			}
			if reads%2 == 1 {
				time.Sleep(100 * time.Microsecond)
			}
			names, err := f.Readdirnames(-1)
			f.Close()
			if err != nil {
				bad++
				badList = append(badList, err.Error())
				continue
			}
			slices.Sort(names)
			got := strings.Join(names, ",")
			if got != "gi1,gi2" && got != "gi3,gi5,gi6" {
				bad++
				badList = append(badList, got)
			}
			// Access files are read whole or not at all.
			for _, n := range names {
				if m, err := ReadCapMinor(filepath.Join(dir, n, "access")); err == nil {
					gi, _ := strconv.Atoi(strings.TrimPrefix(n, "gi"))
					if m != GIMinor(0, gi) {
						bad++
						badList = append(badList, fmt.Sprintf("%s/access minor %d", n, m))
					}
				} else if !errors.Is(err, fs.ErrNotExist) {
					bad++
					badList = append(badList, err.Error())
				}
			}
			reads++
		}
	}()
	for i := range 200 {
		layout := a
		if i%2 == 0 {
			layout = b
		}
		must(t, h.SetMIG(0, layout))
	}
	close(stop)
	<-done
	if bad > 0 {
		t.Errorf("%d of %d reads saw a mixed or missing tree, e.g. %q", bad, reads+bad, badList[:min(5, len(badList))])
	}
	t.Logf("%d consistent reads", reads)
}

func TestSetMIGConcurrent(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	layouts := [][]MIGInstance{
		{{GI: 1, CIs: []int{0}}},
		{{GI: 2, CIs: []int{0, 1, 2}}, {GI: 9, CIs: []int{0}}},
		{{GI: 7}, {GI: 8, CIs: []int{7}}},
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for gpu := range 4 {
		for i := range 12 {
			wg.Go(func() {
				if err := h.SetMIG(gpu, layouts[(gpu+i)%len(layouts)]); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent SetMIG: %v", err)
	}
	// Each GPU ends with one of the layouts, and its nodes match its tree exactly.
	for gpu := range 4 {
		paths, minors := migState(t, h, gpu)
		var fromTree []int
		for _, p := range paths {
			if strings.HasSuffix(p, "access") {
				m, err := ReadCapMinor(filepath.Join(h.migDir(gpu), p))
				if err != nil {
					t.Fatal(err)
				}
				fromTree = append(fromTree, m)
			}
		}
		slices.Sort(fromTree)
		if !slices.Equal(fromTree, minors) {
			t.Errorf("GPU %d: tree minors %v, nodes %v", gpu, fromTree, minors)
		}
		matched := false
		for _, l := range layouts {
			_, want, _ := migTree(gpu, l)
			matched = matched || slices.Equal(want, minors)
		}
		if !matched {
			t.Errorf("GPU %d ended with minors %v, not one of the layouts", gpu, minors)
		}
	}
	assertNoScratch(t, h)
}

func TestReadCapMinor(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		must(t, os.WriteFile(p, []byte(content), 0o444))
		return p
	}
	for _, m := range []int{0, 1, 12, 4322} {
		p := write(fmt.Sprintf("ok%d", m), string(capAccess(m, accessCapMode)))
		if got, err := ReadCapMinor(p); err != nil || got != m {
			t.Errorf("round trip %d: %d, %v", m, got, err)
		}
	}
	// Real files vary in spacing and may lack a trailing newline or the other fields.
	if got, err := ReadCapMinor(write("loose", "DeviceFileMode: 292\n  DeviceFileMinor:   21  \nDeviceFileModify: 1")); err != nil || got != 21 {
		t.Errorf("loose format: %d, %v", got, err)
	}
	for name, c := range map[string]struct{ content, wantErr string }{
		"empty":           {"", "no DeviceFileMinor line"},
		"no minor":        {"DeviceFileMode: 292\nDeviceFileModify: 1\n", "no DeviceFileMinor line"},
		"not a number":    {"DeviceFileMinor: twelve\n", `DeviceFileMinor "twelve" is not a non-negative integer`},
		"empty number":    {"DeviceFileMinor:\n", `DeviceFileMinor "" is not a non-negative integer`},
		"negative":        {"DeviceFileMinor: -4\n", `DeviceFileMinor "-4" is not a non-negative integer`},
		"two numbers":     {"DeviceFileMinor: 1 2\n", `DeviceFileMinor "1 2" is not`},
		"given twice":     {"DeviceFileMinor: 3\nDeviceFileMinor: 4\n", "DeviceFileMinor given twice"},
		"not key value":   {"DeviceFileMinor 3\n", `line 1 "DeviceFileMinor 3" is not "Key: value"`},
		"mig-minors line": {"gpu0/gi1/access 12\n", `is not "Key: value"`},
	} {
		t.Run(name, func(t *testing.T) {
			p := write(strings.ReplaceAll(name, " ", "_"), c.content)
			_, err := ReadCapMinor(p)
			if err == nil {
				t.Fatalf("accepted %q", c.content)
			}
			if !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name the file and say %q", err, c.wantErr)
			}
		})
	}
	if _, err := ReadCapMinor(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// run executes a stand-in tool with the given stdin and extra environment.
func run(t *testing.T, h *Host, tool, stdin string, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(h.ToolPath(tool), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	code := 0
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	return string(out), code
}

func TestNvidiaSMIStandIn(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)

	out, code := run(t, h, ToolNvidiaSMI, "", nil)
	if code != 0 || !strings.Contains(out, "NVIDIA-SMI 570.133.20") || !strings.Contains(out, "Driver Version: 570.133.20") ||
		!strings.Contains(out, "CUDA Version: 12.8") {
		t.Errorf("nvidia-smi: exit %d\n%s", code, out)
	}
	out, code = run(t, h, ToolNvidiaSMI, "", nil, "compute-policy", "-i", "GPU-0f1e", "--set-timeslice", "2")
	if code != 0 || !strings.Contains(out, "MEDIUM") || !strings.Contains(out, "GPU-0f1e") {
		t.Errorf("set timeslice: exit %d\n%s", code, out)
	}
	if _, code = run(t, h, ToolNvidiaSMI, "", nil, "compute-policy", "--set-timeslice=1", "--id=1"); code != 0 {
		t.Errorf("--set-timeslice=1: exit %d", code)
	}
	if out, code = run(t, h, ToolNvidiaSMI, "", nil, "compute-policy", "-i", "0", "--set-timeslice", "7"); code == 0 {
		t.Errorf("timeslice 7 accepted:\n%s", out)
	}
	if out, code = run(t, h, ToolNvidiaSMI, "", nil, "-i", "GPU-0f1e", "-c", "EXCLUSIVE_PROCESS"); code != 0 ||
		!strings.Contains(out, "Exclusive_Process") {
		t.Errorf("compute mode: exit %d\n%s", code, out)
	}
	if out, code = run(t, h, ToolNvidiaSMI, "", nil, "--version"); code != 0 || !strings.Contains(out, "DRIVER version      : 570.133.20") {
		t.Errorf("--version: exit %d\n%s", code, out)
	}
	if _, code = run(t, h, ToolNvidiaSMI, "", nil, "-i"); code == 0 {
		t.Errorf("-i without a value accepted")
	}

	got, err := h.Recorded(ToolNvidiaSMI)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"argv:",
		"argv: compute-policy -i GPU-0f1e --set-timeslice 2",
		"argv: compute-policy --set-timeslice=1 --id=1",
		"argv: compute-policy -i 0 --set-timeslice 7",
		"argv: -i GPU-0f1e -c EXCLUSIVE_PROCESS",
		"argv: --version",
		"argv: -i",
	}
	if !slices.Equal(got, want) {
		t.Errorf("recorded:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	recs, err := h.Records(ToolNvidiaSMI)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.PID <= 0 || time.Since(r.Time) > time.Minute || r.Time.After(time.Now().Add(time.Second)) {
			t.Errorf("record %+v: implausible pid or time", r)
		}
	}

	// Arguments keep their boundaries; tabs and newlines inside them become spaces.
	must(t, h.ResetRecorded(ToolNvidiaSMI))
	run(t, h, ToolNvidiaSMI, "", nil, "a b", "c\td", "e\nf", "", "'quoted'")
	recs, err = h.Records(ToolNvidiaSMI)
	if err != nil || len(recs) != 1 || !slices.Equal(recs[0].Fields, []string{"a b", "c d", "e f", "", "'quoted'"}) {
		t.Errorf("records %+v, %v", recs, err)
	}
}

func TestMPSControlStandIn(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	env := []string{"CUDA_MPS_PIPE_DIRECTORY=/run/mps/gpu0/pipe", "CUDA_VISIBLE_DEVICES=GPU-0f1e"}
	if _, code := run(t, h, ToolMPSControl, "", env, "-d"); code != 0 {
		t.Fatalf("-d: exit %d", code)
	}
	// The last command has no newline, as with printf '...\nquit'.
	stdin := "set_default_active_thread_percentage 25\nset_default_device_pinned_mem_limit 0 8G\nget_default_active_thread_percentage\nquit"
	out, code := run(t, h, ToolMPSControl, stdin, env)
	if code != 0 || strings.TrimSpace(out) != "100.0" {
		t.Errorf("client: exit %d, output %q", code, out)
	}
	got, err := h.Recorded(ToolMPSControl)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"argv: -d",
		"env: CUDA_VISIBLE_DEVICES=GPU-0f1e",
		"env: CUDA_MPS_PIPE_DIRECTORY=/run/mps/gpu0/pipe",
		"argv:",
		"env: CUDA_VISIBLE_DEVICES=GPU-0f1e",
		"env: CUDA_MPS_PIPE_DIRECTORY=/run/mps/gpu0/pipe",
		"stdin: set_default_active_thread_percentage 25",
		"stdin: set_default_device_pinned_mem_limit 0 8G",
		"stdin: get_default_active_thread_percentage",
		"stdin: quit",
	}
	if !slices.Equal(got, want) {
		t.Errorf("recorded:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// -f stays in the foreground until it is told to stop, then exits 0.
	cmd := exec.Command(h.ToolPath(ToolMPSControl), "-f")
	must(t, cmd.Start())
	deadline := time.Now().Add(5 * time.Second)
	for {
		recs, _ := h.Records(ToolMPSControl)
		if len(recs) > 0 && slices.Equal(recs[len(recs)-1].Fields, []string{"-f"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("-f never recorded its start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if cmd.ProcessState != nil {
		t.Fatal("-f exited on its own")
	}
	must(t, cmd.Process.Signal(syscall.SIGTERM))
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case err := <-waited:
		if err != nil {
			t.Errorf("-f after SIGTERM: %v", err)
		}
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("-f did not stop on SIGTERM")
	}
}

func TestOtherStandIns(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	if out, code := run(t, h, ToolPersistenced, "", nil, "--version"); code != 0 || !strings.Contains(out, "570.133.20") {
		t.Errorf("persistenced --version: exit %d %q", code, out)
	}
	if _, code := run(t, h, ToolPersistenced, "", nil, "--persistence-mode", "--verbose"); code != 0 {
		t.Errorf("persistenced: exit %d", code)
	}
	if _, code := run(t, h, ToolMPSServer, "", []string{"CUDA_MPS_LOG_DIRECTORY=/var/log/mps"}); code != 0 {
		t.Errorf("mps-server: exit %d", code)
	}
	if _, code := run(t, h, ToolCDIHook, "{}", nil, "update-ldcache", "--folder", "/usr/lib/x86_64-linux-gnu"); code != 0 {
		t.Errorf("cdi hook: exit %d", code)
	}
	for tool, want := range map[string][]string{
		ToolCDIHook:      {"argv: update-ldcache --folder /usr/lib/x86_64-linux-gnu"},
		ToolPersistenced: {"argv: --version", "argv: --persistence-mode --verbose"},
		ToolMPSServer:    {"argv:", "env: CUDA_MPS_LOG_DIRECTORY=/var/log/mps"},
	} {
		if got, err := h.Recorded(tool); err != nil || !slices.Equal(got, want) {
			t.Errorf("%s recorded %q (%v), want %q", tool, got, err, want)
		}
	}
	// TESSERA_SIM_RECORD_DIR redirects the logs.
	other := t.TempDir()
	run(t, h, ToolNvidiaSMI, "", []string{recordDirEnv + "=" + other}, "-L")
	data, err := os.ReadFile(filepath.Join(other, "nvidia-smi.log"))
	if err != nil || !strings.HasSuffix(strings.TrimSpace(string(data)), "argv\t-L") {
		t.Errorf("redirected log: %q %v", data, err)
	}
	if got, _ := h.Recorded(ToolNvidiaSMI); len(got) != 0 {
		t.Errorf("redirected invocation recorded in the host too: %q", got)
	}
	// Nothing recorded, bad names, corrupt logs.
	if got, err := h.Recorded("nvidia-debugdump"); err != nil || got != nil {
		t.Errorf("never-run tool: %q %v", got, err)
	}
	if _, err := h.Recorded("../host"); err == nil {
		t.Errorf("Recorded accepted a path")
	}
	must(t, os.WriteFile(filepath.Join(h.RecordDir(), "broken.log"), []byte("yesterday\t1\targv\n"), 0o644))
	if _, err := h.Recorded("broken"); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("corrupt log: %v", err)
	}
}

// Many invocations at once each leave exactly one whole record.
func TestStandInsRecordConcurrently(t *testing.T) {
	h := ensure(t, t.TempDir(), testSpec)
	const n = 24
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cmd := exec.Command(h.ToolPath(ToolNvidiaSMI), "compute-policy", "-i", strconv.Itoa(i%4), "--set-timeslice", strconv.Itoa(i%4))
			cmd.Stdout = io.Discard
			if err := cmd.Run(); err != nil {
				t.Errorf("invocation %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	recs, err := h.Records(ToolNvidiaSMI)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, r := range recs {
		seen[r.String()]++
	}
	if len(recs) != n {
		t.Errorf("%d records, want %d", len(recs), n)
	}
	for i := range 4 {
		key := fmt.Sprintf("argv: compute-policy -i %d --set-timeslice %d", i, i)
		if seen[key] != n/4 {
			t.Errorf("%q recorded %d times, want %d", key, seen[key], n/4)
		}
	}
}
