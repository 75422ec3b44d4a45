package dra

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// gpuLocks hands out one lock per GPU: an in-process mutex, then a file lock (flock) on
// <dir>/<gpu uuid>.lock, so that two driver instances overlapping in a rolling update exclude each
// other per GPU too. There is no node-wide lock: claims on different GPUs never wait for each other.
type gpuLocks struct {
	dir string

	mu    sync.Mutex
	locks map[string]*gpuLock
}

type gpuLock struct {
	ch chan struct{} // a one-slot semaphore: a mutex that a context can abandon waiting for
	f  *os.File
}

func newGPULocks(dir string) (*gpuLocks, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the lock directory: %w", err)
	}
	return &gpuLocks{dir: dir, locks: map[string]*gpuLock{}}, nil
}

func (l *gpuLocks) get(uuid string) *gpuLock {
	l.mu.Lock()
	defer l.mu.Unlock()
	g, ok := l.locks[uuid]
	if !ok {
		g = &gpuLock{ch: make(chan struct{}, 1)}
		l.locks[uuid] = g
	}
	return g
}

// flockPoll is how often a file lock held by another process is tried again.
const flockPoll = 2 * time.Millisecond

// Lock takes the locks of the given GPUs (by UUID) in sorted order, so two callers never deadlock,
// and returns the function that releases them. It gives up when ctx ends.
func (l *gpuLocks) Lock(ctx context.Context, uuids []string) (func(), error) {
	ids := slices.Compact(slices.Sorted(slices.Values(uuids)))
	var held []*gpuLock
	unlock := func() {
		for i := len(held) - 1; i >= 0; i-- {
			g := held[i]
			_ = unix.Flock(int(g.f.Fd()), unix.LOCK_UN)
			<-g.ch
		}
	}
	for _, id := range ids {
		g := l.get(id)
		select {
		case g.ch <- struct{}{}:
		case <-ctx.Done():
			unlock()
			return nil, fmt.Errorf("waiting for the lock of GPU %s: %w", id, ctx.Err())
		}
		if err := l.flock(ctx, id, g); err != nil {
			<-g.ch
			unlock()
			return nil, err
		}
		held = append(held, g)
	}
	return unlock, nil
}

// flock takes the file lock of a GPU; g's semaphore is held.
func (l *gpuLocks) flock(ctx context.Context, id string, g *gpuLock) error {
	if g.f == nil {
		f, err := os.OpenFile(filepath.Join(l.dir, id+".lock"), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("opening the lock file of GPU %s: %w", id, err)
		}
		g.f = f
	}
	for {
		err := unix.Flock(int(g.f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("locking GPU %s: %w", id, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the lock of GPU %s held by another driver instance: %w", id, ctx.Err())
		case <-time.After(flockPoll):
		}
	}
}

// Close releases the lock files.
func (l *gpuLocks) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, g := range l.locks {
		if g.f != nil {
			_ = g.f.Close()
		}
	}
}
