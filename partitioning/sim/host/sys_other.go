//go:build !linux

package host

import (
	"errors"
	"io/fs"
	"sync"
)

// Outside Linux there are no NVIDIA device nodes to imitate: device nodes are always regular files,
// MIG trees are replaced by two renames, and locks only exclude goroutines of this process.

var errNoMknod = errors.New("character devices are only made on linux")

func mknodChar(string, uint32, uint32) error { return errNoMknod }

func isPermissionError(err error) bool { return errors.Is(err, errNoMknod) }

func charDevNumbers(fs.FileInfo) (uint32, uint32, bool) { return 0, 0, false }

var errNoExchange = errors.New("atomic exchange not supported")

func exchange(string, string) error { return errNoExchange }

var (
	locksMu sync.Mutex
	locks   = map[string]*sync.Mutex{}
)

func lockFile(path string) (func(), error) {
	locksMu.Lock()
	mu, ok := locks[path]
	if !ok {
		mu = &sync.Mutex{}
		locks[path] = mu
	}
	locksMu.Unlock()
	mu.Lock()
	return mu.Unlock, nil
}
