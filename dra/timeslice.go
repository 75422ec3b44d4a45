package dra

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/tessera-gpu/tessera/api"
)

// TimeSlicer sets a GPU's CUDA time-slice interval.
type TimeSlicer interface {
	SetTimeSlice(ctx context.Context, gpuIndex int, interval api.TimeSliceInterval) error
}

// intervalCode is nvidia-smi's code for an interval (compute-policy --set-timeslice).
func intervalCode(i api.TimeSliceInterval) (int, error) {
	switch i {
	case "", api.IntervalDefault:
		return 0, nil
	case api.IntervalShort:
		return 1, nil
	case api.IntervalMedium:
		return 2, nil
	case api.IntervalLong:
		return 3, nil
	}
	return 0, fmt.Errorf("unknown time-slice interval %q", i)
}

// NvidiaSMI sets intervals with `nvidia-smi compute-policy -i <gpu> --set-timeslice <n>` (NVML has
// no call for it). On a simulated node the path is the host's stand-in, which records the call.
type NvidiaSMI struct {
	Path string
	// Timeout bounds one call (default 30s).
	Timeout time.Duration
}

// SetTimeSlice runs nvidia-smi for one GPU.
func (n NvidiaSMI) SetTimeSlice(ctx context.Context, gpu int, interval api.TimeSliceInterval) error {
	code, err := intervalCode(interval)
	if err != nil {
		return err
	}
	to := n.Timeout
	if to <= 0 {
		to = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.Path, "compute-policy", "-i", strconv.Itoa(gpu), "--set-timeslice", strconv.Itoa(code))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("setting time-slice interval %s on GPU %d: %s: %w: %s", interval, gpu, n.Path, err, strings.TrimSpace(string(out)))
	}
	return nil
}
