package host

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// MIGInstance is one GPU instance and the compute instances in it.
type MIGInstance struct {
	GI  int
	CIs []int
}

// The driver numbers nvidia-caps minors from one fixed table, in order: nvlink fabric-mgmt (0),
// mig/config (1), mig/monitor (2), then for each GPU minor 0..31 and each GPU instance 0..14 the
// instance's access followed by its compute instances 0..7. So each GPU takes 15*9 = 135 minors and
// gpu0/gi0/access is 3; gpu31/gi14/ci7/access is 4322 (NVIDIA's MIG user guide lists the same).
const (
	firstGPUCapMinor = 3
	minorsPerGI      = 1 + MaxCIs
	minorsPerGPU     = MaxGIs * minorsPerGI
)

// GIMinor is the nvidia-caps minor of gpu<gpuMinor>/gi<gi>/access, or -1 if the driver has no such
// capability (gpuMinor outside 0..31 or gi outside 0..14).
func GIMinor(gpuMinor, gi int) int {
	if gpuMinor < 0 || gpuMinor >= MaxMIGGPUs || gi < 0 || gi >= MaxGIs {
		return -1
	}
	return firstGPUCapMinor + gpuMinor*minorsPerGPU + gi*minorsPerGI
}

// CIMinor is the nvidia-caps minor of gpu<gpuMinor>/gi<gi>/ci<ci>/access, or -1 if the driver has no
// such capability (ci outside 0..7, or GIMinor is -1).
func CIMinor(gpuMinor, gi, ci int) int {
	g := GIMinor(gpuMinor, gi)
	if g < 0 || ci < 0 || ci >= MaxCIs {
		return -1
	}
	return g + 1 + ci
}

// capOwner inverts GIMinor/CIMinor: the GPU, GI and CI (-1 for a GI's own access) of a minor.
func capOwner(minor int) (gpu, gi, ci int, ok bool) {
	if minor < firstGPUCapMinor || minor >= firstGPUCapMinor+MaxMIGGPUs*minorsPerGPU {
		return 0, 0, 0, false
	}
	off := minor - firstGPUCapMinor
	gpu, off = off/minorsPerGPU, off%minorsPerGPU
	gi, off = off/minorsPerGI, off%minorsPerGI
	return gpu, gi, off - 1, true
}

// ReadCapMinor reads a /proc/driver/nvidia/capabilities access file ("DeviceFileMinor: N" among
// "Key: value" lines, as the driver prints it) and returns N.
func ReadCapMinor(accessFile string) (int, error) {
	data, err := os.ReadFile(accessFile)
	if err != nil {
		return 0, fmt.Errorf("reading capability file: %w", err)
	}
	minor, err := parseCapMinor(data)
	if err != nil {
		return 0, fmt.Errorf("capability file %s: %w", accessFile, err)
	}
	return minor, nil
}

func parseCapMinor(data []byte) (int, error) {
	minor, found := -1, false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			return 0, fmt.Errorf("line %d %q is not \"Key: value\"", n, line)
		}
		if strings.TrimSpace(key) != "DeviceFileMinor" {
			continue
		}
		if found {
			return 0, fmt.Errorf("line %d: DeviceFileMinor given twice", n)
		}
		v, err := strconv.Atoi(strings.TrimSpace(value))
		if err != nil || v < 0 {
			return 0, fmt.Errorf("line %d: DeviceFileMinor %q is not a non-negative integer", n, strings.TrimSpace(value))
		}
		minor, found = v, true
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	if !found {
		return 0, errors.New("no DeviceFileMinor line")
	}
	return minor, nil
}

// SetMIG makes the procfs MIG capabilities of GPU gpuMinor be exactly the given instances:
// capabilities/gpu<N>/mig/gi<X>/access and …/gi<X>/ci<Y>/access exist for them and for nothing else,
// and /dev/nvidia-caps holds a node for each of them and for no other instance of that GPU.
//
// The mig directory is replaced as a whole, never edited in place: the new tree is built in scratch
// space and swapped in with one atomic rename, so the path always names a complete tree, either the old
// or the new one. The old tree is kept in scratch space for a while, so a reader that opened it just
// before the swap reads it whole. Nodes for new instances are made before the swap and nodes of
// removed ones are removed after it, so every access file visible names an existing node. Calls for
// the same GPU are serialized (across processes too); calls for different GPUs run in parallel. If the
// tree is already right, nothing is rewritten.
func (h *Host) SetMIG(gpuMinor int, instances []MIGInstance) error {
	if !h.hasGPU(gpuMinor) {
		return fmt.Errorf("SetMIG: GPU minor %d is not on this host (GPU minors %v)", gpuMinor, h.spec.GPUMinors)
	}
	if gpuMinor >= MaxMIGGPUs {
		return fmt.Errorf("SetMIG: GPU minor %d: the driver has MIG capabilities for GPU minors 0..%d only",
			gpuMinor, MaxMIGGPUs-1)
	}
	want, minors, err := migTree(gpuMinor, instances)
	if err != nil {
		return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
	}
	if err := mkdirs(0o755, h.lockDir(), h.tmpDir()); err != nil {
		return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
	}
	unlock, err := lockFile(filepath.Join(h.lockDir(), fmt.Sprintf("mig-gpu%d.lock", gpuMinor)))
	if err != nil {
		return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
	}
	defer unlock()
	h.cleanTmp()

	for _, m := range minors {
		if err := h.node(h.CapDevicePath(m), CapsMajor, uint32(m), accessCapMode); err != nil {
			return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
		}
	}
	dir := h.migDir(gpuMinor)
	same, err := treeIs(dir, want)
	if err != nil {
		return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
	}
	if !same {
		if err := h.swapTree(dir, want); err != nil {
			return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
		}
	}
	// Nodes of instances that are gone.
	entries, err := os.ReadDir(filepath.Join(h.DevRoot(), "nvidia-caps"))
	if err != nil {
		return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
	}
	for _, e := range entries {
		m := capNodeRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		minor, _ := strconv.Atoi(m[1])
		if gpu, _, _, ok := capOwner(minor); !ok || gpu != gpuMinor || slices.Contains(minors, minor) {
			continue
		}
		if err := removeIfExists(h.CapDevicePath(minor)); err != nil {
			return fmt.Errorf("SetMIG: GPU %d: %w", gpuMinor, err)
		}
	}
	return nil
}

// migTree validates instances and returns the mig directory's wanted content (relative path → file
// content; directories map to nil) and the cap minors it needs.
func migTree(gpu int, instances []MIGInstance) (map[string][]byte, []int, error) {
	want := map[string][]byte{}
	var minors []int
	for _, inst := range instances {
		g := GIMinor(gpu, inst.GI)
		if g < 0 {
			return nil, nil, fmt.Errorf("GPU instance %d is outside 0..%d", inst.GI, MaxGIs-1)
		}
		giDir := fmt.Sprintf("gi%d", inst.GI)
		if _, dup := want[giDir]; dup {
			return nil, nil, fmt.Errorf("GPU instance %d is listed twice", inst.GI)
		}
		want[giDir] = nil
		want[giDir+"/access"] = capAccess(g, accessCapMode)
		minors = append(minors, g)
		for _, ci := range inst.CIs {
			c := CIMinor(gpu, inst.GI, ci)
			if c < 0 {
				return nil, nil, fmt.Errorf("GPU instance %d: compute instance %d is outside 0..%d", inst.GI, ci, MaxCIs-1)
			}
			ciDir := fmt.Sprintf("%s/ci%d", giDir, ci)
			if _, dup := want[ciDir]; dup {
				return nil, nil, fmt.Errorf("GPU instance %d: compute instance %d is listed twice", inst.GI, ci)
			}
			want[ciDir] = nil
			want[ciDir+"/access"] = capAccess(c, accessCapMode)
			minors = append(minors, c)
		}
	}
	slices.Sort(minors)
	return want, minors, nil
}

// treeIs reports whether dir holds exactly want (see migTree), with procfs modes on the files.
func treeIs(dir string, want map[string][]byte) (bool, error) {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	seen := 0
	same := true
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == dir {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		rel = filepath.ToSlash(rel)
		content, ok := want[rel]
		switch {
		case !ok:
			same = false
		case d.IsDir():
			same = same && content == nil
		case d.Type().IsRegular():
			fi, err := d.Info()
			if err != nil {
				return err
			}
			got, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			same = same && content != nil && fi.Mode().Perm() == procMode && bytes.Equal(got, content)
		default:
			same = false
		}
		seen++
		if !same {
			return filepath.SkipAll
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	return same && seen == len(want), nil
}

// swapTree replaces dir by a tree holding exactly want.
func (h *Host) swapTree(dir string, want map[string][]byte) error {
	stage := h.tmpName("mig")
	if err := os.Mkdir(stage, 0o755); err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			_ = os.RemoveAll(stage)
		}
	}()
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	slices.Sort(paths) // parents before children
	for _, p := range paths {
		full := filepath.Join(stage, filepath.FromSlash(p))
		if want[p] == nil {
			if err := os.Mkdir(full, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(full, 0o755); err != nil {
				return err
			}
			continue
		}
		if err := os.WriteFile(full, want[p], procMode); err != nil {
			return err
		}
		if err := os.Chmod(full, procMode); err != nil {
			return err
		}
	}
	if err := os.Chmod(stage, 0o755); err != nil {
		return err
	}

	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	// Swap the new tree in. The old one ends up in scratch space under a fresh name, where cleanTmp
	// removes it once it is old.
	err := exchange(stage, dir)
	switch {
	case err == nil:
		committed = true
		trash := h.tmpName("trash")
		if err := os.Rename(stage, trash); err != nil {
			_ = os.RemoveAll(stage)
		}
		return nil
	case errors.Is(err, fs.ErrNotExist):
		// No tree yet.
		if err := os.Rename(stage, dir); err != nil {
			return err
		}
		committed = true
		return nil
	case errors.Is(err, errNoExchange):
		// The filesystem cannot swap: move the old tree aside, then the new one in. Between the two
		// renames the directory is briefly absent.
		trash := h.tmpName("trash")
		if err := os.Rename(dir, trash); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := os.Rename(stage, dir); err != nil {
			return err
		}
		committed = true
		return nil
	default:
		return err
	}
}
