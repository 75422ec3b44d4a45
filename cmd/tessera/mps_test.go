package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/partitioning/mps"
)

func runCtx(ctx context.Context, args ...string) (string, error) {
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func mpsArgs(t *testing.T) []string {
	t.Helper()
	// A short root: MPS socket paths are limited to 107 bytes.
	root, err := os.MkdirTemp("", "mps")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--nvml=sim:dgx-h100", "--sim-state-dir", t.TempDir(), "mps", "--mps-root", root}
	t.Cleanup(func() {
		_, _ = runCtx(context.Background(), append(args, "stop", "all", "--force")...)
		os.RemoveAll(root)
	})
	return args
}

func TestMPSStartStatusStop(t *testing.T) {
	args := mpsArgs(t)
	out, err := run(t, append(args, "start", "0", "3", "--thread-percentage", "50", "--pinned-memory", "20Gi", "--multi-user")...)
	if err != nil {
		t.Fatalf("start: %v\n%s", err, out)
	}
	if strings.Count(out, "MPS daemon started") != 2 || !strings.Contains(out, "50% of threads, 20480 MiB") {
		t.Errorf("start printed %q", out)
	}
	out, err = run(t, append(args, "start", "0", "--thread-percentage", "50", "--pinned-memory", "20Gi", "--multi-user")...)
	if err != nil || !strings.Contains(out, "already running") {
		t.Errorf("second start: %v %q", err, out)
	}
	out, err = run(t, append(args, "status", "-o", "json")...)
	if err != nil {
		t.Fatal(err)
	}
	var st []mps.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(st) != 2 || st[0].GPUIndex != 0 || st[1].GPUIndex != 3 || !st[0].Running || !st[1].MultiUser ||
		st[0].Limits != (mps.Limits{ActiveThreadPercentage: 50, PinnedMemoryMiB: 20480}) {
		t.Errorf("status %+v", st)
	}
	if _, err := run(t, append(args, "stop", "0", "3")...); err != nil {
		t.Fatal(err)
	}
	out, err = run(t, append(args, "status")...)
	if err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Errorf("status after stop: %v %q", err, out)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"start", "1", "--pinned-memory", "1.5Mi"}, "whole MiB"},
		{[]string{"start", "1", "--pinned-memory", "-1Gi"}, "positive quantity"},
		{[]string{"start", "1", "--thread-percentage", "150"}, "1 to 100"},
		{[]string{"start", "GPU-nope"}, `no GPU "GPU-nope"`},
		{[]string{"status", "-o", "yaml"}, "use table or json"},
	} {
		if _, err := run(t, append(args, tc.args...)...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestMPSRunStopsOnSignal(t *testing.T) {
	args := mpsArgs(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := runCtx(ctx, append(args, "run", "2", "--thread-percentage", "25")...)
		done <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := run(t, append(args, "status", "-o", "json")...)
		var st []mps.Status
		if json.Unmarshal([]byte(out), &st) == nil && len(st) == 1 && st[0].Running && st[0].Limits.ActiveThreadPercentage == 25 {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("run did not start the daemon: %s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
	out, _ := run(t, append(args, "status", "-o", "json")...)
	if strings.TrimSpace(out) != "[]" {
		t.Errorf("daemon left after run: %s", out)
	}
}
