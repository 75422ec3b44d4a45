package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/tessera-gpu/tessera/plugin"
	"github.com/tessera-gpu/tessera/plugin/kubelettest"
)

// NVIDIA's time-slicing example with 4 replicas, as its documentation gives it.
const nvidiaTimeSlicing4 = `version: v1
flags:
  migStrategy: none
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
`

func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "tdpc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startBinary runs the command's run() with command-line arguments until the returned stop.
func startBinary(t *testing.T, args ...string) (*plugin.Plugin, func()) {
	t.Helper()
	var o options
	fs := pflag.NewFlagSet(component, pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan *plugin.Plugin, 1)
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, o, func(p *plugin.Plugin) { started <- p }) }()
	select {
	case p := <-started:
		stopped := false
		stop := func() {
			if !stopped {
				stopped = true
				cancel()
				if err := <-errc; err != nil {
					t.Errorf("run: %v", err)
				}
			}
		}
		t.Cleanup(stop)
		return p, stop
	case err := <-errc:
		cancel()
		t.Fatalf("run: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("the plugin did not start")
	}
	return nil, nil
}

// The done-when: tessera-device-plugin --nvml=sim:dgx-h100 with NVIDIA's time-slicing config
// of 4 replicas advertises 32 nvidia.com/gpu to a kubelet. A restarted plugin advertises the same IDs.
func TestTimeSlicingConfigAdvertises32GPUs(t *testing.T) {
	root := shortDir(t)
	dir := filepath.Join(root, "device-plugins")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := kubelettest.Start(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Stop()
	cfg := filepath.Join(root, "config.yaml")
	if err := os.WriteFile(cfg, []byte(nvidiaTimeSlicing4), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--nvml=sim:dgx-h100", "--sim-state-dir=" + filepath.Join(root, "sim"), "--config-file=" + cfg,
		"--device-plugin-dir=" + dir, "--cdi-dir=" + filepath.Join(root, "cdi"), "--mps-root=" + filepath.Join(root, "mps"),
		"--metrics-address=127.0.0.1:0", "--pod-resources-socket=none"}
	_, stop := startBinary(t, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool { return len(s.Healthy()) == 32 })
	if err != nil {
		t.Fatal(err)
	}
	first := s.IDs()
	for _, id := range first {
		if !strings.HasPrefix(id, "GPU-") || !strings.Contains(id, "::") {
			t.Fatalf("device ID %q is not <uuid>::<replica>", id)
		}
	}
	if got := k.Resources(); !slices.Equal(got, []string{"nvidia.com/gpu"}) {
		t.Errorf("resources %v, want only nvidia.com/gpu", got)
	}
	if _, err := os.Stat(filepath.Join(root, "cdi", "tessera.dev-gpu.json")); err != nil {
		t.Errorf("no CDI node spec: %v", err)
	}

	stop()
	if err := k.WaitFor(ctx, func(k *kubelettest.Kubelet) bool { return len(k.Connected()) == 0 }); err != nil {
		t.Fatalf("the stopped plugin's stream did not end: %v", err)
	}
	startBinary(t, args...)
	s, err = k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool { return len(s.Healthy()) == 32 && s.Registrations == 2 })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(s.IDs(), first) {
		t.Errorf("a restarted plugin advertised other IDs:\n%v\nwant\n%v", s.IDs(), first)
	}
}

// Metrics name what is served.
func TestMetrics(t *testing.T) {
	root := shortDir(t)
	dir := filepath.Join(root, "dp")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := kubelettest.Start(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Stop()
	port := "127.0.0.1:19431"
	startBinary(t, "--nvml=sim:dgx-h100", "--sim-state-dir="+filepath.Join(root, "sim"), "--device-plugin-dir="+dir,
		"--cdi-dir="+filepath.Join(root, "cdi"), "--metrics-address="+port, "--pod-resources-socket=none")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	snap, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool { return len(s.Healthy()) == 8 })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Allocate(ctx, "nvidia.com/gpu", snap.IDs()[0]); err != nil {
		t.Fatal(err)
	}
	wants := []string{
		`tessera_device_plugin_devices{resource="nvidia.com/gpu",health="healthy"} 8`,
		`tessera_device_plugin_registrations_total{resource="nvidia.com/gpu"} 1`,
		`tessera_device_plugin_pending_gpus 0`,
		`tessera_device_plugin_allocate_seconds_count{resource="nvidia.com/gpu"} 1`,
		`tessera_device_plugin_allocate_seconds_bucket{resource="nvidia.com/gpu",le="+Inf"} 1`,
		// GPU telemetry, sampled at start, for the GPUs the plugin serves.
		`tessera_gpu_readable{component="device-plugin",gpu="7",model="NVIDIA H100 80GB HBM3",uuid="GPU-`,
		`tessera_device_allocated{claim="",component="device-plugin",device="` + snap.IDs()[0] + `",gpu=`,
		`tessera_telemetry_samples_total{component="device-plugin"}`,
		`tessera_gpu_last_xid{component="device-plugin",gpu="0"`,
	}
	var body []byte
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get("http://" + port + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		missing := 0
		for _, want := range wants {
			if !strings.Contains(string(body), want) {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, want := range wants {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s:\n%s", want, body)
		}
	}
}

// --config-file may be a directory of profiles (a mounted ConfigMap): without labels the key
// "default" is used, and an edit of its content changes what is advertised, without a new
// registration.
func TestConfigDirectoryFollowsEdits(t *testing.T) {
	root := shortDir(t)
	dir := filepath.Join(root, "dp")
	profiles := filepath.Join(root, "profiles")
	for _, d := range []string{dir, profiles} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string) {
		tmp := filepath.Join(profiles, "."+name+".tmp")
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(profiles, name)); err != nil {
			t.Fatal(err)
		}
	}
	write("default", nvidiaTimeSlicing4)
	write("other", "version: v1\n")
	k, err := kubelettest.Start(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Stop()
	startBinary(t, "--nvml=sim:dgx-h100", "--sim-state-dir="+filepath.Join(root, "sim"), "--config-file="+profiles,
		"--device-plugin-dir="+dir, "--cdi-dir="+filepath.Join(root, "cdi"), "--pod-resources-socket=none", "--config-poll-interval=50ms")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool { return len(s.Healthy()) == 32 }); err != nil {
		t.Fatal(err)
	}
	write("default", strings.Replace(nvidiaTimeSlicing4, "replicas: 4", "replicas: 3", 1))
	s, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool { return len(s.Healthy()) == 24 })
	if err != nil {
		t.Fatal(err)
	}
	if s.Registrations != 1 {
		t.Errorf("a content edit re-registered the resource (%d registrations)", s.Registrations)
	}
}

// failOnInitError: without a driver the plugin exits with the error by default, and with
// failOnInitError: false it waits (serving nothing) until it is stopped.
func TestFailOnInitError(t *testing.T) {
	dir := shortDir(t)
	parse := func(args ...string) options {
		var o options
		fs := pflag.NewFlagSet(component, pflag.ContinueOnError)
		o.addFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return o
	}
	err := run(context.Background(), parse("--nvml=real", "--device-plugin-dir", dir), nil)
	if err == nil {
		t.Skip("this machine has an NVIDIA driver")
	}
	if !strings.Contains(err.Error(), "--nvml=sim:") {
		t.Fatalf("error %v: want the one-line hint about simulated nodes", err)
	}
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte("version: v1\nflags:\n  failOnInitError: false\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, parse("--nvml=real", "--device-plugin-dir", dir, "--config-file", cfg), nil) }()
	select {
	case err := <-errc:
		t.Fatalf("with failOnInitError: false the plugin returned at once: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("stopped plugin: %v", err)
	}
}
