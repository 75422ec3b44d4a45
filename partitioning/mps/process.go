package mps

import (
	"context"
	"strings"
	"syscall"
)

// Processes is how a Manager starts, inspects and signals processes. OSProcesses is the real one;
// tests may substitute a fake to drive process lifecycles the simulator cannot (a daemon that dies
// at start, a server list, a command that fails).
type Processes interface {
	// Start starts argv with env (the complete environment) in a session of its own, so that it
	// outlives the caller and signals to the caller's process group do not reach it. Its stdin is
	// /dev/null; stdout and stderr are appended to the file output. Start does not wait for it.
	Start(argv, env []string, output string) (pid int, err error)
	// Run runs argv with env to completion, feeding it stdin, and returns what it printed on stdout
	// and stderr. A non-zero exit is an error that includes the output.
	Run(ctx context.Context, argv, env []string, stdin string) (string, error)
	// Lookup describes the process pid. ok is false when no such process runs; a zombie does not
	// run.
	Lookup(pid int) (info ProcInfo, ok bool, err error)
	// Signal sends sig to the process group pid leads (every process Start made leads one), or to
	// pid alone if it leads no group.
	Signal(pid int, sig syscall.Signal) error
}

// ProcInfo is what Lookup tells about a running process.
type ProcInfo struct {
	PID int
	// StartTicks is when the process started, in clock ticks since boot (/proc/<pid>/stat field
	// 22). A PID reused by another process has another start time.
	StartTicks uint64
	// Args is the command line. For a script this starts with the interpreter.
	Args []string
	// Env is the environment the process started with, or nil when it cannot be read (another
	// user's process, without privilege).
	Env []string
}

// envValue returns the value of name in env and whether it is set.
func envValue(env []string, name string) (string, bool) {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v, true
		}
	}
	return "", false
}
