package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseCRILog(t *testing.T) {
	in := "2026-01-01T00:00:00.000000000Z stdout F hello world\n" +
		"2026-01-01T00:00:00.000000001Z stderr P part one \n" +
		"2026-01-01T00:00:00.000000002Z stderr F and two\n" +
		"2026-01-01T00:00:00.000000003Z stdout F \n"
	got, err := parseCRILog(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := "hello world\npart one and two\n\n"
	if got != want {
		t.Errorf("parseCRILog = %q, want %q", got, want)
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/a\040b/c\011d`); got != "/a b/c\td" {
		t.Errorf("unescapeMount = %q", got)
	}
	if got := unescapeMount(`/plain`); got != "/plain" {
		t.Errorf("unescapeMount = %q", got)
	}
}

// The OCI archive must be self-consistent: index -> manifest -> config and layer by digest.
func TestWriteOCIArchive(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "img.tar")
	files := []imageFile{
		{name: "bin", dir: true, mode: 0o755},
		{name: "bin/tool", mode: 0o755, data: []byte("#!/bin/sh\necho hi\n")},
		{name: "bin/alias", mode: 0o777, linkname: "tool"},
	}
	if err := writeOCIArchive(path, "example.com/test/img:v1", files, imageConfig{Cmd: []string{"/bin/tool"}}); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		blobs[h.Name] = data
	}
	var index struct {
		Manifests []struct {
			Digest      string
			Annotations map[string]string
		}
	}
	if err := json.Unmarshal(blobs["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 1 || index.Manifests[0].Annotations["io.containerd.image.name"] != "example.com/test/img:v1" {
		t.Fatalf("bad index: %s", blobs["index.json"])
	}
	blob := func(d string) []byte {
		b, ok := blobs["blobs/sha256/"+strings.TrimPrefix(d, "sha256:")]
		if !ok {
			t.Fatalf("missing blob %s", d)
		}
		if digestOf(b) != d {
			t.Fatalf("blob %s has digest %s", d, digestOf(b))
		}
		return b
	}
	var manifest struct {
		Config struct{ Digest string }
		Layers []struct{ Digest string }
	}
	if err := json.Unmarshal(blob(index.Manifests[0].Digest), &manifest); err != nil {
		t.Fatal(err)
	}
	var config struct {
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if len(manifest.Layers) != 1 || len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != manifest.Layers[0].Digest {
		t.Fatalf("layer and diff_id disagree: %+v %+v", manifest, config)
	}
	layer := tar.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	var names []string
	for {
		h, err := layer.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	if strings.Join(names, ",") != "bin/,bin/alias,bin/tool" {
		t.Errorf("layer entries = %v", names)
	}
}

// Leftovers must report a process recorded in the state dir and a mount below it, and Down must
// clear both: this is what makes the e2e teardown check able to fail.
func TestLeftoversAndDown(t *testing.T) {
	state := t.TempDir()
	spec := procSpec{Name: hostProcPrefix + "sleeper", Path: "/bin/sleep", Args: []string{"300"}}
	p, err := startProc(state, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(p.pid, syscall.SIGKILL)
	mounted := false
	if os.Geteuid() == 0 {
		mp := filepath.Join(state, "mnt")
		if err := os.MkdirAll(mp, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err == nil {
			mounted = true
			defer syscall.Unmount(mp, syscall.MNT_DETACH)
		} else {
			t.Logf("cannot mount tmpfs (%v); checking processes only", err)
		}
	}
	left, err := Leftovers(state)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(left, "\n")
	if !strings.Contains(joined, "pid file host-sleeper.pid") {
		t.Errorf("Leftovers missed the running process:\n%s", joined)
	}
	if mounted && !strings.Contains(joined, "mount "+filepath.Join(state, "mnt")) {
		t.Errorf("Leftovers missed the mount:\n%s", joined)
	}
	var log bytes.Buffer
	if err := Down(state, &log); err != nil {
		t.Fatalf("Down: %v\n%s", err, log.String())
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("process still running after Down")
	}
	left, err = Leftovers(state)
	if err != nil || len(left) > 0 {
		t.Errorf("after Down: %v %v", left, err)
	}
}

func TestPollStopsAtDeadline(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	n := 0
	err := Poll(ctx, 10*time.Millisecond, func(context.Context) (bool, error) { n++; return false, nil })
	if err == nil || n < 2 {
		t.Errorf("Poll = %v after %d calls; want deadline error after several calls", err, n)
	}
}
