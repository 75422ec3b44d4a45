package dra

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/tessera-gpu/tessera/api"
)

// The driver applies a time-sliced GPU's interval at start through nvidia-smi: on a simulated node
// the host's stand-in records the call.
func TestTimeSliceThroughNvidiaSMI(t *testing.T) {
	lib, node := openSim(t, "dgx-h100")
	h := node.Host()
	smi := NvidiaSMI{Path: h.ToolPath("nvidia-smi")}
	newEnv(t, lib, node, mixedProfile, WithTimeSlicer(smi))
	got, err := h.Recorded("nvidia-smi")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"compute-policy -i 4 --set-timeslice 2", "compute-policy -i 5 --set-timeslice 0"} {
		if !slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("nvidia-smi records %q lack %q", got, want)
		}
	}
	if err := smi.SetTimeSlice(context.Background(), 0, api.TimeSliceInterval("Forever")); err == nil {
		t.Error("an unknown interval was accepted")
	}
	bad := NvidiaSMI{Path: h.ToolPath("nvidia-smi") + "-missing"}
	if err := bad.SetTimeSlice(context.Background(), 0, api.IntervalLong); err == nil || !strings.Contains(err.Error(), "GPU 0") {
		t.Errorf("missing nvidia-smi: %v", err)
	}
}
