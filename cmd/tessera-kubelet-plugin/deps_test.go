package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDaemonDependencies keeps the node daemons small: their RSS (≤ 40 MB each, docs/performance.md)
// is mostly the pages of the executable they touch, so it grows with what they link. Built as the
// Makefile and the Dockerfile build them (GOTAGS), they must not link:
//   - golang.org/x/net/trace (gRPC's /debug/requests pages, left out by the grpcnotrace tag) or any
//     other user of text/template: it calls methods by name, and then the linker keeps every exported
//     method of every type (the kubelet plugin: 78 MB instead of 50, about 10 MB more RSS);
//   - Helm or kustomize (besides their size, go-nvml's BIND_NOW crashes a binary that links Helm),
//     nor k8s.io/kubernetes.
func TestDaemonDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	root := filepath.Join("..", "..")
	for _, f := range []string{"Makefile", "Dockerfile"} {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "grpcnotrace") {
			t.Errorf("%s no longer builds with -tags grpcnotrace", f)
		}
	}
	forbidden := []string{"golang.org/x/net/trace", "text/template", "html/template", "helm.sh/", "sigs.k8s.io/kustomize/",
		"k8s.io/kubernetes/", "github.com/tessera-gpu/tessera/deployments/"}
	for _, cmd := range []string{"./cmd/tessera-kubelet-plugin", "./cmd/tessera-device-plugin"} {
		c := exec.Command(goBin, "list", "-deps", "-tags", "grpcnotrace", cmd)
		c.Dir = root
		out, err := c.Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", cmd, err)
		}
		for _, p := range strings.Fields(string(out)) {
			for _, f := range forbidden {
				if p == f || (strings.HasSuffix(f, "/") && strings.HasPrefix(p, f)) {
					t.Errorf("%s links %s", cmd, p)
				}
			}
		}
	}
}
