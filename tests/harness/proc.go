package harness

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// procSpec says how to run one host process of the cluster. It is saved in the state dir so that a
// later process (the CLI, a second test binary) can restart a component of a running cluster.
type procSpec struct {
	Name string   `json:"name"`
	Path string   `json:"path"`
	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
}

// proc is a running host process with its log file and PID file in the state dir.
type proc struct {
	spec    procSpec
	pid     int
	start   uint64 // start time in clock ticks, guards against PID reuse
	logPath string
	pidPath string
	done    chan struct{} // closed when the process exits; nil when it is not our child
	waitErr error
}

func pidFilePath(stateDir, name string) string { return filepath.Join(stateDir, "pids", name+".pid") }

func logFilePath(stateDir, name string) string { return filepath.Join(stateDir, "logs", name+".log") }

// startProc starts spec in its own session (so a terminal's Ctrl-C reaches only the harness, which
// then shuts everything down in order), with stdout and stderr appended to the log file.
func startProc(stateDir string, spec procSpec) (*proc, error) {
	logPath := logFilePath(stateDir, spec.Name)
	pidPath := pidFilePath(stateDir, spec.Name)
	for _, d := range []string{filepath.Dir(logPath), filepath.Dir(pidPath)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	fmt.Fprintf(lf, "=== %s: %s %s\n", time.Now().Format(time.RFC3339), spec.Path, strings.Join(spec.Args, " "))
	cmd := exec.Command(spec.Path, spec.Args...)
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.Dir = spec.Dir
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	p := &proc{spec: spec, pid: cmd.Process.Pid, logPath: logPath, pidPath: pidPath, done: make(chan struct{})}
	p.start, _ = procStartTime(p.pid)
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if err := os.WriteFile(pidPath, []byte(fmt.Sprintf("%d %d\n", p.pid, p.start)), 0o644); err != nil {
		return nil, err
	}
	return p, nil
}

// exited reports whether a process we started has exited, with its error.
func (p *proc) exited() (bool, error) {
	if p.done == nil {
		return !pidAlive(p.pid, p.start), nil
	}
	select {
	case <-p.done:
		if p.waitErr == nil {
			return true, errors.New("exited with status 0")
		}
		return true, p.waitErr
	default:
		return false, nil
	}
}

// readPIDFile returns the PID and start time recorded in a PID file.
func readPIDFile(path string) (pid int, start uint64, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0, 0, fmt.Errorf("%s: empty", path)
	}
	pid, err = strconv.Atoi(f[0])
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %v", path, err)
	}
	if len(f) > 1 {
		start, _ = strconv.ParseUint(f[1], 10, 64)
	}
	return pid, start, nil
}

// procStat returns the state letter and start time of pid from /proc/<pid>/stat.
func procStat(pid int) (state string, start uint64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", 0, fmt.Errorf("bad stat for %d", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return "", 0, fmt.Errorf("short stat for %d", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return f[0], start, err
}

func procStartTime(pid int) (uint64, error) {
	_, st, err := procStat(pid)
	return st, err
}

// pidAlive reports whether pid runs and (when start is known) is the same process as recorded.
// Zombies count as dead.
func pidAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	state, st, err := procStat(pid)
	if err != nil || state == "Z" || state == "X" {
		return false
	}
	return start == 0 || st == start
}

// stopPID sends SIGTERM, waits up to grace, then SIGKILLs and waits for the process to go.
func stopPID(pid int, start uint64, grace time.Duration) {
	if !pidAlive(pid, start) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(pid, start, grace) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	waitGone(pid, start, 5*time.Second)
}

func waitGone(pid int, start uint64, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !pidAlive(pid, start) {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return !pidAlive(pid, start)
}

// procInfo describes a process found in /proc that belongs to a cluster.
type procInfo struct {
	PID    int
	Why    string
	Cmd    string
	Start  uint64
	IsRoot bool // found because its root directory is inside the state dir (a container process)
}

func (p procInfo) String() string { return fmt.Sprintf("pid %d (%s): %s", p.PID, p.Why, p.Cmd) }

// clusterProcesses lists live processes that belong to the cluster in stateDir: the ones in its
// PID files, the ones whose executable is one of binDirs' and whose command line names stateDir
// (components, containerd shims), and the ones whose root directory is inside stateDir (container
// processes). The calling process and its ancestors are never listed.
func clusterProcesses(stateDir string, binDirs []string) []procInfo {
	skip := map[int]bool{}
	for pid := os.Getpid(); pid > 1; {
		skip[pid] = true
		ppid, err := parentPID(pid)
		if err != nil || ppid == pid {
			break
		}
		pid = ppid
	}
	found := map[int]procInfo{}
	if files, _ := filepath.Glob(filepath.Join(stateDir, "pids", "*.pid")); len(files) > 0 {
		for _, f := range files {
			pid, start, err := readPIDFile(f)
			if err == nil && !skip[pid] && pidAlive(pid, start) {
				found[pid] = procInfo{PID: pid, Start: start, Why: "pid file " + filepath.Base(f), Cmd: cmdline(pid)}
			}
		}
	}
	prefix := strings.TrimRight(stateDir, "/") + "/"
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || skip[pid] {
			continue
		}
		if _, ok := found[pid]; ok {
			continue
		}
		state, start, err := procStat(pid)
		if err != nil || state == "Z" {
			continue
		}
		if root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", pid)); err == nil && strings.HasPrefix(root+"/", prefix) {
			found[pid] = procInfo{PID: pid, Start: start, Why: "root in state dir", Cmd: cmdline(pid), IsRoot: true}
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil {
			continue
		}
		ours := false
		for _, d := range binDirs {
			if d != "" && strings.HasPrefix(exe, strings.TrimRight(d, "/")+"/") {
				ours = true
			}
		}
		if ours {
			if c := cmdline(pid); strings.Contains(c, strings.TrimRight(stateDir, "/")) {
				found[pid] = procInfo{PID: pid, Start: start, Why: "cluster binary", Cmd: c}
			}
		}
	}
	out := make([]procInfo, 0, len(found))
	for _, p := range found {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out
}

func parentPID(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0, fmt.Errorf("short stat")
	}
	return strconv.Atoi(f[1])
}

func cmdline(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return "?"
	}
	c := strings.TrimSpace(strings.ReplaceAll(string(data), "\x00", " "))
	if len(c) > 300 {
		c = c[:300] + "..."
	}
	return c
}

// mountsUnder lists mount points at or below dir, and bind mounts of a directory below dir made
// elsewhere (their mountinfo root is below dir; this holds for a state dir on the root
// filesystem), deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dir = strings.TrimRight(dir, "/")
	under := func(p string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		root, mp := unescapeMount(fields[3]), unescapeMount(fields[4])
		if under(mp) || (root != "/" && under(root)) {
			out = append(out, mp)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

// isMountPoint reports whether path is a mount point.
func isMountPoint(path string) bool {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 5 && unescapeMount(fields[4]) == path {
			return true
		}
	}
	return false
}

// unescapeMount undoes the octal escapes (\040 for space, ...) of /proc/self/mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll unmounts everything at or below dir, deepest first, a few rounds (stacked mounts such
// as the kubelet's bind mount of its root dir onto itself need more than one), falling back to a
// lazy unmount.
func unmountAll(dir string) error {
	for round := 0; round < 10; round++ {
		mps, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil && round >= 2 {
				_ = syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	}
	mps, _ := mountsUnder(dir)
	if len(mps) > 0 {
		return fmt.Errorf("still mounted under %s: %s", dir, strings.Join(mps, ", "))
	}
	return nil
}
