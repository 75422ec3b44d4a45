//go:build linux

package mps

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// OSProcesses runs real processes and reads /proc.
type OSProcesses struct{}

var _ Processes = OSProcesses{}

// Start implements Processes. The child is reaped by a goroutine of this process for as long as
// this process lives; once this process is gone, the child is re-parented and keeps running.
func (OSProcesses) Start(argv, env []string, output string) (int, error) {
	if len(argv) == 0 {
		return 0, errors.New("no command to start")
	}
	out, err := os.OpenFile(output, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout = out
	cmd.Stderr = out
	// A session of its own: no controlling terminal, its own process group, nothing the caller's
	// group receives (Ctrl-C on a CLI, a signal to the plugin's group) reaches it. No parent-death
	// signal: the daemon is meant to outlive the process that started it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	go func() { _ = cmd.Wait() }()
	return cmd.Process.Pid, nil
}

// Run implements Processes.
func (OSProcesses) Run(ctx context.Context, argv, env []string, stdin string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("no command to run")
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	text := out.String()
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		if t := strings.TrimSpace(text); t != "" {
			return text, fmt.Errorf("%w: %s", err, t)
		}
		return text, err
	}
	return text, nil
}

// Lookup implements Processes from /proc/<pid>/{stat,cmdline,environ}.
func (OSProcesses) Lookup(pid int) (ProcInfo, bool, error) {
	if pid <= 0 {
		return ProcInfo{}, false, nil
	}
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return ProcInfo{}, false, nil
	}
	if err != nil {
		return ProcInfo{}, false, err
	}
	state, ticks, err := parseStat(stat)
	if err != nil {
		return ProcInfo{}, false, fmt.Errorf("%s/stat: %w", dir, err)
	}
	if state == "Z" || state == "X" || state == "x" {
		return ProcInfo{}, false, nil
	}
	info := ProcInfo{PID: pid, StartTicks: ticks}
	if data, err := os.ReadFile(dir + "/cmdline"); err == nil {
		info.Args = splitNUL(data)
	}
	if data, err := os.ReadFile(dir + "/environ"); err == nil {
		info.Env = splitNUL(data)
		if info.Env == nil {
			info.Env = []string{}
		}
	}
	return info, true, nil
}

// Signal implements Processes.
func (OSProcesses) Signal(pid int, sig syscall.Signal) error {
	if pid <= 0 {
		return fmt.Errorf("no process %d", pid)
	}
	err := syscall.Kill(-pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		err = syscall.Kill(pid, sig)
	}
	return err
}

// parseStat returns the state (field 3) and start time (field 22) of a /proc/<pid>/stat line. The
// command name (field 2) is in parentheses and may itself contain spaces and parentheses.
func parseStat(data []byte) (string, uint64, error) {
	s := string(data)
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return "", 0, fmt.Errorf("malformed stat %q", s)
	}
	f := strings.Fields(s[end+1:])
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 {
		return "", 0, fmt.Errorf("malformed stat %q", s)
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return "", 0, fmt.Errorf("malformed start time %q", f[19])
	}
	return f[0], ticks, nil
}

func splitNUL(data []byte) []string {
	data = bytes.TrimRight(data, "\x00")
	if len(data) == 0 {
		return nil
	}
	parts := bytes.Split(data, []byte{0})
	out := make([]string, len(parts))
	for i, p := range parts {
		out[i] = string(p)
	}
	return out
}

// bootID identifies the running kernel's boot; "" if it cannot be read.
func bootID() string {
	data, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// lockFile takes an exclusive flock on path (created if missing) and returns its release. Each call
// opens its own file description, so the lock excludes other goroutines of this process as well as
// other processes.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for the lock %s (another Tessera process is changing this GPU's MPS daemon): %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}
