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

	"golang.org/x/sys/unix"

	"github.com/tessera-gpu/tessera/plugin/kubelettest"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// measureDevicePlugin builds tessera-device-plugin, runs it on a simulated dgx-h100 (every GPU whole)
// against the kubelet stand-in, and returns the time from process start until the stand-in has all
// 8 GPUs healthy, and the daemon's largest RSS (VmRSS) sampled over the following 3 seconds, in MB
// (10⁶ bytes), with its anonymous and file-backed parts (RssAnon, RssFile) at that sample. note
// says why a figure is missing.
//
// The binary is written back and dropped from the page cache before it runs, so that it is read
// from disk as an installed binary is. Run straight after the build, its pages are still the large
// (dirty) folios the linker's writes left in the page cache, and the kernel maps whole folios on
// each fault: the file-backed RSS is then most of the 75 MB executable (about 50 MB instead of about
// 30), whatever the daemon touches.
func measureDevicePlugin() (rssMB, anonMB, fileMB, startMs float64, note string) {
	rssMB, anonMB, fileMB, startMs = nan(), nan(), nan(), nan()
	dir, err := os.MkdirTemp("", "tb")
	if err != nil {
		return rssMB, anonMB, fileMB, startMs, err.Error()
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "tessera-device-plugin")
	if out, err := exec.Command("go", "build", "-tags", harness.BuildTags, "-o", bin, "./cmd/tessera-device-plugin").CombinedOutput(); err != nil {
		return rssMB, anonMB, fileMB, startMs, fmt.Sprintf("build: %v: %s", err, out)
	}
	if err := dropFromPageCache(bin); err != nil {
		return rssMB, anonMB, fileMB, startMs, err.Error()
	}
	dp := filepath.Join(dir, "dp")
	if err := os.MkdirAll(dp, 0o755); err != nil {
		return rssMB, anonMB, fileMB, startMs, err.Error()
	}
	k, err := kubelettest.Start(dp)
	if err != nil {
		return rssMB, anonMB, fileMB, startMs, "kubelet stand-in: " + err.Error()
	}
	defer k.Stop()
	var logs bytes.Buffer
	cmd := exec.Command(bin, "--nvml=sim:dgx-h100", "--sim-state-dir="+filepath.Join(dir, "sim"), "--device-plugin-dir="+dp,
		"--cdi-dir="+filepath.Join(dir, "cdi"), "--mps-root="+filepath.Join(dir, "mps"), "--pod-resources-socket=none",
		"--mig-manager-dir="+filepath.Join(dir, "migm"))
	cmd.Stdout, cmd.Stderr = &logs, &logs
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return rssMB, anonMB, fileMB, startMs, err.Error()
	}
	defer stop(cmd)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := k.WaitForResource(ctx, "nvidia.com/gpu", func(s kubelettest.Snapshot) bool {
		return len(s.Devices) == 8 && len(s.Healthy()) == 8
	}); err != nil {
		return rssMB, anonMB, fileMB, startMs, fmt.Sprintf("no 8 healthy GPUs at the kubelet stand-in: %v; log: %s", err, tail(logs.String()))
	}
	startMs = float64(time.Since(t0).Microseconds()) / 1e3
	rssMB, anonMB, fileMB, err = peakRSS(cmd.Process.Pid, 7, 500*time.Millisecond)
	if err != nil {
		return nan(), nan(), nan(), startMs, err.Error()
	}
	return rssMB, anonMB, fileMB, startMs, ""
}

// peakRSS samples a process's VmRSS n times, every interval, and returns the largest with its
// anonymous and file-backed parts, in MB (10⁶ bytes).
func peakRSS(pid, n int, interval time.Duration) (rss, anon, file float64, err error) {
	var peak, a, f int64
	for range n {
		time.Sleep(interval)
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return 0, 0, 0, err
		}
		kb, err := parseStatusKB(string(b), "VmRSS")
		if err != nil {
			return 0, 0, 0, err
		}
		if kb > peak {
			peak = kb
			a, _ = parseStatusKB(string(b), "RssAnon")
			f, _ = parseStatusKB(string(b), "RssFile")
		}
	}
	mb := func(kb int64) float64 { return float64(kb) * 1024 / 1e6 }
	return mb(peak), mb(a), mb(f), nil
}

// stop ends a started daemon: SIGTERM, then SIGKILL after 10 seconds.
func stop(cmd *exec.Cmd) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// dropFromPageCache writes a file back to disk and asks the kernel to drop its cached pages.
func dropFromPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return err
	}
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// parseStatusKB reads a "<key>: <n> kB" line of /proc/<pid>/status.
func parseStatusKB(status, key string) (int64, error) {
	for _, l := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s line", key)
}

func tail(s string) string {
	if len(s) > 600 {
		s = "…" + s[len(s)-600:]
	}
	return strings.ReplaceAll(s, "\n", " ")
}
