package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/tessera-gpu/tessera/tests/harness"
)

// measureDRAOnCluster runs the DRA driver's cluster benchmark (tests/e2e TestDRADriverBenchmark:
// the driver on the local cluster, a kubelet-like client on its socket, the real API server's claim
// GET as baseline) and returns its figures. The e2e run starts its own cluster on the machine's
// cluster ports, so it runs only when no local cluster is up (`make demo-down` first) and the
// cluster's binaries are cached; otherwise it returns nil and why, and the table repeats the last
// recorded figures.
func measureDRAOnCluster() (*harness.DRABenchFigures, string) {
	if note := clusterBinariesCached(); note != "" {
		return nil, note
	}
	if harness.Running(harness.DefaultStateDir()) {
		return nil, "a local cluster is running (make demo-down, then make bench again)"
	}
	dir, err := os.MkdirTemp("", "tb-dra-bench")
	if err != nil {
		return nil, err.Error()
	}
	defer os.RemoveAll(dir)
	cmd := exec.Command("go", "test", "-tags", "e2e", "-count", "1", "-timeout", "15m", "-run", "^TestDRADriverBenchmark$", "./tests/e2e/")
	cmd.Env = append(os.Environ(), "TESSERA_BENCH_OUT="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Sprintf("go test -run TestDRADriverBenchmark: %v: %s", err, tail(string(out)))
	}
	data, err := os.ReadFile(filepath.Join(dir, harness.DRABenchFile))
	if err != nil {
		return nil, err.Error()
	}
	var fig harness.DRABenchFigures
	if err := json.Unmarshal(data, &fig); err != nil {
		return nil, fmt.Sprintf("%s: %v", harness.DRABenchFile, err)
	}
	return &fig, ""
}

// clusterBinariesCached says what is missing when the local cluster's binaries are not built.
func clusterBinariesCached() string {
	cache := harness.DefaultCacheDir()
	for _, d := range []string{"kubernetes-" + harness.KubernetesVersion, "etcd-" + harness.EtcdVersion, "containerd-" + harness.ContainerdVersion} {
		if _, err := os.Stat(filepath.Join(cache, "bin", d, ".stamp")); err != nil {
			return "the local cluster's binaries are not built (make test, make demo or go run ./tests/cmd/localcluster build)"
		}
	}
	return ""
}
