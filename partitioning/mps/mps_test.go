//go:build linux

package mps

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

func TestEnsureStartsOneDaemonPerGPU(t *testing.T) {
	w := newWorld(t)
	g := w.gpu(2)
	d := w.ensure("2", Config{Limits: Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 << 10}})
	p := w.m.PathsFor(g.UUID)
	if d.Adopted() || d.PID() <= 0 || d.Paths() != p {
		t.Fatalf("daemon: adopted %v pid %d paths %+v", d.Adopted(), d.PID(), d.Paths())
	}
	if p.Pipe != filepath.Join(w.root, g.UUID, "pipe") || p.Log != filepath.Join(w.root, g.UUID, "log") {
		t.Errorf("paths %+v", p)
	}

	// Exactly one control daemon, in the foreground, for this GPU only, with its own directories.
	ds := w.daemons(p.Pipe)
	if len(ds) != 1 {
		t.Fatalf("%d daemon starts, want 1: %+v", len(ds), ds)
	}
	want := map[string]string{EnvVisibleDevices: g.UUID, EnvPipeDirectory: p.Pipe, EnvLogDirectory: p.Log}
	if ds[0].PID != d.PID() || !slices.Equal(ds[0].Args, []string{"-f"}) || !mapsEqual(ds[0].Env, want) {
		t.Errorf("daemon start %+v, want pid %d args [-f] env %v", ds[0], d.PID(), want)
	}
	if !alive(d.PID()) {
		t.Error("daemon is not running")
	}
	// Exactly these limits were sent, nothing else.
	wantCmds := []string{"set_default_active_thread_percentage 30", "set_default_device_pinned_mem_limit 0 20480M"}
	if got := w.commands(p.Pipe); !slices.Equal(got, wantCmds) {
		t.Errorf("commands %q, want %q", got, wantCmds)
	}
	// EXCLUSIVE_PROCESS on this GPU, nothing changed on the others.
	for i := range 8 {
		want := nvmlib.ComputeModeDefault
		if i == 2 {
			want = nvmlib.ComputeModeExclusiveProcess
		}
		if got := w.computeMode(i); got != want {
			t.Errorf("GPU %d compute mode %s, want %s", i, got, want)
		}
	}
	// The state and PID files say what runs and what to restore.
	st := mustState(t, p)
	if st.PID != d.PID() || st.PreviousComputeMode != nvmlib.ComputeModeDefault || st.Limits != d.Limits() || st.GPUUUID != g.UUID || st.StartTicks == 0 {
		t.Errorf("state %+v", st)
	}
	if pid := readPIDFile(t, p.PIDFile); pid != d.PID() {
		t.Errorf("PID file says %d, daemon is %d", pid, d.PID())
	}

	// A second GPU gets its own daemon; the first is untouched.
	d5 := w.ensure(w.gpu(5).UUID, Config{})
	p5 := w.m.PathsFor(w.gpu(5).UUID)
	if d5.PID() == d.PID() || len(w.daemons(p5.Pipe)) != 1 || len(w.daemons(p.Pipe)) != 1 {
		t.Errorf("second GPU: pid %d, starts %d / %d", d5.PID(), len(w.daemons(p5.Pipe)), len(w.daemons(p.Pipe)))
	}
	if got := w.commands(p5.Pipe); len(got) != 0 {
		t.Errorf("no limits asked, commands sent: %q", got)
	}
}

// A plugin restart is a new Manager (and a new NVML session) on the same directories: it re-adopts
// the running daemon and starts no second one.
func TestRestartReadoptsTheDaemon(t *testing.T) {
	w := newWorld(t)
	cfg := Config{Limits: Limits{ActiveThreadPercentage: 50}}
	d1 := w.ensure("1", cfg)
	p := d1.Paths()

	w.open()
	w.m = w.manager()
	d2 := w.ensure("1", cfg)
	if !d2.Adopted() || d2.PID() != d1.PID() {
		t.Fatalf("after restart: adopted %v pid %d, want the running daemon %d", d2.Adopted(), d2.PID(), d1.PID())
	}
	if n := len(w.daemons(p.Pipe)); n != 1 {
		t.Errorf("%d daemon starts, want 1", n)
	}
	if got := w.commands(p.Pipe); !slices.Equal(got, []string{"set_default_active_thread_percentage 50"}) {
		t.Errorf("same limits re-sent or other commands: %q", got)
	}
	if readPIDFile(t, p.PIDFile) != d1.PID() {
		t.Error("PID file changed")
	}

	// Changed limits reach the adopted daemon: defaults, and every running server (none here).
	d3, err := w.m.Ensure(context.Background(), "1", Config{Limits: Limits{ActiveThreadPercentage: 25, PinnedMemoryMiB: 8 << 10}})
	if err != nil || d3.PID() != d1.PID() {
		t.Fatalf("Ensure with new limits: %v", err)
	}
	want := []string{"set_default_active_thread_percentage 50", "get_server_list",
		"set_default_active_thread_percentage 25", "set_default_device_pinned_mem_limit 0 8192M"}
	if got := w.commands(p.Pipe); !slices.Equal(got, want) {
		t.Errorf("commands %q, want %q", got, want)
	}
	if mustState(t, p).Limits != (Limits{ActiveThreadPercentage: 25, PinnedMemoryMiB: 8192}) {
		t.Errorf("state limits %+v", mustState(t, p).Limits)
	}
	// Attach finds it without starting anything.
	a, err := w.manager().Attach(context.Background(), "1")
	if err != nil || a.PID() != d1.PID() {
		t.Errorf("Attach: %v", err)
	}
}

// A real restart: a plugin process starts the daemon and exits; the daemon outlives it, and the
// next process adopts it and stops it.
func TestDaemonOutlivesThePluginProcess(t *testing.T) {
	w := newWorld(t)
	g := w.gpu(3)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=ensure", helperStateEnv+"="+w.state, helperRootEnv+"="+w.root, helperGPUEnv+"=3")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("plugin process: %v\n%s", err, exitStderr(err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("plugin process printed %q", out)
	}
	if !alive(pid) {
		t.Fatalf("daemon %d died with the process that started it", pid)
	}
	d := w.ensure("3", Config{Limits: Limits{ActiveThreadPercentage: 25}})
	p := d.Paths()
	if !d.Adopted() || d.PID() != pid || len(w.daemons(p.Pipe)) != 1 {
		t.Fatalf("adopted %v pid %d (want %d), %d starts", d.Adopted(), d.PID(), pid, len(w.daemons(p.Pipe)))
	}
	if w.computeMode(3) != nvmlib.ComputeModeExclusiveProcess {
		t.Errorf("compute mode %s", w.computeMode(3))
	}
	if err := w.m.Stop(context.Background(), g.UUID, StopOptions{}); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid)
	if w.computeMode(3) != nvmlib.ComputeModeDefault {
		t.Errorf("compute mode after stop %s", w.computeMode(3))
	}
}

func exitStderr(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}

func TestStopQuitsAndRestoresComputeMode(t *testing.T) {
	w := newWorld(t)
	d := w.ensure("4", Config{Limits: Limits{PinnedMemoryMiB: 1024}})
	p := d.Paths()
	pid := d.PID()
	if err := w.m.Stop(context.Background(), "4", StopOptions{}); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Error("daemon still runs")
	}
	if got := w.commands(p.Pipe); !slices.Equal(got, []string{"set_default_device_pinned_mem_limit 0 1024M", "quit"}) {
		t.Errorf("commands %q, want the limit then quit", got)
	}
	if m := w.computeMode(4); m != nvmlib.ComputeModeDefault {
		t.Errorf("compute mode %s, want Default restored", m)
	}
	if exists(p.State) || exists(p.PIDFile) {
		t.Error("state or PID file left")
	}
	if !exists(p.Log) {
		t.Error("log directory removed")
	}
	// Stopping again, or a GPU that never had a daemon, does nothing.
	if err := w.m.Stop(context.Background(), "4", StopOptions{}); err != nil {
		t.Error(err)
	}
	if err := w.m.Stop(context.Background(), "6", StopOptions{}); err != nil {
		t.Error(err)
	}
	if _, err := w.m.Attach(context.Background(), "4"); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Attach after stop: %v", err)
	}
}

// The mode to restore is the one before MPS first took the GPU, even when the daemon crashed and
// a new one was started while the GPU was already in EXCLUSIVE_PROCESS mode.
func TestPreviousComputeModeSurvivesADaemonCrash(t *testing.T) {
	w := newWorld(t)
	d1 := w.ensure("0", Config{})
	p := d1.Paths()
	if _, err := d1.AddClient(context.Background(), "claim-1", Limits{PinnedMemoryMiB: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(-d1.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, d1.PID())
	if w.computeMode(0) != nvmlib.ComputeModeExclusiveProcess {
		t.Fatal("compute mode changed by the crash")
	}
	w.m = w.manager()
	if _, err := w.m.Attach(context.Background(), "0"); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Attach to a dead daemon: %v", err)
	}
	d2 := w.ensure("0", Config{})
	if d2.Adopted() || d2.PID() == d1.PID() || len(w.daemons(p.Pipe)) != 2 {
		t.Fatalf("after the crash: adopted %v pid %d, %d starts", d2.Adopted(), d2.PID(), len(w.daemons(p.Pipe)))
	}
	if st := mustState(t, p); st.PreviousComputeMode != nvmlib.ComputeModeDefault {
		t.Errorf("previous compute mode %s, want Default (the mode before MPS)", st.PreviousComputeMode)
	}
	// The client handed out before the crash is still allocated.
	if c := d2.Clients(); len(c) != 1 || c[0].ID != "claim-1" {
		t.Errorf("clients after the crash %+v", c)
	}
	if err := w.m.Stop(context.Background(), "0", StopOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if w.computeMode(0) != nvmlib.ComputeModeDefault {
		t.Errorf("compute mode %s after stop", w.computeMode(0))
	}
}

// A PID in the state file that now belongs to another process is not adopted, and not signalled.
func TestReusedPIDIsNotAdopted(t *testing.T) {
	w := newWorld(t)
	g := w.gpu(6)
	p := w.m.PathsFor(g.UUID)
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, _, _ := (OSProcesses{}).Lookup(os.Getpid())
	stale := &state{Format: stateFormat, GPUUUID: g.UUID, GPUIndex: 6, PID: os.Getpid(), StartTicks: self.StartTicks,
		Control: w.host.ToolPath("nvidia-cuda-mps-control"), PipeDir: p.Pipe, LogDir: p.Log,
		PreviousComputeMode: nvmlib.ComputeModeDefault}
	if err := writeState(p, stale); err != nil {
		t.Fatal(err)
	}
	if why := w.m.identify(stale); !strings.Contains(why, "not the MPS control daemon") {
		t.Errorf("identify: %q", why)
	}
	if err := w.m.Stop(context.Background(), "6", StopOptions{}); err != nil {
		t.Fatal(err) // this process survives: it is not the daemon
	}
	if err := writeState(p, stale); err != nil {
		t.Fatal(err)
	}
	d := w.ensure("6", Config{})
	if d.Adopted() || d.PID() == os.Getpid() {
		t.Errorf("adopted the test process")
	}
}

// Without a state file, a daemon that its own PID file names, and whose environment shows this
// pipe directory, is adopted rather than duplicated.
func TestAdoptsDaemonByItsPIDFile(t *testing.T) {
	w := newWorld(t)
	g := w.gpu(7)
	p := w.m.PathsFor(g.UUID)
	for _, dir := range []string{p.Pipe, p.Log} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pid, err := (OSProcesses{}).Start([]string{w.host.ToolPath("nvidia-cuda-mps-control"), "-f", FlagMultiUser},
		append(baseEnv(), EnvVisibleDevices+"="+g.UUID, EnvPipeDirectory+"="+p.Pipe, EnvLogDirectory+"="+p.Log),
		filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		waitGone(t, pid)
	})
	// The daemon writes its PID file once it runs (the stand-in does not; the test does it for it).
	for len(w.daemons(p.Pipe)) == 0 {
		if !alive(pid) {
			t.Fatal("stand-in daemon exited")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile(filepath.Join(p.Pipe, daemonPidFile), []byte(strconv.Itoa(pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := w.ensure("7", Config{MultiUser: true})
	if !d.Adopted() || d.PID() != pid || !d.MultiUser() || len(w.daemons(p.Pipe)) != 1 {
		t.Fatalf("adopted %v pid %d (want %d) multi-user %v starts %d", d.Adopted(), d.PID(), pid, d.MultiUser(), len(w.daemons(p.Pipe)))
	}
	st := mustState(t, p)
	if !st.PreviousModeGuessed || st.PreviousComputeMode != nvmlib.ComputeModeDefault {
		t.Errorf("state %+v", st)
	}
	if w.computeMode(7) != nvmlib.ComputeModeExclusiveProcess {
		t.Error("adoption did not put the GPU in EXCLUSIVE_PROCESS mode")
	}
}

func TestRefusesMIGEnabledGPU(t *testing.T) {
	w := newWorld(t)
	if _, err := w.lib.SetMigMode(1, true); err != nil {
		t.Fatal(err)
	}
	g := w.gpu(1)
	if !g.MigEnabled && !g.MigPending {
		t.Fatalf("MIG not on: %+v", g)
	}
	_, err := w.m.Ensure(context.Background(), "1", Config{})
	wantErr(t, err, "GPU 1", g.UUID, "MIG mode", "whole GPUs only", "nvidia-smi -i 1 -mig 0")
	if len(w.invocations()) != 0 || w.computeMode(1) != nvmlib.ComputeModeDefault || exists(w.m.PathsFor(g.UUID).State) {
		t.Error("a refused GPU was changed")
	}
}

func TestRefusesAnotherSharingModeOnTheGPU(t *testing.T) {
	w := newWorld(t)
	_, err := w.m.Ensure(context.Background(), "2", Config{Mode: "time-sliced"})
	wantErr(t, err, "GPU 2", `sharing mode "time-sliced" conflicts with MPS`, "DEFAULT compute mode", "one mode in the sharing profile")

	// A time-sliced (or whole-GPU) workload still running on the GPU: its processes.
	if err := w.node.AddProcess(2, 4242, 2048, -1, -1); err != nil {
		t.Fatal(err)
	}
	_, err = w.m.Ensure(context.Background(), "2", Config{})
	wantErr(t, err, "GPU 2", "outside MPS", "pid 4242", "stop them")
	if len(w.invocations()) != 0 || w.computeMode(2) != nvmlib.ComputeModeDefault || exists(w.m.PathsFor(w.gpu(2).UUID).State) {
		t.Error("a refused GPU was changed")
	}

	// Prohibited compute mode is someone's decision.
	if err := w.lib.SetComputeMode(3, nvmlib.ComputeModeProhibited); err != nil {
		t.Fatal(err)
	}
	_, err = w.m.Ensure(context.Background(), "3", Config{})
	wantErr(t, err, "GPU 3", "Prohibited", "nvidia-smi -i 3 -c DEFAULT")
	if w.computeMode(3) != nvmlib.ComputeModeProhibited {
		t.Error("Prohibited mode changed")
	}
}

func TestConfigChecks(t *testing.T) {
	pascal := nvmlib.GPU{Index: 0, UUID: "GPU-p", ProductName: "Tesla P100", ComputeCapability: "6.0", MemoryMiB: 16280}
	wantErr(t, checkConfig(pascal, Config{Limits: Limits{ActiveThreadPercentage: 50}}), "compute capability 6.0", "Volta or newer")
	wantErr(t, checkConfig(pascal, Config{MultiUser: true}), "multi-user", "Volta or newer")
	if err := checkConfig(pascal, Config{}); err != nil {
		t.Errorf("MPS without limits on Pascal: %v", err)
	}
	kepler := nvmlib.GPU{ComputeCapability: "3.0"}
	wantErr(t, checkConfig(kepler, Config{}), "needs 3.5 or higher")
	h100 := nvmlib.GPU{Index: 2, UUID: "GPU-h", ProductName: "H100", ComputeCapability: "9.0", MemoryMiB: 81559}
	wantErr(t, checkConfig(h100, Config{Limits: Limits{ActiveThreadPercentage: 101}}), "limits.activeThreadPercentage", "1 to 100")
	wantErr(t, checkConfig(h100, Config{Limits: Limits{PinnedMemoryMiB: 90000}}), "limits.pinnedMemoryMiB", "81559 MiB")
	wantErr(t, checkConfig(h100, Config{Mode: "mig-static"}), `"mig-static" conflicts`, "partitions the GPU in hardware")
	if err := checkConfig(h100, Config{Mode: ModeMPS, MultiUser: true, Limits: Limits{ActiveThreadPercentage: 100, PinnedMemoryMiB: 81559}}); err != nil {
		t.Error(err)
	}
}

func TestMultiUser(t *testing.T) {
	w := newWorld(t)
	d := w.ensure("5", Config{MultiUser: true})
	p := d.Paths()
	if ds := w.daemons(p.Pipe); len(ds) != 1 || !slices.Equal(ds[0].Args, []string{"-f", "-multiuser-server"}) {
		t.Errorf("daemon starts %+v, want -f -multiuser-server", ds)
	}
	_, err := w.m.Ensure(context.Background(), "5", Config{})
	wantErr(t, err, "runs with -multiuser-server", "needs a restart")
	// Single-user (the default) starts without the flag: MPS then serves one Linux user at a time.
	d6 := w.ensure("6", Config{})
	if ds := w.daemons(d6.Paths().Pipe); len(ds) != 1 || !slices.Equal(ds[0].Args, []string{"-f"}) {
		t.Errorf("single-user start %+v", ds)
	}
}

func TestSocketPathLimit(t *testing.T) {
	w := newWorld(t)
	m := w.manager(WithRoot(filepath.Join(w.root, strings.Repeat("d", 60))))
	_, err := m.Ensure(context.Background(), "0", Config{})
	wantErr(t, err, "Linux allows 107", "shorter root")
}

// Two Managers (two processes' worth) racing to ensure the same GPU start one daemon.
func TestConcurrentEnsureStartsOneDaemon(t *testing.T) {
	w := newWorld(t)
	var wg sync.WaitGroup
	pids := make([]int, 6)
	errs := make([]error, 6)
	for i := range pids {
		m := w.manager()
		gpu := strconv.Itoa(i % 2)
		wg.Go(func() {
			d, err := m.Ensure(context.Background(), gpu, Config{})
			if err == nil {
				pids[i] = d.PID()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i := range pids {
		if pids[i] != pids[i%2] {
			t.Errorf("GPU %d: pids %v", i%2, pids)
		}
	}
	for i := range 2 {
		if n := len(w.daemons(w.m.PathsFor(w.gpu(i).UUID).Pipe)); n != 1 {
			t.Errorf("GPU %d: %d daemon starts", i, n)
		}
	}
}

func TestListReportsDaemons(t *testing.T) {
	w := newWorld(t)
	w.ensure("3", Config{Limits: Limits{ActiveThreadPercentage: 40}})
	d1 := w.ensure("1", Config{})
	if _, err := d1.AddClient(context.Background(), "claim-a", Limits{PinnedMemoryMiB: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(-d1.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, d1.PID())
	st, err := w.manager().List()
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[0].GPUIndex != 1 || st[1].GPUIndex != 3 {
		t.Fatalf("list %+v", st)
	}
	if st[0].Running || !strings.Contains(st[0].Reason, "exited") || len(st[0].Clients) != 1 {
		t.Errorf("dead daemon reported %+v", st[0])
	}
	if !st[1].Running || st[1].Limits.ActiveThreadPercentage != 40 {
		t.Errorf("running daemon reported %+v", st[1])
	}
}

func TestParseStat(t *testing.T) {
	state, ticks, err := parseStat([]byte("4242 (nvidia (mps) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n"))
	if err != nil || state != "S" || ticks != 987654 {
		t.Errorf("parseStat: %q %d %v", state, ticks, err)
	}
	if _, _, err := parseStat([]byte("4242 (x S 1")); err == nil {
		t.Error("malformed stat accepted")
	}
	// This process, read the real way.
	info, ok, err := (OSProcesses{}).Lookup(os.Getpid())
	if err != nil || !ok || info.StartTicks == 0 || len(info.Args) == 0 || info.Env == nil {
		t.Errorf("Lookup(self): %+v %v %v", info, ok, err)
	}
	if _, ok, _ := (OSProcesses{}).Lookup(1 << 30); ok {
		t.Error("a process that cannot exist was found")
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
