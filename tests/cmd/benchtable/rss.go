package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tessera-gpu/tessera/plugin/kubelettest"
)

// measureDevicePlugin builds tessera-device-plugin, runs it on a simulated dgx-h100 (every GPU whole)
// against the kubelet stand-in, and returns the time from process start until the stand-in has all
// 8 GPUs healthy, and the daemon's largest RSS (VmRSS) sampled over the following 3 seconds, in MB
// (10⁶ bytes). note says why a figure is missing.
func measureDevicePlugin() (rssMB, startMs float64, note string) {
	rssMB, startMs = nan(), nan()
	dir, err := os.MkdirTemp("", "tb")
	if err != nil {
		return rssMB, startMs, err.Error()
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "tessera-device-plugin")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/tessera-device-plugin").CombinedOutput(); err != nil {
		return rssMB, startMs, fmt.Sprintf("build: %v: %s", err, out)
	}
	dp := filepath.Join(dir, "dp")
	if err := os.MkdirAll(dp, 0o755); err != nil {
		return rssMB, startMs, err.Error()
	}
	k, err := kubelettest.Start(dp)
	if err != nil {
		return rssMB, startMs, "kubelet stand-in: " + err.Error()
	}
	defer k.Stop()
	var logs bytes.Buffer
	cmd := exec.Command(bin, "--nvml=sim:dgx-h100", "--sim-state-dir="+filepath.Join(dir, "sim"), "--device-plugin-dir="+dp,
		"--cdi-dir="+filepath.Join(dir, "cdi"), "--mps-root="+filepath.Join(dir, "mps"), "--pod-resources-socket=none",
		"--mig-manager-dir="+filepath.Join(dir, "migm"))
	cmd.Stdout, cmd.Stderr = &logs, &logs
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return rssMB, startMs, err.Error()
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool {
		return len(s.Devices) == 8 && len(s.Healthy()) == 8
	}); err != nil {
		return rssMB, startMs, fmt.Sprintf("no 8 healthy GPUs at the kubelet stand-in: %v; log: %s", err, tail(logs.String()))
	}
	startMs = float64(time.Since(t0).Microseconds()) / 1e3
	var peak int64
	for range 7 {
		time.Sleep(500 * time.Millisecond)
		kb, err := vmRSS(cmd.Process.Pid)
		if err != nil {
			return rssMB, startMs, err.Error()
		}
		peak = max(peak, kb)
	}
	return float64(peak) * 1024 / 1e6, startMs, ""
}

// vmRSS reads a process's resident set size in kB from /proc/<pid>/status.
func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(string(b))
}

func parseVmRSS(status string) (int64, error) {
	for _, l := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS line")
}

func tail(s string) string {
	if len(s) > 600 {
		s = "…" + s[len(s)-600:]
	}
	return strings.ReplaceAll(s, "\n", " ")
}
