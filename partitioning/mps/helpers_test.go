//go:build linux

package mps

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
)

// Environment of the helper process TestMain turns into (a plugin process that starts a daemon and
// exits without stopping it).
const (
	helperEnv      = "TESSERA_MPS_TEST_HELPER"
	helperStateEnv = "TESSERA_MPS_TEST_STATE"
	helperRootEnv  = "TESSERA_MPS_TEST_ROOT"
	helperGPUEnv   = "TESSERA_MPS_TEST_GPU"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "ensure" {
		os.Exit(helperEnsure())
	}
	os.Exit(m.Run())
}

// helperEnsure is a plugin process: it ensures a daemon, prints its PID, and exits without
// stopping it.
func helperEnsure() int {
	lib, node, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: os.Getenv(helperStateEnv)}.Open()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	m := NewManager(lib, WithRoot(os.Getenv(helperRootEnv)), ForSimulatedHost(node.Host()))
	d, err := m.Ensure(context.Background(), os.Getenv(helperGPUEnv), Config{Limits: Limits{ActiveThreadPercentage: 25}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(d.PID())
	return 0
}

// world is a simulated DGX H100 node and a Manager of its GPUs.
type world struct {
	t     *testing.T
	state string
	root  string
	lib   nvmlib.Interface
	node  *sim.Node
	host  *host.Host
	m     *Manager
}

// newWorld opens a fresh simulated node. The Manager's root is short (MPS socket paths are
// limited), and every control daemon a test leaves running is killed when it ends.
func newWorld(t *testing.T, opts ...Option) *world {
	t.Helper()
	w := &world{t: t, state: t.TempDir()}
	root, err := os.MkdirTemp("", "mps")
	if err != nil {
		t.Fatal(err)
	}
	w.root = root
	w.open()
	w.m = w.manager(opts...)
	t.Cleanup(func() {
		w.killDaemons()
		os.RemoveAll(root)
	})
	return w
}

// open opens the node (again), as a restarted process would.
func (w *world) open() {
	w.t.Helper()
	lib, node, err := backend.Options{NVML: "sim:dgx-h100", SimStateDir: w.state}.Open()
	if err != nil {
		w.t.Fatal(err)
	}
	w.lib, w.node, w.host = lib, node, node.Host()
}

// manager makes a Manager as a (re)started plugin would, with short timeouts.
func (w *world) manager(opts ...Option) *Manager {
	base := []Option{WithRoot(w.root), ForSimulatedHost(w.host), WithTimeouts(5*time.Second, 300*time.Millisecond, 10*time.Second)}
	return NewManager(w.lib, append(base, opts...)...)
}

func (w *world) gpu(i int) nvmlib.GPU {
	w.t.Helper()
	g, err := w.lib.GPU(i)
	if err != nil {
		w.t.Fatal(err)
	}
	return g
}

func (w *world) ensure(gpu string, cfg Config) *Daemon {
	w.t.Helper()
	d, err := w.m.Ensure(context.Background(), gpu, cfg)
	if err != nil {
		w.t.Fatalf("Ensure(%s): %v", gpu, err)
	}
	return d
}

// killDaemons kills every foreground control daemon the stand-in recorded that still runs, with
// its process group, and waits until it is gone.
func (w *world) killDaemons() {
	for _, inv := range w.invocations() {
		if !inv.daemon() {
			continue
		}
		info, ok, _ := (OSProcesses{}).Lookup(inv.PID)
		if !ok || isDaemon(info, inv.Env[EnvPipeDirectory]) != "" {
			continue
		}
		_ = syscall.Kill(-inv.PID, syscall.SIGKILL)
		waitGone(w.t, inv.PID)
	}
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok, _ := (OSProcesses{}).Lookup(pid); !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("pid %d still runs", pid)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func alive(pid int) bool {
	_, ok, _ := (OSProcesses{}).Lookup(pid)
	return ok
}

// invocation is one run of the stand-in nvidia-cuda-mps-control, rebuilt from its records.
type invocation struct {
	PID   int
	Args  []string
	Env   map[string]string
	Stdin []string
}

func (i invocation) daemon() bool {
	return slices.Contains(i.Args, "-f") || slices.Contains(i.Args, "-d")
}

// invocations returns every run of the stand-in, oldest first. A run starts with its argv record;
// its env and stdin records carry the same PID.
func (w *world) invocations() []invocation {
	w.t.Helper()
	recs, err := w.host.Records(host.ToolMPSControl)
	if err != nil {
		w.t.Fatal(err)
	}
	var out []invocation
	last := map[int]int{}
	for _, r := range recs {
		switch r.Kind {
		case "argv":
			last[r.PID] = len(out)
			out = append(out, invocation{PID: r.PID, Args: r.Fields, Env: map[string]string{}})
		case "env":
			if i, ok := last[r.PID]; ok {
				k, v, _ := strings.Cut(r.Fields[0], "=")
				out[i].Env[k] = v
			}
		case "stdin":
			if i, ok := last[r.PID]; ok {
				out[i].Stdin = append(out[i].Stdin, r.Fields[0])
			}
		}
	}
	return out
}

// daemons returns the daemon starts for a pipe directory.
func (w *world) daemons(pipe string) []invocation {
	var out []invocation
	for _, inv := range w.invocations() {
		if inv.daemon() && inv.Env[EnvPipeDirectory] == pipe {
			out = append(out, inv)
		}
	}
	return out
}

// commands returns, in order, every command line control clients sent to the daemon of a pipe
// directory.
func (w *world) commands(pipe string) []string {
	var out []string
	for _, inv := range w.invocations() {
		if !inv.daemon() && inv.Env[EnvPipeDirectory] == pipe {
			out = append(out, inv.Stdin...)
		}
	}
	return out
}

func (w *world) computeMode(i int) nvmlib.ComputeMode { return w.gpu(i).ComputeMode }

func readPIDFile(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func mustState(t *testing.T, p Paths) *state {
	t.Helper()
	st, err := readState(p.State)
	if err != nil || st == nil {
		t.Fatalf("state %s: %v %v", p.State, st, err)
	}
	return st
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one containing %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not contain %q", err, p)
		}
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
