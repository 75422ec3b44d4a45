package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Images available on the real node. There is no registry: they are built locally as OCI archives
// and imported into containerd, so pods must use imagePullPolicy: Never.
const (
	// PauseImage is the sandbox image, pinned in containerd's config.
	PauseImage = "registry.k8s.io/pause:3.10"
	// BusyboxImage holds Debian's busybox-static with a link for every applet in /bin.
	BusyboxImage = "docker.io/library/busybox:tessera"
)

// busyboxPaths are where Debian's busybox-static installs busybox.
var busyboxPaths = []string{"/bin/busybox", "/usr/bin/busybox"}

// pauseSource is the sandbox's only process: it sleeps until told to stop and reaps orphans.
const pauseSource = `#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
	struct sigaction sa = {0};
	sa.sa_handler = stop;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sa.sa_handler = reap;
	sa.sa_flags = SA_NOCLDSTOP;
	sigaction(SIGCHLD, &sa, NULL);
	for (;;) pause();
	return 0;
}
`

// imageFile is one regular file, directory or symlink of an image layer.
type imageFile struct {
	name     string // path inside the image, no leading slash
	mode     int64
	data     []byte
	linkname string // symlink target when set
	dir      bool
}

// EnsureImages builds the pause and busybox image archives into cacheDir/images when missing and
// returns their paths (Start imports them into containerd).
func EnsureImages(ctx context.Context, cacheDir string, log io.Writer) ([]string, error) {
	if cacheDir == "" {
		cacheDir = DefaultCacheDir()
	}
	return ensureImages(ctx, cacheDir, newLogger(log))
}

// ensureImages builds the pause and busybox archives in cache/images when missing or stale and
// returns their paths.
func ensureImages(ctx context.Context, cache string, log *logger) ([]string, error) {
	dir := filepath.Join(cache, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	pause, err := ensurePauseImage(ctx, dir, log)
	if err != nil {
		return nil, err
	}
	busybox, err := ensureBusyboxImage(ctx, dir, log)
	if err != nil {
		return nil, err
	}
	return []string{pause, busybox}, nil
}

func ensurePauseImage(ctx context.Context, dir string, log *logger) (string, error) {
	sum := sha256.Sum256([]byte(pauseSource + "gcc -static -Os -s"))
	key := hex.EncodeToString(sum[:8])
	out := filepath.Join(dir, "pause-"+key+".oci.tar")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	log.Printf("building image %s (static C program, gcc -static)", PauseImage)
	work, err := os.MkdirTemp(dir, "pause-build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	if err := os.WriteFile(filepath.Join(work, "pause.c"), []byte(pauseSource), 0o644); err != nil {
		return "", err
	}
	bin := filepath.Join(work, "pause")
	cmd := exec.CommandContext(ctx, "gcc", "-static", "-Os", "-s", "-o", bin, filepath.Join(work, "pause.c"))
	if o, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("gcc -static pause.c (is gcc with static libc installed?): %v: %s", err, o)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	files := []imageFile{{name: "pause", mode: 0o755, data: data}}
	cfg := imageConfig{Entrypoint: []string{"/pause"}, User: "65535:65535"}
	if err := writeOCIArchive(out, PauseImage, files, cfg); err != nil {
		return "", err
	}
	return out, nil
}

func ensureBusyboxImage(ctx context.Context, dir string, log *logger) (string, error) {
	var src string
	for _, p := range busyboxPaths {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			src = p
			break
		}
	}
	if src == "" {
		return "", fmt.Errorf("busybox not found (install Debian's busybox-static)")
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	if !isStatic(data) {
		return "", fmt.Errorf("%s is dynamically linked; install Debian's busybox-static", src)
	}
	sum := sha256.Sum256(data)
	out := filepath.Join(dir, "busybox-"+hex.EncodeToString(sum[:8])+".oci.tar")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	log.Printf("building image %s from %s", BusyboxImage, src)
	o, err := exec.CommandContext(ctx, src, "--list").Output()
	if err != nil {
		return "", fmt.Errorf("%s --list: %v", src, err)
	}
	files := []imageFile{
		{name: "bin", dir: true, mode: 0o755},
		{name: "bin/busybox", mode: 0o755, data: data},
		{name: "etc", dir: true, mode: 0o755},
		{name: "etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{name: "etc/group", mode: 0o644, data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{name: "root", dir: true, mode: 0o700},
		{name: "tmp", dir: true, mode: 0o1777},
		{name: "proc", dir: true, mode: 0o755},
		{name: "sys", dir: true, mode: 0o755},
		{name: "dev", dir: true, mode: 0o755},
		{name: "var", dir: true, mode: 0o755},
	}
	seen := map[string]bool{"busybox": true}
	for _, applet := range strings.Fields(string(o)) {
		if seen[applet] || strings.Contains(applet, "/") {
			continue
		}
		seen[applet] = true
		files = append(files, imageFile{name: "bin/" + applet, mode: 0o777, linkname: "busybox"})
	}
	cfg := imageConfig{
		Cmd: []string{"sh"},
		Env: []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"},
	}
	if err := writeOCIArchive(out, BusyboxImage, files, cfg); err != nil {
		return "", err
	}
	return out, nil
}

// isStatic reports whether an ELF file has no PT_INTERP program header (no dynamic loader).
func isStatic(elf []byte) bool {
	return !bytes.Contains(elf[:min(len(elf), 4096)], []byte("/lib64/ld-linux")) &&
		!bytes.Contains(elf[:min(len(elf), 4096)], []byte("/lib/ld-linux"))
}

type imageConfig struct {
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	Env        []string `json:"Env,omitempty"`
	User       string   `json:"User,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

// writeOCIArchive writes an OCI image layout as a tar archive with one uncompressed layer, the form
// `ctr images import` reads. The image name goes into the index annotations.
func writeOCIArchive(path, ref string, files []imageFile, cfg imageConfig) error {
	layer, err := layerTar(files)
	if err != nil {
		return err
	}
	layerDigest := digestOf(layer)
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Format(time.RFC3339)
	config := map[string]any{
		"created":      created,
		"architecture": goArch(),
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
		"history":      []map[string]any{{"created": created, "created_by": "tessera test harness"}},
	}
	configJSON, _ := json.Marshal(config)
	manifest := map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{
			"mediaType": "application/vnd.oci.image.config.v1+json",
			"digest":    digestOf(configJSON),
			"size":      len(configJSON),
		},
		"layers": []map[string]any{{
			"mediaType": "application/vnd.oci.image.layer.v1.tar",
			"digest":    layerDigest,
			"size":      len(layer),
		}},
	}
	manifestJSON, _ := json.Marshal(manifest)
	tag := ref[strings.LastIndex(ref, ":")+1:]
	index := map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []map[string]any{{
			"mediaType": "application/vnd.oci.image.manifest.v1+json",
			"digest":    digestOf(manifestJSON),
			"size":      len(manifestJSON),
			"platform":  map[string]string{"architecture": goArch(), "os": "linux"},
			"annotations": map[string]string{
				"io.containerd.image.name":          ref,
				"org.opencontainers.image.ref.name": tag,
			},
		}},
	}
	indexJSON, _ := json.Marshal(index)

	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Mode: 0o755, Typeflag: tar.TypeDir, ModTime: time.Unix(0, 0)}); err != nil {
			f.Close()
			return err
		}
	}
	blobs := [][]byte{layer, configJSON, manifestJSON}
	for _, b := range blobs {
		if err := add("blobs/sha256/"+strings.TrimPrefix(digestOf(b), "sha256:"), b); err != nil {
			f.Close()
			return err
		}
	}
	if err := add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		f.Close()
		return err
	}
	if err := add("index.json", indexJSON); err != nil {
		f.Close()
		return err
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func layerTar(files []imageFile) ([]byte, error) {
	sort.SliceStable(files, func(i, j int) bool { return files[i].name < files[j].name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		switch {
		case f.dir:
			h.Typeflag = tar.TypeDir
			h.Name += "/"
		case f.linkname != "":
			h.Typeflag = tar.TypeSymlink
			h.Linkname = f.linkname
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func goArch() string { return runtime.GOARCH }
