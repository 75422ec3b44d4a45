package image

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
)

// hostBinary is a dynamically linked executable every Linux machine here has.
func hostBinary(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/bin/ls", "/usr/bin/ls"} {
		if libs, err := SharedLibraries(context.Background(), p); err == nil && len(libs) > 0 {
			return p
		}
	}
	t.Skip("no dynamically linked ls on this machine")
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// untar unpacks the OCI archive so go-containerregistry can read it as a layout.
func untar(t *testing.T, archive string) string {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// The image holds the binary and exactly the libraries ldd names, is named for containerd and OCI
// tools, and is reproducible.
func TestBuildImage(t *testing.T) {
	bin := hostBinary(t)
	ctx := context.Background()
	out := filepath.Join(t.TempDir(), "img.tar")
	r, err := Build(ctx, Options{Binaries: []string{bin}, Ref: "example.com/tessera:t1", Out: out,
		Labels: map[string]string{"org.opencontainers.image.title": "tessera"}})
	if err != nil {
		t.Fatal(err)
	}
	libs, _ := SharedLibraries(ctx, bin)
	want := append([]string{"/usr/bin/" + filepath.Base(bin)}, libs...)
	for _, l := range libs {
		// libnvidia-ml, loaded later from the node's driver, needs these parts of the C library.
		if filepath.Base(l) == "libc.so.6" {
			for _, n := range []string{"libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"} {
				if p := filepath.Join(filepath.Dir(l), n); fileExists(p) && !slices.Contains(want, p) {
					want = append(want, p)
				}
			}
		}
	}
	slices.Sort(want)
	if !slices.Equal(r.Files, want) {
		t.Errorf("files %v, want %v", r.Files, want)
	}
	if !slices.ContainsFunc(r.Files, func(f string) bool { return strings.Contains(f, "libc.so") }) {
		t.Errorf("no C library in %v", r.Files)
	}

	lp, err := layout.FromPath(untar(t, out))
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("index %+v %v", im, err)
	}
	desc := im.Manifests[0]
	if desc.Annotations["io.containerd.image.name"] != "example.com/tessera:t1" || desc.Annotations["org.opencontainers.image.ref.name"] != "t1" {
		t.Errorf("annotations %v", desc.Annotations)
	}
	if desc.Digest.String() != r.Digest {
		t.Errorf("index names %s, Build said %s", desc.Digest, r.Digest)
	}
	img, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Architecture != runtime.GOARCH || cf.OS != "linux" || cf.Config.Labels["org.opencontainers.image.title"] != "tessera" {
		t.Errorf("config %+v", cf)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d %v", len(layers), err)
	}
	// The blob is what its media type says (containerd extracts by the media type).
	mt, _ := layers[0].MediaType()
	raw, err := layers[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	magic := make([]byte, 2)
	_, _ = io.ReadFull(raw, magic)
	raw.Close()
	if gz := magic[0] == 0x1f && magic[1] == 0x8b; gz != strings.HasSuffix(string(mt), "+gzip") {
		t.Errorf("layer media type %s, blob starts % x", mt, magic)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var regular []string
	modes := map[string]int64{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		modes[h.Name] = h.Mode
		if h.Typeflag == tar.TypeReg {
			regular = append(regular, "/"+h.Name)
		}
	}
	if !slices.Equal(regular, want) {
		t.Errorf("layer files %v, want %v", regular, want)
	}
	if modes["usr/bin/"+filepath.Base(bin)] != 0o755 || modes["tmp/"] != 0o1777 {
		t.Errorf("modes %o %o", modes["usr/bin/"+filepath.Base(bin)], modes["tmp/"])
	}

	// The same inputs give the same image.
	again, err := Build(ctx, Options{Binaries: []string{bin}, Ref: "example.com/tessera:t1", Out: filepath.Join(t.TempDir(), "b.tar"),
		Labels: map[string]string{"org.opencontainers.image.title": "tessera"}})
	if err != nil || again.Digest != r.Digest {
		t.Errorf("rebuild %s %v, first %s", again.Digest, err, r.Digest)
	}
}

func TestBuildRefusesBadInput(t *testing.T) {
	ctx := context.Background()
	out := filepath.Join(t.TempDir(), "x.tar")
	other := "arm64"
	if runtime.GOARCH == "arm64" {
		other = "amd64"
	}
	for name, o := range map[string]Options{
		"no binaries":  {Ref: "a/b:c", Out: out},
		"missing file": {Binaries: []string{"/nonexistent/tessera"}, Ref: "a/b:c", Out: out},
		"bad ref":      {Binaries: []string{"/bin/sh"}, Ref: "UPPER CASE", Out: out},
		"foreign arch": {Binaries: []string{"/bin/sh"}, Ref: "a/b:c", Out: out, Arch: other},
	} {
		if _, err := Build(ctx, o); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("a refused build left %s", out)
	}
}
