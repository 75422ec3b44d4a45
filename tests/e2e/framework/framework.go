// Package framework runs Tessera's end-to-end tests against one real local cluster (see
// tests/harness). A test package's TestMain calls Run; tests call Cluster, Namespace and Context.
package framework

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/tests/harness"
)

var cluster *harness.Cluster

// StateDir is where the e2e cluster lives: $TESSERA_E2E_STATE, else $HOME/.cache/tessera/e2e.
// It is wiped at the start of every run.
func StateDir() string {
	if d := os.Getenv("TESSERA_E2E_STATE"); d != "" {
		return d
	}
	return filepath.Join(filepath.Dir(harness.DefaultStateDir()), "e2e")
}

// Run starts a fresh cluster, runs the tests, and always tears the cluster down: normally after
// the tests, from the harness's signal handler on SIGINT/SIGTERM, from a guard timer shortly
// before the go test timeout, and from a reaper process if this one dies some other way (a
// panic). After teardown it checks that no process and no mount of the cluster is left and fails
// the run if there is. It returns the exit code for os.Exit.
func Run(m *testing.M) int {
	harness.MaybeRunReaper()
	started := time.Now()
	flag.Parse()
	stateDir := StateDir()
	ctx := context.Background()

	// One e2e cluster per machine at a time: wait for another run to finish instead of tearing
	// its cluster down. The lock is released when this process and its reaper are gone.
	wait := testTimeout() / 2
	if wait <= 0 {
		wait = 24 * time.Hour
	}
	lockCtx, cancelLock := context.WithTimeout(ctx, wait)
	lock, err := harness.AcquireLock(lockCtx, harness.DefaultLockPath(), "go test -tags e2e, state "+stateDir, os.Stderr)
	cancelLock()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e: %v\n", err)
		return 1
	}
	defer lock.Close()

	t0 := time.Now()
	c, err := harness.Start(ctx, harness.Options{StateDir: stateDir, Fresh: true, Log: os.Stderr})
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e cluster did not start: %v\n", err)
		return 1
	}
	cluster = c
	fmt.Fprintf(os.Stderr, "e2e: cluster up in %s (state %s)\n", time.Since(t0).Round(100*time.Millisecond), stateDir)
	disarm, err := harness.StartReaper(stateDir, lock)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: no reaper (%v); a panic may leave the cluster running: run `go run ./tests/cmd/localcluster down --state %s`\n", err, stateDir)
		disarm = func() {}
	}
	if d := testTimeout(); d > 0 {
		margin := min(time.Minute, d/10)
		time.AfterFunc(d-time.Since(started)-margin, func() {
			fmt.Fprintf(os.Stderr, "e2e: the go test timeout (%s) is near: dumping diagnostics and stopping the cluster\n", d)
			c.DumpDiagnostics(os.Stderr)
			_ = c.Stop()
		})
	}

	code := m.Run()

	stopErr := c.Stop()
	disarm()
	left, lerr := harness.Leftovers(stateDir)
	switch {
	case stopErr != nil || lerr != nil || len(left) > 0:
		fmt.Fprintf(os.Stderr, "--- FAIL: e2e teardown of %s\n", stateDir)
		if stopErr != nil {
			fmt.Fprintf(os.Stderr, "    stop: %v\n", stopErr)
		}
		if lerr != nil {
			fmt.Fprintf(os.Stderr, "    leftovers: %v\n", lerr)
		}
		for _, l := range left {
			fmt.Fprintf(os.Stderr, "    left behind: %s\n", l)
		}
		if code == 0 {
			code = 1
		}
	default:
		fmt.Fprintf(os.Stderr, "e2e: teardown clean: no process and no mount of the cluster left under %s\n", stateDir)
	}
	return code
}

// testTimeout is go test's -timeout (0 when none).
func testTimeout() time.Duration {
	if f := flag.Lookup("test.timeout"); f != nil {
		if d, ok := f.Value.(flag.Getter).Get().(time.Duration); ok {
			return d
		}
	}
	return 0
}

// Cluster returns the shared cluster. When the test fails, the cluster's diagnostics are logged
// at its end.
func Cluster(t testing.TB) *harness.Cluster {
	t.Helper()
	if cluster == nil {
		t.Fatal("no e2e cluster: the package's TestMain must call framework.Run")
	}
	if _, loaded := diagnosed.LoadOrStore(t, new(sync.Once)); !loaded {
		t.Cleanup(func() {
			if t.Failed() {
				Diagnose(t)
			}
			diagnosed.Delete(t)
		})
	}
	return cluster
}

// diagnosed holds a sync.Once per running test so diagnostics are logged once per failure.
var diagnosed sync.Map

// Context returns a context that ends after d or when the test ends.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

var nonName = regexp.MustCompile(`[^a-z0-9-]+`)

// Namespace creates a namespace for the test (ready for pods) and deletes it at the end. When the
// test has failed, the cluster's diagnostics (pods, events, component log tails) are logged first.
func Namespace(t testing.TB) string {
	t.Helper()
	c := Cluster(t)
	base := strings.Trim(nonName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if len(base) > 40 {
		base = base[:40]
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	name := "e2e-" + base + "-" + hex.EncodeToString(b)
	ctx := Context(t, time.Minute)
	if err := c.CreateNamespace(ctx, name); err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			Diagnose(t)
		}
		_ = c.DeleteNamespace(context.Background(), name)
	})
	return name
}

// Diagnose logs the cluster's diagnostics into the test's output (once per test).
func Diagnose(t testing.TB) {
	once, _ := diagnosed.LoadOrStore(t, new(sync.Once))
	once.(*sync.Once).Do(func() {
		var b strings.Builder
		cluster.DumpDiagnostics(&b)
		t.Log(b.String())
	})
}
