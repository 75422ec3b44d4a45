//go:build linux

package mps

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// fakeProcs drives process lifecycles the simulator's stand-in does not: a daemon that honours
// quit, dies at start or never gets ready, MPS servers to list, a command that fails.
type fakeProcs struct {
	mu      sync.Mutex
	next    int
	procs   map[int]*fakeProc
	run     []string // "<command line>" of every control client run
	signals []string // "<pid> <signal>"

	servers     string // what get_server_list prints
	dieAtStart  string // if set, a started daemon exits at once, printing this
	quitExits   bool   // quit makes the daemon exit
	ignoreTerm  bool   // SIGTERM does not end the daemon
	failCommand string // a command starting with this fails
}

type fakeProc struct {
	args, env []string
	alive     bool
}

func newFake() *fakeProcs { return &fakeProcs{next: 900000, procs: map[int]*fakeProc{}} }

func (f *fakeProcs) Start(argv, env []string, output string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	p := &fakeProc{args: argv, env: env, alive: f.dieAtStart == ""}
	f.procs[f.next] = p
	if f.dieAtStart != "" {
		if err := os.WriteFile(output, []byte(f.dieAtStart+"\n"), 0o644); err != nil {
			return 0, err
		}
	}
	return f.next, nil
}

func (f *fakeProcs) Run(_ context.Context, _, env []string, stdin string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	line := strings.TrimSuffix(stdin, "\n")
	f.run = append(f.run, line)
	if f.failCommand != "" && strings.HasPrefix(line, f.failCommand) {
		return "An error occurred", errors.New("exit status 1")
	}
	switch line {
	case "get_server_list":
		return f.servers, nil
	case "quit":
		if f.quitExits {
			pipe, _ := envValue(env, EnvPipeDirectory)
			for _, p := range f.procs {
				if v, _ := envValue(p.env, EnvPipeDirectory); v == pipe {
					p.alive = false
				}
			}
		}
	}
	return "", nil
}

func (f *fakeProcs) Lookup(pid int) (ProcInfo, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.procs[pid]
	if !ok || !p.alive {
		return ProcInfo{}, false, nil
	}
	return ProcInfo{PID: pid, StartTicks: 7, Args: p.args, Env: p.env}, true, nil
}

func (f *fakeProcs) Signal(pid int, sig syscall.Signal) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.signals = append(f.signals, fmt.Sprintf("%d %s", pid, sig))
	if p, ok := f.procs[pid]; ok && (sig == syscall.SIGKILL || !f.ignoreTerm) {
		p.alive = false
	}
	return nil
}

func (f *fakeProcs) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.run...)
}

func (f *fakeProcs) sent() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.signals...)
}

func fakeWorld(t *testing.T, f *fakeProcs, ready bool) *world {
	return newWorld(t, WithProcesses(f), WithControlBinary("/usr/bin/nvidia-cuda-mps-control"),
		WithReadyCheck(func(string, int) (bool, error) { return ready, nil }),
		WithTimeouts(200*time.Millisecond, 100*time.Millisecond, time.Second))
}

func TestSetLimitsReachesRunningServers(t *testing.T) {
	f := newFake()
	f.servers = "4242\n5151\n"
	w := fakeWorld(t, f, true)
	ctx := context.Background()
	d := w.ensure("1", Config{Limits: Limits{ActiveThreadPercentage: 50}})
	if err := d.SetLimits(ctx, Limits{ActiveThreadPercentage: 40, PinnedMemoryMiB: 8 * gib}); err != nil {
		t.Fatal(err)
	}
	// Removing the limits: 100% of threads, and the GPU's whole memory (MPS cannot unset a limit).
	if err := d.SetLimits(ctx, Limits{}); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"set_default_active_thread_percentage 50",
		"get_server_list",
		"set_default_active_thread_percentage 40",
		"set_active_thread_percentage 4242 40",
		"set_active_thread_percentage 5151 40",
		"set_default_device_pinned_mem_limit 0 8192M",
		"set_device_pinned_mem_limit 4242 0 8192M",
		"set_device_pinned_mem_limit 5151 0 8192M",
		"get_server_list",
		"set_default_active_thread_percentage 100",
		"set_active_thread_percentage 4242 100",
		"set_active_thread_percentage 5151 100",
		"set_default_device_pinned_mem_limit 0 81559M",
		"set_device_pinned_mem_limit 4242 0 81559M",
		"set_device_pinned_mem_limit 5151 0 81559M",
	}
	if got := f.commands(); !equal(got, want) {
		t.Errorf("commands:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if pids, err := d.ServerPIDs(ctx); err != nil || !equal(pids, []int{4242, 5151}) {
		t.Errorf("ServerPIDs %v %v", pids, err)
	}
	f.servers = "no servers\n"
	if _, err := d.ServerPIDs(ctx); err == nil {
		t.Error("garbage server list accepted")
	}
	wantErr(t, d.SetLimits(ctx, Limits{ActiveThreadPercentage: 0, PinnedMemoryMiB: 1 << 20}), "limits.pinnedMemoryMiB")
}

func TestQuitEndsTheDaemonWithoutSignals(t *testing.T) {
	f := newFake()
	f.quitExits = true
	w := fakeWorld(t, f, true)
	w.ensure("2", Config{})
	if err := w.m.Stop(context.Background(), "2", StopOptions{}); err != nil {
		t.Fatal(err)
	}
	if s := f.sent(); len(s) != 0 {
		t.Errorf("signals sent although quit worked: %v", s)
	}
	if got := f.commands(); !equal(got, []string{"quit"}) {
		t.Errorf("commands %q", got)
	}
	if w.computeMode(2) != nvmlib.ComputeModeDefault {
		t.Error("compute mode not restored")
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	f := newFake()
	f.ignoreTerm = true
	w := fakeWorld(t, f, true)
	d := w.ensure("2", Config{})
	if err := w.m.Stop(context.Background(), "2", StopOptions{}); err != nil {
		t.Fatal(err)
	}
	want := []string{fmt.Sprintf("%d terminated", d.PID()), fmt.Sprintf("%d killed", d.PID())}
	if s := f.sent(); !equal(s, want) {
		t.Errorf("signals %v, want %v", s, want)
	}
}

// A start that fails leaves nothing behind: no daemon, no state, the GPU's compute mode as it was.
func TestFailedStartsLeaveNothing(t *testing.T) {
	ctx := context.Background()
	t.Run("daemon exits at start", func(t *testing.T) {
		f := newFake()
		f.dieAtStart = "An instance of this daemon is already running"
		w := fakeWorld(t, f, true)
		_, err := w.m.Ensure(ctx, "3", Config{})
		wantErr(t, err, "GPU 3", "exited at start", "An instance of this daemon is already running")
		checkNothingLeft(t, w, 3)
	})
	t.Run("daemon never ready", func(t *testing.T) {
		f := newFake()
		w := fakeWorld(t, f, false)
		_, err := w.m.Ensure(ctx, "3", Config{})
		wantErr(t, err, "GPU 3", "did not create", "/pipe/control within 200ms")
		if s := f.sent(); len(s) != 1 || !strings.HasSuffix(s[0], "terminated") {
			t.Errorf("signals %v", s)
		}
		checkNothingLeft(t, w, 3)
	})
	t.Run("a limit is refused", func(t *testing.T) {
		f := newFake()
		f.failCommand = "set_default_device_pinned_mem_limit"
		w := fakeWorld(t, f, true)
		_, err := w.m.Ensure(ctx, "3", Config{Limits: Limits{ActiveThreadPercentage: 20, PinnedMemoryMiB: 4096}})
		wantErr(t, err, "GPU 3", `"set_default_device_pinned_mem_limit 0 4096M"`, "An error occurred")
		checkNothingLeft(t, w, 3)
	})
	t.Run("the process cannot be started", func(t *testing.T) {
		w := newWorld(t, WithControlBinary("/nonexistent/nvidia-cuda-mps-control"))
		_, err := w.m.Ensure(ctx, "3", Config{})
		wantErr(t, err, "GPU 3", "starting /nonexistent/nvidia-cuda-mps-control")
		checkNothingLeft(t, w, 3)
	})
}

func checkNothingLeft(t *testing.T, w *world, gpu int) {
	t.Helper()
	p := w.m.PathsFor(w.gpu(gpu).UUID)
	if exists(p.State) || exists(p.PIDFile) {
		t.Error("state or PID file left")
	}
	if m := w.computeMode(gpu); m != nvmlib.ComputeModeDefault {
		t.Errorf("compute mode %s left", m)
	}
}
