package profile

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/api"
)

// configMapDir writes files the way the kubelet updates a mounted ConfigMap: a new timestamped
// directory, a ..data symlink swapped atomically, and one symlink per key into ..data.
type configMapDir struct {
	t   *testing.T
	dir string
	gen int
}

func newConfigMapDir(t *testing.T, data map[string]string) *configMapDir {
	c := &configMapDir{t: t, dir: t.TempDir()}
	c.write(data)
	return c
}

func (c *configMapDir) write(data map[string]string) {
	c.t.Helper()
	c.gen++
	ts := fmt.Sprintf("..2026_01_01_00_00_%02d.%d", c.gen, c.gen)
	if err := os.Mkdir(filepath.Join(c.dir, ts), 0o755); err != nil {
		c.t.Fatal(err)
	}
	for k, v := range data {
		if err := os.WriteFile(filepath.Join(c.dir, ts, k), []byte(v), 0o644); err != nil {
			c.t.Fatal(err)
		}
	}
	tmp := filepath.Join(c.dir, "..data_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(ts, tmp); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.dir, "..data")); err != nil {
		c.t.Fatal(err)
	}
	entries, _ := os.ReadDir(c.dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			if _, ok := data[e.Name()]; !ok {
				_ = os.Remove(filepath.Join(c.dir, e.Name()))
			}
		}
	}
	for k := range data {
		link := filepath.Join(c.dir, k)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", k), link); err != nil {
			c.t.Fatal(err)
		}
	}
}

type fakeLabels struct {
	mu      sync.Mutex
	labels  map[string]string
	changed chan struct{}
}

func newFakeLabels(l map[string]string) *fakeLabels {
	return &fakeLabels{labels: l, changed: make(chan struct{}, 1)}
}

func (f *fakeLabels) Labels() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.labels
}

func (f *fakeLabels) Changed() <-chan struct{} { return f.changed }

func (f *fakeLabels) set(l map[string]string) {
	f.mu.Lock()
	f.labels = l
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

type fakeEvents struct {
	mu     sync.Mutex
	events []string
}

func (f *fakeEvents) Event(eventType, reason, message string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, eventType+" "+reason+" "+message)
}

func (f *fakeEvents) all() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.events...)
}

func gpus(n int) func(context.Context) ([]api.GPUInfo, error) {
	return func(context.Context) ([]api.GPUInfo, error) {
		var out []api.GPUInfo
		for i := range n {
			out = append(out, api.GPUInfo{Index: i, UUID: fmt.Sprintf("GPU-%08d", i), ProductName: "NVIDIA H100 80GB HBM3", MigCapable: true, MemoryMiB: 81559})
		}
		return out, nil
	}
}

const (
	whole = "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec: {defaults: {owner: device-plugin, mode: whole}}\n"
	ts4   = "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec: {defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 4}}}\n"
	bad   = "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec: {defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 1}}}\n"
	nvMPS = "version: v1\nsharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n"
)

func TestReloadKeepsLastGood(t *testing.T) {
	cm := newConfigMapDir(t, map[string]string{"default": whole, "ts": ts4, "mps": nvMPS})
	labels := newFakeLabels(nil)
	events := &fakeEvents{}
	w, err := NewWatcher(Options{Dir: cm.dir, Labels: labels, Events: events, GPUs: gpus(2)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cur, changed, err := w.Reload(ctx)
	if err != nil || !changed || cur.Selection.Name != "default" || cur.Resolution.Assignments[0].Mode != api.ModeWhole {
		t.Fatalf("first load: %+v %v %v", cur, changed, err)
	}
	if _, changed, _ := w.Reload(ctx); changed {
		t.Error("unchanged input reported as a change")
	}

	// A content edit is picked up (NVIDIA's sidecar only reacts to label changes).
	cm.write(map[string]string{"default": ts4, "ts": ts4, "mps": nvMPS})
	cur, changed, err = w.Reload(ctx)
	if err != nil || !changed || cur.Resolution.Assignments[0].Mode != api.ModeTimeSliced {
		t.Fatalf("edit: %+v %v %v", cur, changed, err)
	}

	// A bad edit is refused; the last good profile stays, with one Event naming the field.
	cm.write(map[string]string{"default": bad, "ts": ts4, "mps": nvMPS})
	cur, changed, err = w.Reload(ctx)
	if err == nil || changed || cur.Resolution.Assignments[0].Replicas != 4 {
		t.Fatalf("bad edit: %+v %v %v", cur, changed, err)
	}
	if !strings.Contains(err.Error(), "spec.defaults.timeSlicing.replicas") {
		t.Errorf("error does not name the field: %v", err)
	}
	if w.Current().Resolution.Assignments[0].Replicas != 4 || w.LastError() == nil {
		t.Error("last good profile not kept")
	}
	_, _, _ = w.Reload(ctx) // the same bad content is not reported again
	ev := events.all()
	rejected := 0
	for _, e := range ev {
		if strings.Contains(e, ReasonProfileRejected) {
			rejected++
			if !strings.HasPrefix(e, "Warning") || !strings.Contains(e, "spec.defaults.timeSlicing.replicas") || !strings.Contains(e, `keeping profile "default"`) {
				t.Errorf("event %q", e)
			}
		}
	}
	if rejected != 1 {
		t.Errorf("want 1 rejection event, got %v", ev)
	}

	// Our label selects a profile; NVIDIA's label is honoured when ours is absent.
	labels.set(map[string]string{api.NodeLabelNVIDIAConfig: "mps"})
	cur, changed, err = w.Reload(ctx)
	if err != nil || !changed || cur.Resolution.Assignments[1].Mode != api.ModeMPS || cur.Parsed.Format != api.FormatNVIDIA || cur.Selection.By != "nvidia.com/device-plugin.config=mps" {
		t.Fatalf("nvidia label: %+v %v %v", cur, changed, err)
	}
	labels.set(map[string]string{api.NodeLabelNVIDIAConfig: "mps", api.NodeLabelProfile: "ts"})
	cur, _, err = w.Reload(ctx)
	if err != nil || cur.Selection.Name != "ts" {
		t.Fatalf("tessera label: %+v %v", cur, err)
	}

	// A label naming a missing profile is refused too.
	labels.set(map[string]string{api.NodeLabelProfile: "nope"})
	cur, changed, err = w.Reload(ctx)
	if err == nil || changed || cur.Selection.Name != "ts" || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("missing profile: %+v %v %v", cur, changed, err)
	}
	// Accepted: first load, edit, NVIDIA label, our label; refused: the bad edit and the missing
	// profile (a repeat of the same bad input is not counted again).
	if ok, bad := w.Reloads(); ok != 4 || bad != 2 {
		t.Errorf("reloads accepted %d refused %d, want 4 and 2", ok, bad)
	}
}

func TestRunDeliversChanges(t *testing.T) {
	cm := newConfigMapDir(t, map[string]string{"only": whole})
	w, err := NewWatcher(Options{Dir: cm.dir, GPUs: gpus(1), Interval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan *Current, 10)
	done := make(chan error)
	go func() { done <- w.Run(ctx, func(c *Current) { got <- c }) }()
	first := <-got
	if first.Selection.By != "only profile" {
		t.Errorf("selection %+v", first.Selection)
	}
	cm.write(map[string]string{"only": bad})
	time.Sleep(50 * time.Millisecond)
	cm.write(map[string]string{"only": ts4})
	select {
	case c := <-got:
		if c.Resolution.Assignments[0].Mode != api.ModeTimeSliced {
			t.Errorf("got %+v", c.Resolution.Assignments[0])
		}
	case <-time.After(5 * time.Second):
		t.Fatal("change not delivered")
	}
	select {
	case c := <-got:
		t.Errorf("extra delivery %+v", c.Selection)
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Error(err)
	}
}

func TestGPUReadFailureIsRetried(t *testing.T) {
	cm := newConfigMapDir(t, map[string]string{"default": whole})
	fail := true
	w, _ := NewWatcher(Options{Dir: cm.dir, GPUs: func(ctx context.Context) ([]api.GPUInfo, error) {
		if fail {
			return nil, errors.New("NVML not ready")
		}
		return gpus(1)(ctx)
	}})
	if _, _, err := w.Reload(context.Background()); err == nil {
		t.Fatal("want error")
	}
	fail = false
	if cur, changed, err := w.Reload(context.Background()); err != nil || !changed || cur == nil {
		t.Fatalf("retry: %v %v", changed, err)
	}
}

func TestSelect(t *testing.T) {
	names := []string{"a", "default"}
	if s, err := Select(nil, names, ""); err != nil || s.Name != "default" {
		t.Errorf("%+v %v", s, err)
	}
	if _, err := Select(nil, []string{"a", "b"}, ""); err == nil || !strings.Contains(err.Error(), "label the node") {
		t.Errorf("want error, got %v", err)
	}
	if _, err := Select(nil, nil, ""); err == nil {
		t.Error("empty directory accepted")
	}
	// The only key is taken when none is named, never in place of a named (pinned) one.
	if s, err := Select(nil, []string{"default"}, ""); err != nil || s.Name != "default" {
		t.Errorf("only key: %+v %v", s, err)
	}
	if s, err := Select(nil, []string{"other"}, ""); err != nil || s.By != "only profile" {
		t.Errorf("only key, none named: %+v %v", s, err)
	}
	if s, err := Select(nil, []string{"default"}, "big"); err == nil {
		t.Errorf("pinned key %q missing, got %+v", "big", s)
	}
	cm := newConfigMapDir(t, map[string]string{"default": whole})
	w, err := NewWatcher(Options{Dir: cm.dir, DefaultProfile: "big", GPUs: gpus(1)})
	if err != nil {
		t.Fatal(err)
	}
	if cur, _, err := w.Reload(context.Background()); err == nil || cur != nil {
		t.Errorf("a watcher pinned to a missing key served %+v", cur)
	}
}

func TestNewWatcherNeedsOptions(t *testing.T) {
	if _, err := NewWatcher(Options{}); err == nil {
		t.Error("no dir accepted")
	}
	if _, err := NewWatcher(Options{Dir: "/x"}); err == nil {
		t.Error("no GPU source accepted")
	}
}

// A single profile file (--config-file) is read and its content watched; a bad edit keeps the last
// good profile.
func TestWatcherReadsOneFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(nvMPS), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := NewWatcher(Options{File: path, GPUs: gpus(2)})
	if err != nil {
		t.Fatal(err)
	}
	cur, changed, err := w.Reload(context.Background())
	if err != nil || !changed || cur.Parsed.Format != api.FormatNVIDIA || cur.Selection.Name != "config.yaml" {
		t.Fatalf("first load: %+v %v %v", cur, changed, err)
	}
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if cur2, changed, err := w.Reload(context.Background()); err == nil || changed || cur2 != cur {
		t.Fatalf("bad edit: changed=%v err=%v", changed, err)
	}
	if err := os.WriteFile(path, []byte(ts4), 0o644); err != nil {
		t.Fatal(err)
	}
	cur3, changed, err := w.Reload(context.Background())
	if err != nil || !changed || cur3.Resolution.Assignments[0].Replicas != 4 {
		t.Fatalf("good edit: %+v %v %v", cur3, changed, err)
	}
}
