package harness

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

const reaperEnv = "TESSERA_HARNESS_REAPER_STATE"

// MaybeRunReaper must be the first call of a program (TestMain) that uses StartReaper: in the
// reaper child it waits for its parent and never returns; elsewhere it does nothing.
func MaybeRunReaper() {
	stateDir := os.Getenv(reaperEnv)
	if stateDir == "" {
		return
	}
	// The parent holds the write end of our stdin. "done" means it cleaned up itself; EOF without
	// it means the parent died (a panic, the test timeout, SIGKILL) and we clean up for it.
	buf, _ := io.ReadAll(os.Stdin)
	if string(buf) == "done" {
		os.Exit(0)
	}
	fmt.Fprintf(os.Stderr, "%s reaper: parent exited without stopping the cluster; stopping it\n", time.Now().Format(time.RFC3339))
	if err := Down(stateDir, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "reaper: %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// StartReaper starts a copy of the running program that stops the cluster in stateDir if this
// process dies without calling the returned disarm function (a test panic or the go test
// timeout exits without running deferred calls). The program must call MaybeRunReaper first.
// Files in inherit (a lock from AcquireLock) stay open in the reaper, so a lock is held until the
// cleanup is over.
func StartReaper(stateDir string, inherit ...*os.File) (disarm func(), err error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(filepath.Dir(stateDir), filepath.Base(stateDir)+"-reaper.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	defer lf.Close()
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), reaperEnv+"="+stateDir)
	cmd.Stdin = r
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.ExtraFiles = inherit
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	r.Close()
	go func() { _ = cmd.Wait() }()
	return func() {
		_, _ = w.Write([]byte("done"))
		_ = w.Close()
	}, nil
}
