package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestInspectJSONIsStable(t *testing.T) {
	dir := t.TempDir()
	a, err := run(t, "--nvml=sim:dgx-h100", "--sim-state-dir", dir, "inspect", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	b, err := run(t, "--nvml=sim:dgx-h100", "--sim-state-dir", dir, "inspect", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Fatal("two inspects of the same node differ")
	}
	var snap struct {
		GPUs []struct {
			ProductName string `json:"productName"`
			UUID        string `json:"uuid"`
			MemoryMiB   int    `json:"memoryMiB"`
		} `json:"gpus"`
	}
	if err := json.Unmarshal([]byte(a), &snap); err != nil {
		t.Fatal(err)
	}
	if len(snap.GPUs) != 8 {
		t.Fatalf("%d GPUs", len(snap.GPUs))
	}
	for _, g := range snap.GPUs {
		if g.ProductName != "NVIDIA H100 80GB HBM3" || g.MemoryMiB != 81559 || !strings.HasPrefix(g.UUID, "GPU-") {
			t.Fatalf("GPU %+v", g)
		}
	}
}

func TestInjectReachesStatusAndInspect(t *testing.T) {
	dir := t.TempDir()
	args := []string{"--nvml=sim:dgx-a100", "--sim-state-dir", dir}
	if _, err := run(t, append(args, "sim", "inject", "--gpu", "2", "--xid", "79")...); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, append(args, "sim", "status", "-o", "json")...)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		BootID string `json:"bootID"`
		GPUs   []struct {
			Lost    bool   `json:"lost"`
			LastXID uint64 `json:"lastXID"`
		} `json:"gpus"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if !st.GPUs[2].Lost || st.GPUs[2].LastXID != 79 || st.GPUs[1].Lost {
		t.Fatalf("status %+v", st.GPUs)
	}
	table, err := run(t, append(args, "inspect")...)
	if err != nil || !strings.Contains(table, "ERROR_GPU_IS_LOST") {
		t.Fatalf("inspect after loss: %v\n%s", err, table)
	}
	if _, err := run(t, append(args, "sim", "reboot")...); err != nil {
		t.Fatal(err)
	}
	out, _ = run(t, append(args, "sim", "status", "-o", "json")...)
	var st2 struct {
		BootID string `json:"bootID"`
		GPUs   []struct {
			Lost bool `json:"lost"`
		} `json:"gpus"`
	}
	if err := json.Unmarshal([]byte(out), &st2); err != nil {
		t.Fatal(err)
	}
	if st2.BootID == st.BootID || st2.GPUs[2].Lost {
		t.Fatalf("after reboot: %+v (boot ID was %s)", st2, st.BootID)
	}
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--nvml=sim:dgx-z9", "inspect"}, "dgx-a100, dgx-a100-80, dgx-b200, dgx-h100, dgx-h200, mixed"},
		{[]string{"--nvml=gpu", "inspect"}, "use real, sim:<node>"},
		{[]string{"--nvml=sim:dgx-h100", "--sim-state-dir", dir, "inspect", "-o", "xml"}, "-o \"xml\""},
		{[]string{"--nvml=sim:dgx-h100", "--sim-state-dir", dir, "sim", "inject", "--gpu", "9", "--xid", "48"}, "GPUs 0 to 7"},
		{[]string{"--nvml=sim:dgx-h100", "--sim-state-dir", dir, "sim", "inject", "--gpu", "1"}, "exactly one of"},
		{[]string{"--nvml=sim:dgx-h100", "--sim-state-dir", dir, "sim", "set", "--gpu", "1", "--utilization", "140"}, "--utilization 140"},
		{[]string{"--nvml=sim:dgx-h100", "--sim-state-dir", dir, "sim", "set"}, "nothing to set"},
		{[]string{"--nvml=sim-file:/nonexistent/node.yaml", "inspect"}, "no such file"},
		{[]string{"--nvml=real", "sim", "status"}, "needs a simulated node"},
	}
	for _, tc := range cases {
		_, err := run(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to contain %q", tc.args, err, tc.want)
		}
	}
}

func TestRealBackendWithoutDriver(t *testing.T) {
	_, err := run(t, "--nvml=real", "inspect")
	if err == nil {
		t.Skip("this machine has an NVIDIA driver")
	}
	if !strings.Contains(err.Error(), "--nvml=sim:dgx-h100") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("error %q: want one line that says how to run a simulated node", err)
	}
}
