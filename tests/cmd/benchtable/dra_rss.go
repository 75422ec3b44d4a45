package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/telemetry/startup"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// draResult is the DRA kubelet plugin's figures on the local cluster.
type draResult struct {
	rssMB, anonMB, fileMB, sliceMs float64
	// Where the time to the slices went: process start to main (mainMs), then the daemon's own
	// start-up phases (its "Started" log line).
	mainMs float64
	phases []startup.Phase
	note   string
}

// measureDRAPlugin runs tessera-kubelet-plugin for the local cluster's node (a real API server and
// kubelet) on a simulated dgx-h100, every GPU the driver's and whole, and returns the time from
// process start until its 8 devices are in the API server's ResourceSlices, and its largest RSS over
// the following 3 seconds. It uses the cluster `make demo` runs when it is up, else starts one from
// the cached binaries (and stops it after); without cached binaries it measures nothing and says
// how to get them, since building them takes minutes.
func measureDRAPlugin() draResult {
	res := draResult{rssMB: nan(), anonMB: nan(), fileMB: nan(), sliceMs: nan()}
	if res.note = clusterBinariesCached(); res.note != "" {
		return res
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	wasUp := harness.Running(harness.DefaultStateDir())
	c, err := harness.Start(ctx, harness.Options{Log: io.Discard, NoSignalHandler: true})
	if err != nil {
		res.note = "local cluster: " + err.Error()
		return res
	}
	if !wasUp {
		defer c.Stop()
	}
	dir, err := os.MkdirTemp("", "tb-dra")
	if err != nil {
		res.note = err.Error()
		return res
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "tessera-kubelet-plugin")
	if out, err := exec.Command("go", "build", "-tags", harness.BuildTags, "-o", bin, "./cmd/tessera-kubelet-plugin").CombinedOutput(); err != nil {
		res.note = fmt.Sprintf("build: %v: %s", err, out)
		return res
	}
	if err := dropFromPageCache(bin); err != nil {
		res.note = err.Error()
		return res
	}
	slices := c.Client().ResourceV1().ResourceSlices()
	clean := func() {
		list, err := slices.List(context.Background(), metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err == nil {
			for _, s := range list.Items {
				_ = slices.Delete(context.Background(), s.Name, metav1.DeleteOptions{})
			}
		}
	}
	clean()
	defer clean()
	var logs syncBuffer
	cmd := exec.Command(bin, "--nvml=sim:dgx-h100", "--sim-state-dir="+filepath.Join(dir, "sim"),
		"--kubeconfig="+c.PluginKubeconfig, "--node-name="+c.NodeName,
		"--kubelet-registry-dir="+c.PluginRegistryDir, "--kubelet-plugins-dir="+c.PluginsDir,
		"--cdi-dir="+filepath.Join(dir, "cdi"), "--state-dir="+filepath.Join(dir, "state"), "--mps-root="+filepath.Join(dir, "mps"))
	cmd.Stdout, cmd.Stderr = &logs, &logs
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		res.note = err.Error()
		return res
	}
	defer stop(cmd)
	err = harness.Poll(ctx, 10*time.Millisecond, func(ctx context.Context) (bool, error) {
		list, err := slices.List(ctx, metav1.ListOptions{FieldSelector: "spec.driver=" + dra.DriverName})
		if err != nil {
			return false, err
		}
		n := 0
		for _, s := range list.Items {
			if s.Spec.NodeName != nil && *s.Spec.NodeName == c.NodeName {
				n += len(s.Spec.Devices)
			}
		}
		return n == 8, nil
	})
	if err != nil {
		res.note = fmt.Sprintf("no 8 devices in ResourceSlices: %v; log: %s", err, tail(logs.String()))
		return res
	}
	res.sliceMs = float64(time.Since(t0).Microseconds()) / 1e3
	if err := harness.Poll(ctx, 10*time.Millisecond, func(context.Context) (bool, error) {
		return strings.Contains(logs.String(), `"Started"`), nil
	}); err == nil {
		res.mainMs, res.phases, err = startedLine(logs.String(), t0)
		if err != nil {
			res.note = err.Error()
		}
	}
	peak, anon, file, err := peakRSS(cmd.Process.Pid, 6, 500*time.Millisecond)
	if err != nil {
		res.note = err.Error()
		return res
	}
	res.rssMB, res.anonMB, res.fileMB = peak, anon, file
	return res
}

var (
	mainStartedRE = regexp.MustCompile(`"Started".* mainStarted="([^"]+)"`)
	phasesRE      = regexp.MustCompile(`"Started".* phases="([^"]*)"`)
)

// startedLine reads the daemon's "Started" log line: the time from t0 (the process's start) to its
// main, and its start-up phases.
func startedLine(logs string, t0 time.Time) (float64, []startup.Phase, error) {
	m, p := mainStartedRE.FindStringSubmatch(logs), phasesRE.FindStringSubmatch(logs)
	if m == nil || p == nil {
		return 0, nil, fmt.Errorf("no start-up phases in the log: %s", tail(logs))
	}
	at, err := time.Parse(time.RFC3339Nano, m[1])
	if err != nil {
		return 0, nil, fmt.Errorf("start-up log line: mainStarted: %w", err)
	}
	phases, err := startup.Parse(p[1])
	if err != nil {
		return 0, nil, err
	}
	return float64(at.Sub(t0).Microseconds()) / 1e3, phases, nil
}

// syncBuffer is a bytes.Buffer a child process's output goroutines write while we read it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
