package host

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Record is one line a stand-in tool recorded.
type Record struct {
	Time time.Time
	PID  int
	// Kind is "argv" (the invocation's arguments), "env" (a CUDA MPS variable, NAME=value) or
	// "stdin" (a command line read by nvidia-cuda-mps-control).
	Kind string
	// Fields: the arguments for argv, the single value otherwise.
	Fields []string
}

// String is the record without its time and pid: "argv: compute-policy -i 0 --set-timeslice 2",
// "stdin: set_default_active_thread_percentage 50", "env: CUDA_MPS_PIPE_DIRECTORY=/tmp/mps".
func (r Record) String() string {
	if len(r.Fields) == 0 {
		return r.Kind + ":"
	}
	return r.Kind + ": " + strings.Join(r.Fields, " ")
}

var toolNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

func (h *Host) recordLog(tool string) (string, error) {
	if !toolNameRE.MatchString(tool) {
		return "", fmt.Errorf("invalid tool name %q", tool)
	}
	return filepath.Join(h.RecordDir(), tool+".log"), nil
}

// Recorded returns what the stand-in tool recorded, oldest first, each record as Record.String puts it
// (no time or pid), so tests can compare exactly. A tool never run has recorded nothing.
func (h *Host) Recorded(tool string) ([]string, error) {
	recs, err := h.Records(tool)
	if err != nil || len(recs) == 0 {
		return nil, err
	}
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = r.String()
	}
	return out, nil
}

// Records returns what the stand-in tool recorded, oldest first, with times and pids.
func (h *Host) Records(tool string) ([]Record, error) {
	path, err := h.recordLog(tool)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var recs []Record
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for n := 1; sc.Scan(); n++ {
		r, err := parseRecord(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("%s line %d: %w", path, n, err)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return recs, nil
}

func parseRecord(line string) (Record, error) {
	f := strings.Split(line, "\t")
	if len(f) < 3 {
		return Record{}, fmt.Errorf("malformed record %q", line)
	}
	t, err := time.Parse(time.RFC3339, f[0])
	if err != nil {
		return Record{}, fmt.Errorf("malformed record time %q", f[0])
	}
	pid, err := strconv.Atoi(f[1])
	if err != nil {
		return Record{}, fmt.Errorf("malformed record pid %q", f[1])
	}
	r := Record{Time: t, PID: pid, Kind: f[2], Fields: f[3:]}
	switch r.Kind {
	case "argv":
	case "env", "stdin":
		if len(r.Fields) != 1 {
			return Record{}, fmt.Errorf("%s record with %d fields", r.Kind, len(r.Fields))
		}
	default:
		return Record{}, fmt.Errorf("unknown record kind %q", r.Kind)
	}
	if r.Fields == nil {
		r.Fields = []string{}
	}
	return r, nil
}

// ResetRecorded forgets what the stand-in tool recorded so far.
func (h *Host) ResetRecorded(tool string) error {
	path, err := h.recordLog(tool)
	if err != nil {
		return err
	}
	return removeIfExists(path)
}

// ToolPath is the stand-in tool's path under the driver root (driver/usr/bin/<tool>).
func (h *Host) ToolPath(tool string) string {
	return filepath.Join(h.DriverRoot(), "usr", "bin", tool)
}
