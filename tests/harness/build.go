package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"
)

// Versions of the upstream components the harness builds. They come from the Go module proxy;
// nothing is downloaded from anywhere else.
const (
	KubernetesVersion = "v1.37.1"
	// StagingVersion is the version of the k8s.io staging modules (client-go, api, ...) that
	// belongs to KubernetesVersion.
	StagingVersion    = "v0.37.1"
	EtcdVersion       = "v3.7.3"
	ContainerdVersion = "v2.4.2"
)

// kubeCommands are the k8s.io/kubernetes main packages built in one `go build`.
var kubeCommands = []string{"kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubelet", "kubectl"}

var containerdCommands = []string{"containerd", "containerd-shim-runc-v2", "ctr"}

// Binaries holds absolute paths of every executable the cluster runs.
type Binaries struct {
	Etcd, APIServer, Scheduler, ControllerManager, Kubelet, Kubectl string
	Containerd, Shim, Ctr                                           string
	// Dirs are the directories holding the binaries above (containerd finds its shim through PATH).
	Dirs []string
}

// BuildOptions configures EnsureBinaries.
type BuildOptions struct {
	// CacheDir is where sources, build logs and binaries go. Empty means DefaultCacheDir().
	CacheDir string
	// Log receives progress lines. Nil means os.Stderr.
	Log io.Writer
}

// DefaultCacheDir is $TESSERA_CACHE, else $HOME/.cache/tessera/k8s.
func DefaultCacheDir() string {
	if d := os.Getenv("TESSERA_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "tessera", "k8s")
}

// logger serialises progress lines from concurrent builds.
type logger struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *logger) Printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, "[harness] "+format+"\n", args...)
}

func newLogger(w io.Writer) *logger {
	if w == nil {
		w = os.Stderr
	}
	return &logger{w: w}
}

// stamp records that a build finished; a component is rebuilt when its stamp is missing or differs.
type stamp struct {
	Component string   `json:"component"`
	Version   string   `json:"version"`
	GoVersion string   `json:"goVersion"`
	Files     []string `json:"files"`
	Recipe    string   `json:"recipe"`
}

func stampOK(dir string, want stamp) bool {
	data, err := os.ReadFile(filepath.Join(dir, ".stamp"))
	if err != nil {
		return false
	}
	var got stamp
	if json.Unmarshal(data, &got) != nil {
		return false
	}
	if got.Component != want.Component || got.Version != want.Version || got.Recipe != want.Recipe {
		return false
	}
	for _, f := range want.Files {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

func writeStamp(dir string, s stamp) error {
	data, _ := json.MarshalIndent(s, "", "  ")
	return os.WriteFile(filepath.Join(dir, ".stamp"), data, 0o644)
}

// Recipes: bump one when the way a component is built changes, so old caches are rebuilt.
const (
	kubeRecipe       = "go-build-1,ldflags-version"
	etcdRecipe       = "go-build-1"
	containerdRecipe = "go-install-1"
)

// EnsureBinaries builds whatever is missing from the cache and returns the paths. Builds that are
// already stamped are skipped, so a warm call returns in milliseconds. The kube binaries come from
// one `go build` of a throwaway module requiring k8s.io/kubernetes; etcd and containerd build
// concurrently with it.
func EnsureBinaries(ctx context.Context, opts BuildOptions) (*Binaries, error) {
	cache := opts.CacheDir
	if cache == "" {
		cache = DefaultCacheDir()
	}
	log := newLogger(opts.Log)
	kubeDir := filepath.Join(cache, "bin", "kubernetes-"+KubernetesVersion)
	etcdDir := filepath.Join(cache, "bin", "etcd-"+EtcdVersion)
	ctrdDir := filepath.Join(cache, "bin", "containerd-"+ContainerdVersion)
	b := &Binaries{
		Etcd:              filepath.Join(etcdDir, "etcd"),
		APIServer:         filepath.Join(kubeDir, "kube-apiserver"),
		Scheduler:         filepath.Join(kubeDir, "kube-scheduler"),
		ControllerManager: filepath.Join(kubeDir, "kube-controller-manager"),
		Kubelet:           filepath.Join(kubeDir, "kubelet"),
		Kubectl:           filepath.Join(kubeDir, "kubectl"),
		Containerd:        filepath.Join(ctrdDir, "containerd"),
		Shim:              filepath.Join(ctrdDir, "containerd-shim-runc-v2"),
		Ctr:               filepath.Join(ctrdDir, "ctr"),
		Dirs:              []string{kubeDir, etcdDir, ctrdDir},
	}
	goVer := goVersion()
	// Another process may be building into the same cache: build one at a time, and skip what
	// the other one finished.
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, err
	}
	lock, err := AcquireLock(ctx, filepath.Join(cache, "build.lock"), "building binaries", log.w)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	jobs := []struct {
		name string
		dir  string
		st   stamp
		run  func(ctx context.Context) error
	}{
		{"kubernetes " + KubernetesVersion + " (" + strings.Join(kubeCommands, ", ") + ")", kubeDir,
			stamp{"kubernetes", KubernetesVersion, goVer, kubeCommands, kubeRecipe},
			func(ctx context.Context) error { return buildKube(ctx, cache, kubeDir) }},
		{"etcd " + EtcdVersion, etcdDir,
			stamp{"etcd", EtcdVersion, goVer, []string{"etcd"}, etcdRecipe},
			func(ctx context.Context) error { return buildEtcd(ctx, cache, etcdDir) }},
		{"containerd " + ContainerdVersion + " (" + strings.Join(containerdCommands, ", ") + ")", ctrdDir,
			stamp{"containerd", ContainerdVersion, goVer, containerdCommands, containerdRecipe},
			func(ctx context.Context) error { return buildContainerd(ctx, cache, ctrdDir) }},
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []string
	)
	start := time.Now()
	pending := 0
	for _, j := range jobs {
		if stampOK(j.dir, j.st) {
			continue
		}
		pending++
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			log.Printf("building %s from the Go module proxy ...", j.name)
			if err := os.MkdirAll(j.dir, 0o755); err != nil {
				mu.Lock()
				errs = append(errs, err.Error())
				mu.Unlock()
				return
			}
			if err := j.run(ctx); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Sprintf("build %s: %v", j.name, err))
				mu.Unlock()
				return
			}
			if err := writeStamp(j.dir, j.st); err != nil {
				mu.Lock()
				errs = append(errs, err.Error())
				mu.Unlock()
				return
			}
			log.Printf("built %s in %s", j.name, time.Since(t0).Round(time.Second))
		}()
	}
	if pending == 0 {
		return b, nil
	}
	log.Printf("a cold build takes about 10 minutes on 2 cores; later runs reuse %s", cache)
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				log.Printf("still building ... %s elapsed", time.Since(start).Round(time.Second))
			}
		}
	}()
	wg.Wait()
	close(done)
	if len(errs) > 0 {
		sort.Strings(errs)
		return nil, fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	log.Printf("all binaries ready in %s", time.Since(start).Round(time.Second))
	return b, nil
}

func goVersion() string { return runtime.Version() }

// goCmd runs the go tool in dir with its output appended to logPath; on failure the error carries
// the log's tail.
func goCmd(ctx context.Context, dir, logPath string, env []string, args ...string) error {
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(f, "\n$ go %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false")
	cmd.Env = append(cmd.Env, env...)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %v\n--- tail of %s ---\n%s", strings.Join(args, " "), err, logPath, tailFile(logPath, 30))
	}
	return nil
}

// modFile is the part of `go mod edit -json` output the harness reads.
type modFile struct {
	Require []struct {
		Path    string
		Version string
	}
	Replace []struct {
		Old struct{ Path string }
		New struct{ Path string }
	}
}

// localReplaces reads the go.mod of module@version from the proxy and returns, for every required
// module that the upstream go.mod replaces with a local directory (k8s.io/kubernetes' staging
// modules, etcd's sibling modules), a replace line pointing at the published version instead.
// fallbackVersion is used for requirements recorded as v0.0.0.
func localReplaces(ctx context.Context, workDir, module, version, fallbackVersion string) ([]string, error) {
	out, err := goOutput(ctx, workDir, "mod", "download", "-json", module+"@"+version)
	if err != nil {
		return nil, err
	}
	var dl struct{ GoMod, Error string }
	if err := json.Unmarshal(out, &dl); err != nil {
		return nil, fmt.Errorf("parse go mod download output: %v", err)
	}
	if dl.Error != "" || dl.GoMod == "" {
		return nil, fmt.Errorf("go mod download %s@%s: %s", module, version, dl.Error)
	}
	out, err = goOutput(ctx, workDir, "mod", "edit", "-json", dl.GoMod)
	if err != nil {
		return nil, err
	}
	var mf modFile
	if err := json.Unmarshal(out, &mf); err != nil {
		return nil, fmt.Errorf("parse %s: %v", dl.GoMod, err)
	}
	local := map[string]bool{}
	for _, r := range mf.Replace {
		if strings.HasPrefix(r.New.Path, "./") || strings.HasPrefix(r.New.Path, "../") || strings.HasPrefix(r.New.Path, "/") {
			local[r.Old.Path] = true
		}
	}
	var lines []string
	for _, r := range mf.Require {
		if !local[r.Path] {
			continue
		}
		v := r.Version
		if v == "v0.0.0" || v == "" {
			v = fallbackVersion
		}
		lines = append(lines, fmt.Sprintf("\t%s => %s %s", r.Path, r.Path, v))
	}
	sort.Strings(lines)
	return lines, nil
}

func goOutput(ctx context.Context, dir string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("go %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// writeThrowawayModule creates dir/go.mod requiring module@version with the given replace lines.
func writeThrowawayModule(dir, name, module, version string, replaces []string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "// Generated by tessera's test harness: builds %s@%s from the module proxy.\n", module, version)
	fmt.Fprintf(&b, "module %s\n\ngo 1.26\n\nrequire %s %s\n", name, module, version)
	if len(replaces) > 0 {
		fmt.Fprintf(&b, "\nreplace (\n%s\n)\n", strings.Join(replaces, "\n"))
	}
	// A go.sum from an earlier, different go.mod is harmless: -mod=mod adds what is missing.
	return os.WriteFile(filepath.Join(dir, "go.mod"), []byte(b.String()), 0o644)
}

func buildKube(ctx context.Context, cache, outDir string) error {
	src := filepath.Join(cache, "src", "kubernetes-"+KubernetesVersion)
	logPath := filepath.Join(cache, "logs", "build-kubernetes.log")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return err
	}
	// go mod download needs some module to run in; a minimal one is enough for this step.
	if _, err := os.Stat(filepath.Join(src, "go.mod")); err != nil {
		if err := writeThrowawayModule(src, "tessera.local/k8sbuild", "k8s.io/kubernetes", KubernetesVersion, nil); err != nil {
			return err
		}
	}
	replaces, err := localReplaces(ctx, src, "k8s.io/kubernetes", KubernetesVersion, StagingVersion)
	if err != nil {
		return err
	}
	if len(replaces) < 20 {
		return fmt.Errorf("found only %d staging modules in k8s.io/kubernetes@%s's go.mod", len(replaces), KubernetesVersion)
	}
	if err := writeThrowawayModule(src, "tessera.local/k8sbuild", "k8s.io/kubernetes", KubernetesVersion, replaces); err != nil {
		return err
	}
	minor := strings.Split(strings.TrimPrefix(KubernetesVersion, "v"), ".")
	ldflags := []string{"-s", "-w"}
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		ldflags = append(ldflags,
			"-X", pkg+".gitVersion="+KubernetesVersion,
			"-X", pkg+".gitMajor="+minor[0],
			"-X", pkg+".gitMinor="+minor[1],
			"-X", pkg+".gitTreeState=clean",
		)
	}
	args := []string{"build", "-o", outDir + "/", "-ldflags", strings.Join(ldflags, " ")}
	for _, c := range kubeCommands {
		args = append(args, "k8s.io/kubernetes/cmd/"+c)
	}
	return goCmd(ctx, src, logPath, nil, args...)
}

func buildEtcd(ctx context.Context, cache, outDir string) error {
	src := filepath.Join(cache, "src", "etcd-"+EtcdVersion)
	logPath := filepath.Join(cache, "logs", "build-etcd.log")
	const mod = "go.etcd.io/etcd/server/v3"
	if err := writeThrowawayModule(src, "tessera.local/etcdbuild", mod, EtcdVersion, nil); err != nil {
		return err
	}
	replaces, err := localReplaces(ctx, src, mod, EtcdVersion, EtcdVersion)
	if err != nil {
		return err
	}
	if err := writeThrowawayModule(src, "tessera.local/etcdbuild", mod, EtcdVersion, replaces); err != nil {
		return err
	}
	return goCmd(ctx, src, logPath, nil, "build", "-o", filepath.Join(outDir, "etcd"), "-ldflags", "-s -w", mod)
}

func buildContainerd(ctx context.Context, cache, outDir string) error {
	logPath := filepath.Join(cache, "logs", "build-containerd.log")
	args := []string{"install", "-ldflags", "-s -w"}
	for _, c := range containerdCommands {
		args = append(args, "github.com/containerd/containerd/v2/cmd/"+c+"@"+ContainerdVersion)
	}
	// go install pkg@version ignores any go.mod, so it runs in the cache directory.
	return goCmd(ctx, cache, logPath, []string{"GOBIN=" + outDir, "GOFLAGS=-buildvcs=false"}, args...)
}

// tailFile returns the last n lines of a file (or a note that it cannot be read).
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
