package telemetry

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// podUIDRE finds a pod UID in a cgroup path: /kubepods/burstable/pod<uid>/<container> (cgroupfs
// driver) or kubepods-burstable-pod<uid with underscores>.slice (systemd driver).
var podUIDRE = regexp.MustCompile(`pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})`)

// PodUIDOfPID returns the UID of the pod a process belongs to, from <procRoot>/<pid>/cgroup; ""
// when the process is not in a pod's cgroup.
func PodUIDOfPID(procRoot string, pid int) (string, error) {
	data, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return "", fmt.Errorf("process %d: %w", pid, err)
	}
	return PodUIDOfCgroup(data), nil
}

// PodUIDOfCgroup returns the pod UID in a /proc/<pid>/cgroup file's content ("" when none). Every
// hierarchy of a pod's process names the same pod, cgroup v1 and v2 alike.
func PodUIDOfCgroup(data []byte) string {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.Contains(parts[2], "kubepods") {
			continue
		}
		if m := podUIDRE.FindAllStringSubmatch(parts[2], -1); len(m) > 0 {
			return strings.ReplaceAll(m[len(m)-1][1], "_", "-")
		}
	}
	return ""
}
