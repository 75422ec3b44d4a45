//go:build !linux

package mps

import (
	"context"
	"errors"
	"syscall"
)

// MPS runs on Linux only; elsewhere the package builds (so tools that import it build) and every
// process operation fails.
var errNotLinux = errors.New("CUDA MPS runs on Linux only")

// OSProcesses runs real processes; outside Linux it refuses.
type OSProcesses struct{}

var _ Processes = OSProcesses{}

// Start implements Processes.
func (OSProcesses) Start([]string, []string, string) (int, error) { return 0, errNotLinux }

// Run implements Processes.
func (OSProcesses) Run(context.Context, []string, []string, string) (string, error) {
	return "", errNotLinux
}

// Lookup implements Processes.
func (OSProcesses) Lookup(int) (ProcInfo, bool, error) { return ProcInfo{}, false, errNotLinux }

// Signal implements Processes.
func (OSProcesses) Signal(int, syscall.Signal) error { return errNotLinux }

func bootID() string { return "" }

func lockFile(context.Context, string) (func(), error) { return nil, errNotLinux }
