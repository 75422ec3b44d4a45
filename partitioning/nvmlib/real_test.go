package nvmlib

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

func TestLibraryUnder(t *testing.T) {
	root := t.TempDir()
	if got := LibraryUnder(root); got != "" {
		t.Errorf("empty root: %q", got)
	}
	if got := LibraryUnder("/"); got != "" {
		t.Errorf("/: %q, want the loader's own search", got)
	}
	triplet := "x86_64-linux-gnu"
	if runtime.GOARCH == "arm64" {
		triplet = "aarch64-linux-gnu"
	}
	// The multiarch directory wins over lib64, as the loader's order has it.
	for _, dir := range []string{"usr/lib64", "usr/lib/" + triplet} {
		p := filepath.Join(root, dir, "libnvidia-ml.so.1")
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := LibraryUnder(root), filepath.Join(root, "usr/lib", triplet, "libnvidia-ml.so.1"); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
