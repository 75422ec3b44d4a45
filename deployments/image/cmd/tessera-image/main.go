// Command tessera-image builds Tessera's container image as an OCI tarball without a Docker daemon
// (make image): the binaries in bin/ plus the shared libraries they load.
//
//	go run ./deployments/image/cmd/tessera-image --bin-dir bin --ref ghcr.io/tessera-gpu/tessera:dev --out bin/tessera-image.tar
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/tessera-gpu/tessera/deployments/image"
)

// Binaries are the executables the image carries.
var Binaries = []string{"tessera", "tessera-device-plugin", "tessera-kubelet-plugin", "tessera-webhook"}

func main() {
	binDir := flag.String("bin-dir", "bin", "directory holding the built binaries ("+fmt.Sprint(Binaries)+")")
	ref := flag.String("ref", "ghcr.io/tessera-gpu/tessera:dev", "the image's name")
	out := flag.String("out", "bin/tessera-image.tar", "the OCI tarball to write")
	arch := flag.String("arch", "", "image architecture (default: this machine's; others: the Dockerfile)")
	flag.Parse()
	var bins []string
	for _, b := range Binaries {
		bins = append(bins, filepath.Join(*binDir, b))
	}
	r, err := image.Build(context.Background(), image.Options{Binaries: bins, Ref: *ref, Out: *out, Arch: *arch,
		Labels: map[string]string{"org.opencontainers.image.source": "https://github.com/tessera-gpu/tessera",
			"org.opencontainers.image.title": "tessera", "org.opencontainers.image.licenses": "Apache-2.0"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "tessera-image:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s: %s %s, %d files, %.1f MB\n", *out, r.Ref, r.Digest, len(r.Files), float64(r.Size)/1e6)
	for _, f := range r.Files {
		fmt.Println("  ", f)
	}
}
