//go:build linux

package mps

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

const gib = 1024 // MiB

func TestSplitUnequal(t *testing.T) {
	w := newWorld(t)
	h100 := w.gpu(0) // 81559 MiB, as NVML reports an H100 SXM5 80GB

	// 2 × 20 GiB + 4 × 10 GiB is 80 GiB = 81920 MiB: more than the "80 GB" GPU has. Said so, with
	// the field and the fix.
	tooBig := Split{
		{Count: 2, Limits: Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 * gib}},
		{Count: 4, Limits: Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 10 * gib}},
	}
	wantErr(t, tooBig.Validate(h100), "split:", "add up to 81920 MiB", "has 81559 MiB", "lower the limits or the counts")
	// It fits an H200 (143771 MiB as NVML reports it).
	if err := tooBig.Validate(nvmlib.GPU{ProductName: "NVIDIA H200", ComputeCapability: "9.0", MemoryMiB: 143771}); err != nil {
		t.Errorf("2 × 20 GiB + 4 × 10 GiB on an H200: %v", err)
	}

	s := Split{
		{Count: 2, Limits: Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 * gib}},
		{Count: 4, Limits: Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 9 * gib}},
	}
	if err := s.Validate(h100); err != nil {
		t.Fatal(err)
	}
	if c := s.Clients(); len(c) != 6 || c[0].PinnedMemoryMiB != 20*gib || c[5].PinnedMemoryMiB != 9*gib {
		t.Errorf("clients %+v", c)
	}
	if c := s.Ceiling(); c != (Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 * gib}) {
		t.Errorf("ceiling %+v", c)
	}
	if s.Uniform() {
		t.Error("an unequal split is uniform")
	}
	// A client without a memory limit of its own leaves the daemon without one.
	if c := append(Split{{Limits: Limits{ActiveThreadPercentage: 5}}}, s...).Ceiling(); c != (Limits{ActiveThreadPercentage: 30}) {
		t.Errorf("ceiling with an unlimited client %+v", c)
	}

	eq := EqualSplit(4, h100.MemoryMiB)
	if err := eq.Validate(h100); err != nil || !eq.Uniform() || eq.Ceiling() != (Limits{ActiveThreadPercentage: 25, PinnedMemoryMiB: 20389}) {
		t.Errorf("equal split %+v: %v", eq, err)
	}
	if EqualSplit(0, 100) != nil {
		t.Error("EqualSplit(0)")
	}
}

func TestSplitErrorsNameTheField(t *testing.T) {
	w := newWorld(t)
	h100 := w.gpu(0)
	for _, tc := range []struct {
		s    Split
		want []string
	}{
		{nil, []string{"split: no clients", "EqualSplit(2, 81559)"}},
		{Split{{Count: -1}}, []string{"split[0].count", "negative"}},
		{Split{{}, {Limits: Limits{ActiveThreadPercentage: 120}}}, []string{"split[1].activeThreadPercentage", "1 to 100"}},
		{Split{{Limits: Limits{PinnedMemoryMiB: 90 * gib}}}, []string{"split[0].pinnedMemoryMiB", "92160 MiB is more than GPU 0", "81559 MiB"}},
		{Split{{Count: 30}, {Count: 19}}, []string{"49 clients", "at most 48"}},
	} {
		wantErr(t, tc.s.Validate(h100), tc.want...)
	}
	p100 := nvmlib.GPU{Index: 1, ProductName: "Tesla P100", UUID: "GPU-p", ComputeCapability: "6.0", MemoryMiB: 16280}
	wantErr(t, EqualSplit(2, 16280).Validate(p100), "split[0]", "compute capability 6.0", "Volta or newer")
}

func TestEnforce(t *testing.T) {
	for _, tc := range []struct {
		daemon, own Limits
		want        Enforcement
	}{
		// Nothing limited.
		{Limits{}, Limits{}, Enforcement{Memory: LevelNone, Compute: LevelNone, ActiveThreadPercentage: 100, ThreadCeiling: 100, Faults: LevelNone}},
		// The daemon's limit is the client's: server-side.
		{Limits{25, 20 * gib}, Limits{25, 20 * gib}, Enforcement{LevelServerSide, 20 * gib, 20 * gib, LevelServerSide, 25, 25, LevelNone}},
		{Limits{25, 20 * gib}, Limits{}, Enforcement{LevelServerSide, 20 * gib, 20 * gib, LevelServerSide, 25, 25, LevelNone}},
		// Below the daemon's limit: cooperative, escapable up to the daemon's.
		{Limits{30, 20 * gib}, Limits{10, 9 * gib}, Enforcement{LevelCooperative, 9 * gib, 20 * gib, LevelCooperative, 10, 30, LevelNone}},
		// No daemon limit: cooperative, escapable to the whole GPU.
		{Limits{}, Limits{10, 9 * gib}, Enforcement{LevelCooperative, 9 * gib, 0, LevelCooperative, 10, 100, LevelNone}},
		// Above the daemon's: the daemon's holds (AddClient refuses this).
		{Limits{10, gib}, Limits{50, 2 * gib}, Enforcement{LevelServerSide, gib, gib, LevelServerSide, 10, 10, LevelNone}},
	} {
		if got := Enforce(tc.daemon, tc.own); got != tc.want {
			t.Errorf("Enforce(%+v, %+v) = %+v, want %+v", tc.daemon, tc.own, got, tc.want)
		}
	}
}

// Each isolation level docs/sharing.md gives MPS is checked here against what a container is given:
// its environment, its mounts, and the limits the daemon recorded.
func TestClientsGetWhatTheirLevelSays(t *testing.T) {
	w := newWorld(t)
	g := w.gpu(0)
	split := Split{
		{Count: 2, Limits: Limits{ActiveThreadPercentage: 30, PinnedMemoryMiB: 20 * gib}},
		{Count: 4, Limits: Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 9 * gib}},
	}
	if err := split.Validate(g); err != nil {
		t.Fatal(err)
	}
	d := w.ensure("0", Config{Limits: split.Ceiling()})
	p := d.Paths()
	// Server-side: the daemon was told the ceiling, for every client.
	want := []string{"set_default_active_thread_percentage 30", "set_default_device_pinned_mem_limit 0 20480M"}
	if got := w.commands(p.Pipe); !equal(got, want) {
		t.Errorf("daemon limits %q, want %q", got, want)
	}
	ctx := context.Background()
	var clients []Client
	for i, l := range split.Clients() {
		c, err := d.AddClient(ctx, g.UUID+"::"+string(rune('0'+i)), l)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	big, small := clients[0], clients[5]
	// A 20 GiB client: its limits are the daemon's, so they are server-side; its variables repeat them.
	if !mapsEqual(big.Env, map[string]string{EnvPipeDirectory: ClientPipeDir, EnvActiveThreadPercentage: "30", EnvPinnedDeviceMemLimit: "0=20480M"}) {
		t.Errorf("20 GiB client env %v", big.Env)
	}
	if e := big.Enforcement; e.Memory != LevelServerSide || e.Compute != LevelServerSide || e.Faults != LevelNone {
		t.Errorf("20 GiB client enforcement %+v", e)
	}
	// A 9 GiB client: its own limits are cooperative; dropping its variables gets it the daemon's.
	if !mapsEqual(small.Env, map[string]string{EnvPipeDirectory: ClientPipeDir, EnvActiveThreadPercentage: "10", EnvPinnedDeviceMemLimit: "0=9216M"}) {
		t.Errorf("9 GiB client env %v", small.Env)
	}
	if e := small.Enforcement; e.Memory != LevelCooperative || e.MemoryLimitMiB != 9*gib || e.MemoryCeilingMiB != 20*gib ||
		e.Compute != LevelCooperative || e.ActiveThreadPercentage != 10 || e.ThreadCeiling != 30 || e.Faults != LevelNone {
		t.Errorf("9 GiB client enforcement %+v", e)
	}
	// Every client sees the pipe directory read-only and shares the daemons' /dev/shm; nothing
	// else: no log directory, no CUDA_VISIBLE_DEVICES (MPS renumbers the GPU as device 0).
	wantMounts := []Mount{{HostPath: p.Pipe, ContainerPath: "/tmp/nvidia-mps", ReadOnly: true}, {HostPath: filepath.Join(w.root, "shm"), ContainerPath: "/dev/shm"}}
	for _, c := range clients {
		if !equal(c.Mounts, wantMounts) {
			t.Errorf("client %s mounts %+v", c.ID, c.Mounts)
		}
		for k := range c.Env {
			if k == EnvVisibleDevices || k == EnvLogDirectory {
				t.Errorf("client %s gets %s", c.ID, k)
			}
		}
	}
	if fi, err := os.Stat(filepath.Join(w.root, "shm")); err != nil || fi.Mode()&os.ModeSticky == 0 || fi.Mode().Perm() != 0o777 {
		t.Errorf("shm directory: %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(p.Pipe); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("pipe directory: %v", err)
	}
	// No limits at all: nothing is enforced.
	d3 := w.ensure("3", Config{})
	none, err := d3.AddClient(ctx, "free", Limits{})
	if err != nil || none.Enforcement.Memory != LevelNone || none.Enforcement.Compute != LevelNone || len(none.Env) != 1 {
		t.Errorf("unlimited client %+v %v", none, err)
	}

	// The clients are on disk: a restarted plugin sees them.
	a, err := w.manager().Attach(ctx, "0")
	if err != nil {
		t.Fatal(err)
	}
	if got := a.Clients(); len(got) != 6 || got[0].ID != clients[0].ID || !mapsEqual(got[5].Env, small.Env) {
		t.Errorf("clients after restart %+v", got)
	}
	// Same ID and limits again: the same client. Other limits under the same ID: refused.
	if c, err := a.AddClient(ctx, clients[1].ID, clients[1].Limits); err != nil || c.ID != clients[1].ID {
		t.Errorf("re-adding a client: %v", err)
	}
	_, err = a.AddClient(ctx, clients[1].ID, Limits{PinnedMemoryMiB: gib})
	wantErr(t, err, "is registered with", "remove it first")
	// Above the daemon's limit: could not take effect.
	_, err = a.AddClient(ctx, "big", Limits{PinnedMemoryMiB: 30 * gib})
	wantErr(t, err, `client "big"`, "above the daemon's limit of 20480 MiB", "SetLimits")
	// Past the GPU's memory: 76 GiB handed out, 9 more do not fit.
	_, err = a.AddClient(ctx, "one-more", Limits{PinnedMemoryMiB: 9 * gib})
	wantErr(t, err, "add up to 87040 MiB", "81559 MiB")
	// Lowering the daemon's limit under a client's: refused.
	wantErr(t, a.SetLimits(ctx, Limits{PinnedMemoryMiB: 10 * gib}), "client GPU-", "remove the client first")

	// Stop refuses while clients are registered, unless forced.
	wantErr(t, w.m.Stop(ctx, "0", StopOptions{}), "still has 6 client(s)", "remove them first")
	for _, c := range clients[:5] {
		if err := a.RemoveClient(ctx, c.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.RemoveClient(ctx, "unknown"); err != nil {
		t.Error(err)
	}
	if got := a.Clients(); len(got) != 1 || got[0].ID != clients[5].ID {
		t.Errorf("clients after removal %+v", got)
	}
	if err := w.m.Stop(ctx, "0", StopOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	// A Daemon whose daemon was stopped says so.
	_, err = a.AddClient(ctx, "late", Limits{})
	if !errors.Is(err, ErrNotRunning) {
		t.Errorf("AddClient after stop: %v", err)
	}
}

func equal[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestLimitsString(t *testing.T) {
	if s := (Limits{}).String(); s != "no limits" {
		t.Error(s)
	}
	if s := (Limits{ActiveThreadPercentage: 10, PinnedMemoryMiB: 512}).String(); !strings.Contains(s, "10%") || !strings.Contains(s, "512 MiB") {
		t.Error(s)
	}
}
