// Package image builds Tessera's container image without a Docker daemon: the binaries plus exactly
// the shared libraries they load (as ldd names them: the C library and the dynamic loader, since
// the binaries use cgo for NVML), in one layer, written as an OCI image-layout tarball that
// `ctr images import`, `podman load`, `skopeo copy oci-archive:` and kind's `load image-archive`
// read. NVML itself (libnvidia-ml.so.1) is not in the image: it comes from the node's driver, through
// the NVIDIA container runtime or the driver root the chart mounts.
//
// With the C library go the parts of it libnvidia-ml needs (libm, libpthread, libdl, librt), which
// the binaries themselves do not load. The image is reproducible: fixed timestamps, sorted entries, so the same binaries give the same
// digest.
package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinDir is where the binaries are in the image.
const BinDir = "/usr/bin"

// epoch is every file's and the image's timestamp, for reproducible digests.
var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// Options say what goes into the image.
type Options struct {
	// Binaries are host paths of the executables; each goes to BinDir/<base name>.
	Binaries []string
	// Ref names the image, e.g. ghcr.io/tessera-gpu/tessera:v0.3.0.
	Ref string
	// Out is the tarball to write.
	Out string
	// Arch is the image's architecture (default: this machine's). The libraries are read from this
	// machine, so it must be able to run the binaries' loader: build other architectures with the
	// Dockerfile.
	Arch string
	// Labels are OCI annotations on the image config (org.opencontainers.image.*).
	Labels map[string]string
}

// Result says what was built.
type Result struct {
	Ref    string
	Digest string
	// Files are the image's regular files, sorted.
	Files []string
	// Size is the uncompressed layer's size in bytes.
	Size int64
}

// Build writes the image tarball.
func Build(ctx context.Context, o Options) (Result, error) {
	if len(o.Binaries) == 0 {
		return Result{}, errors.New("no binaries: pass at least one")
	}
	ref, err := name.ParseReference(o.Ref)
	if err != nil {
		return Result{}, fmt.Errorf("image reference %q: %w (use registry/repository:tag)", o.Ref, err)
	}
	if o.Arch == "" {
		o.Arch = runtime.GOARCH
	}
	if o.Arch != runtime.GOARCH {
		return Result{}, fmt.Errorf("--arch %s on a %s machine: the shared libraries come from this machine; build other architectures with the Dockerfile (docker buildx build --platform linux/%s)", o.Arch, runtime.GOARCH, o.Arch)
	}
	files := map[string]string{} // image path → host path
	for _, b := range o.Binaries {
		if _, err := os.Stat(b); err != nil {
			return Result{}, fmt.Errorf("binary: %w", err)
		}
		files[path.Join(BinDir, filepath.Base(b))] = b
		libs, err := SharedLibraries(ctx, b)
		if err != nil {
			return Result{}, err
		}
		for _, l := range libs {
			files[l] = l
			for _, sib := range nvmlNeeds(l) {
				files[sib] = sib
			}
		}
	}
	layer, size, err := layerOf(files)
	if err != nil {
		return Result{}, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return Result{}, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return Result{}, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS, cf.Created = o.Arch, "linux", v1.Time{Time: epoch}
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cf.Config.Labels = o.Labels
	cf.History = []v1.History{{Created: v1.Time{Time: epoch}, CreatedBy: "tessera deployments/image", Comment: "binaries and their shared libraries"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return Result{}, err
	}
	dig, err := img.Digest()
	if err != nil {
		return Result{}, err
	}
	if err := writeOCIArchive(o.Out, ref, img, o.Arch); err != nil {
		return Result{}, err
	}
	r := Result{Ref: ref.Name(), Digest: dig.String(), Size: size}
	for p := range files {
		r.Files = append(r.Files, p)
	}
	slices.Sort(r.Files)
	return r, nil
}

// SharedLibraries lists the libraries a dynamically linked executable loads, the loader included, as
// ldd resolves them on this machine (none for a static one).
func SharedLibraries(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %v: %s", bin, err, bytes.TrimSpace(out))
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.Contains(line, "not found") {
			return nil, fmt.Errorf("ldd %s: a library is missing on this machine: %s", bin, line)
		}
		// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
		if _, after, ok := strings.Cut(line, "=> "); ok {
			line = after
		}
		p, _, _ := strings.Cut(line, " ")
		if strings.HasPrefix(p, "/") {
			libs = append(libs, p)
		}
	}
	slices.Sort(libs)
	return slices.Compact(libs), nil
}

// nvmlGlibcLibraries are the C library's parts libnvidia-ml (loaded later, from the node's driver
// root) is linked against; since glibc 2.34 they are stubs, but the loader still wants the files.
var nvmlGlibcLibraries = []string{"libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"}

// nvmlNeeds returns, for the C library at lib, those of its siblings NVML needs that exist here.
func nvmlNeeds(lib string) []string {
	if filepath.Base(lib) != "libc.so.6" {
		return nil
	}
	var out []string
	for _, n := range nvmlGlibcLibraries {
		p := filepath.Join(filepath.Dir(lib), n)
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// layerOf makes one uncompressed layer: the directories, then the files (symbolic links followed,
// so a library lands under the name the loader asks for), all owned by root, at epoch.
func layerOf(files map[string]string) (v1.Layer, int64, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{"tmp": true}
	for p := range files {
		for d := path.Dir(strings.TrimPrefix(p, "/")); d != "." && d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	for _, d := range slices.Sorted(func(yield func(string) bool) {
		for d := range dirs {
			if !yield(d) {
				return
			}
		}
	}) {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, 0, err
		}
	}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		data, err := os.ReadFile(files[p]) // follows symbolic links
		if err != nil {
			return nil, 0, err
		}
		st, err := os.Stat(files[p])
		if err != nil {
			return nil, 0, err
		}
		mode := int64(0o644)
		if st.Mode()&0o111 != 0 {
			mode = 0o755
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, 0, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, 0, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, 0, err
	}
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(types.OCILayer)) // gzip: tarball compresses the layer it is given
	return l, int64(len(b)), err
}

// writeOCIArchive writes img as an OCI image layout in a tar, named for containerd (its image name
// annotation) and for OCI tools (the ref name annotation, the tag).
func writeOCIArchive(out string, ref name.Reference, img v1.Image, arch string) error {
	dir, err := os.MkdirTemp("", "tessera-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          ref.Name(),
		"org.opencontainers.image.ref.name": ref.Identifier(),
	}), layout.WithPlatform(v1.Platform{OS: "linux", Architecture: arch})); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, ModTime: epoch})
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err = tw.Write(data)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}
