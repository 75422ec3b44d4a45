package host

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Scratch space. Everything is written under <root>/.tmp and renamed into place, so the visible tree
// never holds a partial file or a temporary name. Entries are named <kind>-<unix nanoseconds>-<random>;
// ones older than tmpMaxAge are left over from a crashed writer, or are MIG trees replaced that long
// ago (kept a while so a reader that opened the old tree can finish reading it), and are removed.
const tmpMaxAge = 2 * time.Minute

func (h *Host) tmpDir() string  { return filepath.Join(h.root, ".tmp") }
func (h *Host) lockDir() string { return filepath.Join(h.root, ".locks") }

func (h *Host) tmpName(kind string) string {
	return filepath.Join(h.tmpDir(), fmt.Sprintf("%s-%d-%016x", kind, time.Now().UnixNano(), rand.Uint64()))
}

// cleanTmp removes scratch entries older than tmpMaxAge. Errors are ignored: another process may be
// removing the same entries.
func (h *Host) cleanTmp() {
	entries, err := os.ReadDir(h.tmpDir())
	if err != nil {
		return
	}
	now := time.Now()
	for _, e := range entries {
		parts := strings.Split(e.Name(), "-")
		if len(parts) < 3 {
			continue
		}
		ns, err := strconv.ParseInt(parts[len(parts)-2], 10, 64)
		if err != nil || now.Sub(time.Unix(0, ns)) < tmpMaxAge {
			continue
		}
		_ = os.RemoveAll(filepath.Join(h.tmpDir(), e.Name()))
	}
}

// writeFile makes path a regular file with exactly data and perm. It does nothing if that is already
// so; otherwise it writes a scratch file and renames it over path. The parent directory is created.
func (h *Host) writeFile(path string, data []byte, perm os.FileMode) error {
	if fi, err := os.Lstat(path); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm() == perm &&
		fi.Size() == int64(len(data)) {
		if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := h.tmpName("file")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Chmod(perm) // explicit, so the umask does not matter
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp, path)
	}
	if werr != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, werr)
	}
	return nil
}

// symlink makes path a symbolic link to target, replacing whatever is there atomically.
func (h *Host) symlink(target, path string) error {
	if cur, err := os.Readlink(path); err == nil && cur == target {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := h.tmpName("link")
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("linking %s: %w", path, err)
	}
	return nil
}

// placeholderPrefix starts the content of a regular file standing in for a character device.
const placeholderPrefix = "tessera simulated character device "

func placeholder(major, minor uint32) []byte {
	return fmt.Appendf(nil, "%s%d:%d\n", placeholderPrefix, major, minor)
}

// node makes path a device node for major:minor with perm: a character device if the host has them,
// else a regular file saying which device it stands for.
func (h *Host) node(path string, major, minor uint32, perm os.FileMode) error {
	if h.nodes == RegularFiles {
		return h.writeFile(path, placeholder(major, minor), perm)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeCharDevice != 0 && fi.Mode().Perm() == perm {
		if maj, mnr, ok := charDevNumbers(fi); ok && maj == major && mnr == minor {
			return nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := h.tmpName("node")
	if err := mknodChar(tmp, major, minor); err != nil {
		return fmt.Errorf("creating character device %s (%d:%d); %s records character devices for this host: %w",
			path, major, minor, metaFile, err)
	}
	err := os.Chmod(tmp, perm)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("creating device node %s: %w", path, err)
	}
	return nil
}

// probeNodeKind finds out whether this process may create character devices.
func (h *Host) probeNodeKind() (NodeKind, error) {
	tmp := h.tmpName("probe")
	err := mknodChar(tmp, NvidiaMajor, NvidiaCtlMinor)
	if err == nil {
		_ = os.Remove(tmp)
		return CharDevices, nil
	}
	if isPermissionError(err) {
		return RegularFiles, nil
	}
	return "", fmt.Errorf("probing whether device nodes can be created: %w", err)
}

// DeviceNumbers reports the major and minor a device node under a simulated (or real) host's dev/
// stands for: from the inode of a character device, or from the content of a regular-file stand-in.
// isChar says which it was.
func DeviceNumbers(path string) (major, minor uint32, isChar bool, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, 0, false, err
	}
	if fi.Mode()&fs.ModeCharDevice != 0 {
		maj, mnr, ok := charDevNumbers(fi)
		if !ok {
			return 0, 0, false, fmt.Errorf("%s: cannot read device numbers on this platform", path)
		}
		return maj, mnr, true, nil
	}
	if !fi.Mode().IsRegular() || fi.Size() > 128 {
		return 0, 0, false, fmt.Errorf("%s is neither a character device nor a simulated one", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, false, err
	}
	rest, ok := strings.CutPrefix(strings.TrimSpace(string(data)), placeholderPrefix)
	if !ok {
		return 0, 0, false, fmt.Errorf("%s is neither a character device nor a simulated one", path)
	}
	a, b, ok := strings.Cut(rest, ":")
	ma, err1 := strconv.ParseUint(a, 10, 32)
	mi, err2 := strconv.ParseUint(b, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, 0, false, fmt.Errorf("%s: malformed simulated device %q", path, rest)
	}
	return uint32(ma), uint32(mi), false, nil
}

// removeIfExists removes path, which may already be gone.
func removeIfExists(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
