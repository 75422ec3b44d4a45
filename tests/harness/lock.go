package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// DefaultLockPath is the machine-wide lock that e2e runs hold for the life of their cluster: two
// clusters cannot share the default ports, the kubelet's fixed device-plugin path or the
// kubepods cgroups, so concurrent `go test -tags e2e` runs (several engineers on one machine)
// take turns instead of tearing each other's cluster down.
func DefaultLockPath() string {
	if st, err := os.Stat("/run/lock"); err == nil && st.IsDir() {
		return "/run/lock/tessera-localcluster.lock"
	}
	return filepath.Join(os.TempDir(), "tessera-localcluster.lock")
}

// AcquireLock takes an exclusive flock on path, waiting (and saying so on log, every 30s) while
// another process holds it, until ctx ends. The lock is held until the returned file is closed
// and every process that inherited it (see StartReaper) has exited.
func AcquireLock(ctx context.Context, path, holder string, log io.Writer) (*os.File, error) {
	if log == nil {
		log = os.Stderr
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	var lastSaid time.Time
	start := time.Now()
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Since(lastSaid) > 30*time.Second {
			data, _ := os.ReadFile(path)
			fmt.Fprintf(log, "[harness] waiting for %s, held by: %s (waited %s)\n", path,
				strings.TrimSpace(string(data)), time.Since(start).Round(time.Second))
			lastSaid = time.Now()
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(fmt.Sprintf("pid %d, %s, since %s\n", os.Getpid(), holder, time.Now().Format(time.RFC3339))), 0)
	return f, nil
}
