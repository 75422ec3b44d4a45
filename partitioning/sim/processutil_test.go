package sim_test

import (
	"errors"
	"testing"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// Process utilization as NVML gives it: one sample per process with its settable SM share, nothing
// (and no error) without processes, and ERROR_NOT_SUPPORTED in MIG mode.
func TestProcessUtilization(t *testing.T) {
	lib, node := open(t, "dgx-h100", t.TempDir())
	if got, err := lib.ProcessUtilization(0); err != nil || len(got) != 0 {
		t.Fatalf("no processes: %v %v", got, err)
	}
	if err := node.AddProcess(0, 4242, 1024, -1, -1); err != nil {
		t.Fatal(err)
	}
	if err := node.AddProcess(0, 4243, 512, -1, -1); err != nil {
		t.Fatal(err)
	}
	if err := node.SetProcessUtilization(0, 4243, 35); err != nil {
		t.Fatal(err)
	}
	got, err := lib.ProcessUtilization(0)
	if err != nil {
		t.Fatal(err)
	}
	want := []nvmlib.ProcessUtilization{{PID: 4242}, {PID: 4243, SMPercent: 35}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("samples %+v, want %+v", got, want)
	}
	if err := node.SetProcessUtilization(0, 9999, 10); err == nil {
		t.Error("a process that does not run got a utilization")
	}
	if err := node.SetProcessUtilization(0, 4242, 101); err == nil {
		t.Error("101 % accepted")
	}
	if _, err := lib.SetMigMode(1, true); err != nil {
		t.Fatal(err)
	}
	if _, err := lib.ProcessUtilization(1); !errors.Is(err, nvmlib.ErrNotSupported) {
		t.Errorf("MIG mode: %v, want ErrNotSupported", err)
	}
}
