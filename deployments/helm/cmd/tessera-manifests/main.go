// Command tessera-manifests renders the Helm chart into the static manifests of deployments/static
// (`make manifests`): tessera.yaml for real GPU nodes, tessera-sim.yaml for simulated ones.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/tessera-gpu/tessera/deployments/helm"
)

func main() {
	out := flag.String("o", helm.StaticDir(), "directory to write the manifests into")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "tessera-manifests:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	files, err := helm.StaticManifests(context.Background())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range helm.StaticFiles() {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, files[name], 0o644); err != nil {
			return err
		}
		fmt.Println("wrote", path)
	}
	return nil
}
