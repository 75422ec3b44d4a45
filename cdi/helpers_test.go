package cdi_test

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// env is a simulated node with a stand-in hook binary and an empty spec directory.
type env struct {
	node    *sim.Node
	lib     nvmlib.Interface
	host    *host.Host
	hook    string // a stand-in nvidia-cdi-hook
	specDir string
	tmp     string // holds the hook and the spec directory
}

// layouts used by the tests: GPU 1 cut into seven 1g.5gb instances, the other GPUs whole.
const migConfig = `version: v1
mig-configs:
  gpu1-all-1g:
    - devices: [1]
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  all-1g:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
`

// newEnv opens a fresh simulated dgx-a100 and applies MIG layout (none if "").
func newEnv(t testing.TB, layout string) *env {
	t.Helper()
	spec, err := sim.BuiltinNode("dgx-a100")
	if err != nil {
		t.Fatal(err)
	}
	node, err := sim.Open(spec, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lib.Shutdown() })
	if layout != "" {
		cfg, err := mig.ParseConfig([]byte(migConfig), "test.yaml")
		if err != nil {
			t.Fatal(err)
		}
		rep, err := mig.Apply(context.Background(), lib, cfg, layout, mig.Options{})
		if err != nil || !rep.OK() {
			t.Fatalf("mig apply %s: %v %+v", layout, err, rep)
		}
	}
	tmp := t.TempDir()
	hook := filepath.Join(tmp, "toolkit", "nvidia-cdi-hook")
	if err := os.MkdirAll(filepath.Dir(hook), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hook, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return &env{node: node, lib: lib, host: node.Host(), hook: hook, specDir: filepath.Join(tmp, "cdi"), tmp: tmp}
}

// options are the generator options for the simulated host.
func (e *env) options(extra ...cdi.Option) []cdi.Option {
	return append([]cdi.Option{
		cdi.WithDriverRoot(e.host.DriverRoot()),
		cdi.WithDevRoot(e.host.DevRoot()),
		cdi.WithProcRoot(e.host.ProcRoot()),
		cdi.WithSpecDir(e.specDir),
		cdi.WithHookPath(e.hook),
	}, extra...)
}

func (e *env) generator(t testing.TB, extra ...cdi.Option) *cdi.Generator {
	t.Helper()
	g, err := cdi.New(e.options(extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func (e *env) snapshot(t testing.TB) *inventory.Snapshot {
	t.Helper()
	s, err := inventory.New(e.lib).Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// normalize replaces the test's temporary paths in golden output.
func (e *env) normalize(s string, extra map[string]string) string {
	for from, to := range extra {
		s = strings.ReplaceAll(s, from, to)
	}
	s = strings.ReplaceAll(s, e.host.Root(), "$SIM_HOST")
	return strings.ReplaceAll(s, e.tmp, "$TMP")
}

// baseOCISpec is a container's OCI spec as containerd makes it before CDI injection, reduced to
// what the injection touches.
func baseOCISpec() *oci.Spec {
	return &oci.Spec{
		Version: oci.Version,
		Process: &oci.Process{
			User: oci.User{UID: 0, GID: 0},
			Args: []string{"sh"},
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=e2e"},
			Cwd:  "/",
		},
		Root: &oci.Root{Path: "rootfs"},
		Mounts: []oci.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/sandbox/shm", Options: []string{"rbind", "ro"}},
		},
		Linux: &oci.Linux{
			Resources: &oci.LinuxResources{Devices: []oci.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}},
			Namespaces: []oci.LinuxNamespace{
				{Type: oci.PIDNamespace}, {Type: oci.IPCNamespace}, {Type: oci.UTSNamespace}, {Type: oci.MountNamespace},
			},
		},
	}
}

// inject resolves devices from the spec directory with the CDI library, exactly as containerd 2.x
// and CRI-O do, into a fresh base OCI spec.
func (e *env) inject(t testing.TB, devices ...string) *oci.Spec {
	t.Helper()
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(e.specDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) > 0 {
		t.Fatalf("spec directory has errors: %v", errs)
	}
	s := baseOCISpec()
	if unresolved, err := cache.InjectDevices(s, devices...); err != nil {
		t.Fatalf("inject %v: unresolved %v: %v", devices, unresolved, err)
	}
	return s
}

// golden compares got with testdata/<name>.json, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name+".json")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./cdi -run %s -update to create it, then review it)", err, t.Name())
	}
	if string(want) != string(got) {
		t.Errorf("%s differs from the golden file (run with -update to rewrite it, then review the diff):\n%s",
			path, diffLines(string(want), string(got)))
	}
}

func marshal(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

// diffLines shows the first differing lines.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	shown := 0
	for i := 0; i < max(len(w), len(g)) && shown < 20; i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			b.WriteString("line " + strconv.Itoa(i+1) + ":\n  want: " + wl + "\n  got:  " + gl + "\n")
			shown++
		}
	}
	return b.String()
}
