package harness

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"
)

const hostProcPrefix = "host-"

// HostProcess is a process the test runs on the host next to the cluster, typically one of
// Tessera's plugins pointed at the cluster's kubelet dirs. Its output goes to LogPath; it is
// stopped by Stop, by Cluster.Stop and by Down.
type HostProcess struct {
	Name    string
	PID     int
	LogPath string
	c       *Cluster
	p       *proc
	id      string
}

// HostProcessSpec says what to run.
type HostProcessSpec struct {
	// Name identifies the process in logs and PID files (letters, digits, '-').
	Name string
	Path string
	Args []string
	// Env is added to the environment. KUBECONFIG is set to the cluster's PluginKubeconfig unless
	// Env sets it.
	Env []string
	Dir string
}

// StartHostProcess starts a host process with its output in <state>/logs/host-<name>.log.
func (c *Cluster) StartHostProcess(ctx context.Context, spec HostProcessSpec) (*HostProcess, error) {
	if spec.Name == "" || strings.ContainsAny(spec.Name, "/ ") {
		return nil, fmt.Errorf("host process needs a name without '/' or spaces, got %q", spec.Name)
	}
	if _, err := os.Stat(spec.Path); err != nil {
		return nil, fmt.Errorf("host process %s: %w", spec.Name, err)
	}
	id := hostProcPrefix + spec.Name
	env := spec.Env
	hasKC := false
	for _, e := range env {
		if strings.HasPrefix(e, "KUBECONFIG=") {
			hasKC = true
		}
	}
	if !hasKC {
		env = append([]string{"KUBECONFIG=" + c.PluginKubeconfig}, env...)
	}
	ps := procSpec{Name: id, Path: spec.Path, Args: spec.Args, Env: env, Dir: spec.Dir}
	p, err := startProc(c.StateDir, ps)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.procs[id] = p
	c.specs[id] = ps
	found := false
	for _, h := range c.hostProcs {
		if h == id {
			found = true
		}
	}
	if !found {
		c.hostProcs = append(c.hostProcs, id)
	}
	c.mu.Unlock()
	if err := c.saveState(); err != nil {
		return nil, err
	}
	return &HostProcess{Name: spec.Name, PID: p.pid, LogPath: p.logPath, c: c, p: p, id: id}, nil
}

// Exited reports whether the process has exited, and how.
func (h *HostProcess) Exited() (bool, error) { return h.p.exited() }

// Logs returns the process's output so far.
func (h *HostProcess) Logs() string {
	data, err := os.ReadFile(h.LogPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", h.LogPath, err)
	}
	return string(data)
}

// Stop sends SIGTERM, waits up to grace (default 10s), then SIGKILLs.
func (h *HostProcess) Stop(grace time.Duration) {
	if grace == 0 {
		grace = 10 * time.Second
	}
	stopPID(h.p.pid, h.p.start, grace)
	if h.p.done != nil {
		select {
		case <-h.p.done:
		case <-time.After(5 * time.Second):
		}
	}
	_ = os.Remove(h.p.pidPath)
}

// Restart stops the process and starts it again with the same spec.
func (h *HostProcess) Restart(ctx context.Context) error {
	h.Stop(0)
	h.c.mu.Lock()
	spec := h.c.specs[h.id]
	h.c.mu.Unlock()
	p, err := startProc(h.c.StateDir, spec)
	if err != nil {
		return err
	}
	h.c.mu.Lock()
	h.c.procs[h.id] = p
	h.c.mu.Unlock()
	h.p = p
	h.PID = p.pid
	return nil
}

// StopHostProcess stops the host process of that name if one runs (started by this command or by an
// earlier one on the same cluster, e.g. a previous demo), so a new one can take its place.
func (c *Cluster) StopHostProcess(name string, grace time.Duration) {
	id := hostProcPrefix + name
	c.mu.Lock()
	p := c.procs[id]
	c.mu.Unlock()
	if p == nil {
		return
	}
	(&HostProcess{Name: name, PID: p.pid, LogPath: p.logPath, c: c, p: p, id: id}).Stop(grace)
}
