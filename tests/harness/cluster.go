// Package harness runs a real, local Kubernetes cluster for Tessera's tests and demo: etcd,
// kube-apiserver, kube-scheduler, kube-controller-manager, a kubelet with containerd and runc (the
// "real node", named localhost) and any number of simulated nodes (Node objects without a kubelet).
// Everything is built from the Go module proxy into a cache outside the repository, listens on
// 127.0.0.1 only, and keeps its state in one directory that Down can clean up from any process.
package harness

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// RealNodeName is the name of the node that runs a kubelet.
const RealNodeName = "localhost"

// HostDevicePluginDir is where the kubelet looks for device plugin sockets whatever its root dir
// (the path is compiled in). The harness bind-mounts Cluster.DevicePluginDir there while the
// cluster runs, so device plugins under test can use either path.
const HostDevicePluginDir = "/var/lib/kubelet/device-plugins"

// Component names; each is a host process with a log file <state>/logs/<name>.log and a PID file
// <state>/pids/<name>.pid.
const (
	Etcd              = "etcd"
	APIServer         = "kube-apiserver"
	Scheduler         = "kube-scheduler"
	ControllerManager = "kube-controller-manager"
	Containerd        = "containerd"
	Kubelet           = "kubelet"
)

// components in start order; Stop goes the other way, kubelet first.
var components = []string{Etcd, APIServer, Scheduler, ControllerManager, Containerd, Kubelet}

// Options configures Start. The zero value works.
type Options struct {
	// StateDir holds everything of the cluster (etcd data, certificates, kubelet root, containerd
	// root, logs, PID files). Empty means DefaultStateDir().
	StateDir string
	// CacheDir holds the built binaries and images. Empty means DefaultCacheDir().
	CacheDir string
	// Fresh stops any cluster running from StateDir and wipes it first. Without it, Start reuses a
	// healthy cluster running from StateDir.
	Fresh bool
	// Ports overrides the loopback ports; zero fields take DefaultPorts.
	Ports Ports
	// FeatureGates are passed to every component, on top of DefaultFeatureGates.
	FeatureGates map[string]bool
	// PodSubnet and Bridge configure the CNI bridge on the real node.
	PodSubnet string
	Bridge    string
	// ComponentQPS is the client QPS of kube-scheduler and kube-controller-manager (burst is
	// twice that). Default 500, well above the upstream defaults (50 and 20), so scale runs
	// measure scheduling rather than client throttling.
	ComponentQPS int
	// Verbosity is the components' -v level (default 2).
	Verbosity int
	// Log receives progress lines; nil means os.Stderr.
	Log io.Writer
	// NoSignalHandler skips installing the SIGINT/SIGTERM handler that stops the cluster.
	NoSignalHandler bool
	// StartTimeout bounds the wait for each component (default 2 minutes).
	StartTimeout time.Duration
}

// DefaultStateDir is $TESSERA_STATE, else $HOME/.cache/tessera/cluster.
func DefaultStateDir() string {
	if d := os.Getenv("TESSERA_STATE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "tessera", "cluster")
}

// Cluster is a running local cluster. Its exported paths are where host processes (Tessera's
// device plugin and DRA driver under test) find the kubelet and containerd.
type Cluster struct {
	StateDir string
	CacheDir string
	// Kubeconfig is an admin kubeconfig (<state>/kubeconfig).
	Kubeconfig string
	// PluginKubeconfig is a kubeconfig for host processes such as our plugins.
	PluginKubeconfig string
	// Server is the apiserver URL.
	Server string
	// NodeName is the real node's name (RealNodeName).
	NodeName string
	// KubeletRootDir is the kubelet's --root-dir.
	KubeletRootDir string
	// DevicePluginDir is where device plugins put their socket (<kubelet-root>/device-plugins). It
	// is bind-mounted on HostDevicePluginDir, where the kubelet really looks.
	DevicePluginDir string
	// PluginRegistryDir is the kubelet's plugin registration dir (<kubelet-root>/plugins_registry).
	PluginRegistryDir string
	// PluginsDir is where DRA kubelet plugins put their sockets (<kubelet-root>/plugins).
	PluginsDir string
	// CDIDir is the directory containerd reads CDI specs from.
	CDIDir string
	// ContainerdSocket is containerd's gRPC socket (CRI and ctr).
	ContainerdSocket string
	// PodLogsDir is the kubelet's podLogsDir; container output is readable here without exec.
	PodLogsDir string
	// LogDir holds one log file per component and host process.
	LogDir       string
	Ports        Ports
	FeatureGates map[string]bool
	Binaries     *Binaries

	opts      Options
	log       *logger
	pki       *pki
	runcPath  string
	cniBinDir string

	mu        sync.Mutex
	procs     map[string]*proc
	specs     map[string]procSpec
	hostProcs []string
	stopped   bool
	stopOnce  sync.Once
	stopErr   error
	sigCh     chan os.Signal
	config    *rest.Config
	client    kubernetes.Interface
	// Reused is true when Start found the cluster already running.
	Reused bool
}

// savedState is <state>/cluster.json: what another process needs to use, restart or stop the
// cluster.
type savedState struct {
	Ports        Ports               `json:"ports"`
	FeatureGates map[string]bool     `json:"featureGates"`
	PodSubnet    string              `json:"podSubnet"`
	Bridge       string              `json:"bridge"`
	CacheDir     string              `json:"cacheDir"`
	Binaries     *Binaries           `json:"binaries"`
	Specs        map[string]procSpec `json:"specs"`
	HostProcs    []string            `json:"hostProcs,omitempty"`
}

func (o Options) withDefaults() Options {
	if o.StateDir == "" {
		o.StateDir = DefaultStateDir()
	}
	if abs, err := filepath.Abs(o.StateDir); err == nil {
		o.StateDir = abs
	}
	if o.CacheDir == "" {
		o.CacheDir = DefaultCacheDir()
	}
	if abs, err := filepath.Abs(o.CacheDir); err == nil {
		o.CacheDir = abs
	}
	o.Ports = o.Ports.withDefaults()
	gates := map[string]bool{}
	for k, v := range DefaultFeatureGates {
		gates[k] = v
	}
	for k, v := range o.FeatureGates {
		gates[k] = v
	}
	o.FeatureGates = gates
	if o.PodSubnet == "" {
		o.PodSubnet = "10.213.0.0/24"
	}
	if o.Bridge == "" {
		o.Bridge = "tessera0"
	}
	if o.ComponentQPS == 0 {
		o.ComponentQPS = 500
	}
	if o.Verbosity == 0 {
		o.Verbosity = 2
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	return o
}

func newCluster(o Options) *Cluster {
	kubeletRoot := filepath.Join(o.StateDir, "kubelet")
	return &Cluster{
		StateDir:          o.StateDir,
		CacheDir:          o.CacheDir,
		Kubeconfig:        filepath.Join(o.StateDir, "kubeconfig"),
		PluginKubeconfig:  filepath.Join(o.StateDir, "kubeconfigs", "plugins.kubeconfig"),
		Server:            fmt.Sprintf("https://127.0.0.1:%d", o.Ports.APIServer),
		NodeName:          RealNodeName,
		KubeletRootDir:    kubeletRoot,
		DevicePluginDir:   filepath.Join(kubeletRoot, "device-plugins"),
		PluginRegistryDir: filepath.Join(kubeletRoot, "plugins_registry"),
		PluginsDir:        filepath.Join(kubeletRoot, "plugins"),
		CDIDir:            filepath.Join(o.StateDir, "cdi"),
		ContainerdSocket:  filepath.Join(o.StateDir, "containerd", "containerd.sock"),
		PodLogsDir:        filepath.Join(o.StateDir, "logs", "pods"),
		LogDir:            filepath.Join(o.StateDir, "logs"),
		Ports:             o.Ports,
		FeatureGates:      o.FeatureGates,
		opts:              o,
		log:               newLogger(o.Log),
		procs:             map[string]*proc{},
		specs:             map[string]procSpec{},
	}
}

// Start brings up a cluster (building what is missing first) and waits until the apiserver is
// ready, the real node is Ready and schedulable, and the default ServiceAccount exists. When a
// healthy cluster already runs from the same state dir and opts.Fresh is false, it is reused.
// Unless opts.NoSignalHandler, SIGINT and SIGTERM stop the cluster and exit the process; call
// Detach to leave the cluster running after the process exits.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	o := opts.withDefaults()
	c := newCluster(o)
	t0 := time.Now()
	if !o.Fresh {
		if rc, err := attach(ctx, o); err == nil {
			rc.log.Printf("reusing the cluster running from %s (checked in %s)", o.StateDir, time.Since(t0).Round(time.Millisecond))
			if featureGateFlag(rc.FeatureGates) != featureGateFlag(o.FeatureGates) {
				rc.log.Printf("note: it runs with feature gates %s, not the requested %s; stop it first to change them",
					featureGateFlag(rc.FeatureGates), featureGateFlag(o.FeatureGates))
			}
			if !o.NoSignalHandler {
				rc.installSignalHandler()
			}
			return rc, nil
		} else if !errors.Is(err, errNotRunning) {
			c.log.Printf("the cluster in %s is not healthy (%v); starting a new one", o.StateDir, err)
		}
	}
	if err := Down(o.StateDir, io.Discard); err != nil {
		return nil, fmt.Errorf("clean up %s: %w", o.StateDir, err)
	}
	if err := wipeStateDir(o.StateDir); err != nil {
		return nil, err
	}
	if err := checkPortsFree(o.Ports); err != nil {
		return nil, err
	}
	if err := c.checkHostTools(); err != nil {
		return nil, err
	}
	bins, err := EnsureBinaries(ctx, BuildOptions{CacheDir: o.CacheDir, Log: c.log.w})
	if err != nil {
		return nil, err
	}
	c.Binaries = bins
	images, err := ensureImages(ctx, o.CacheDir, c.log)
	if err != nil {
		return nil, err
	}
	if !o.NoSignalHandler {
		c.installSignalHandler()
	}
	c.log.Printf("starting cluster in %s", o.StateDir)
	if err := c.start(ctx, images); err != nil {
		c.log.Printf("start failed: %v", err)
		c.DumpDiagnostics(c.log.w)
		c.Stop()
		return nil, err
	}
	c.log.Printf("cluster ready in %s: node %q Ready, KUBECONFIG=%s", time.Since(t0).Round(100*time.Millisecond), c.NodeName, c.Kubeconfig)
	return c, nil
}

var errNotRunning = errors.New("no cluster running")

// Attach returns the healthy cluster running from opts.StateDir without starting anything, and
// without a signal handler.
func Attach(ctx context.Context, opts Options) (*Cluster, error) {
	o := opts.withDefaults()
	c, err := attach(ctx, o)
	if errors.Is(err, errNotRunning) {
		return nil, fmt.Errorf("no cluster running from %s", o.StateDir)
	}
	return c, err
}

// attach returns the cluster running from o.StateDir if every component is alive and the
// apiserver is ready.
func attach(ctx context.Context, o Options) (*Cluster, error) {
	st, err := loadState(o.StateDir)
	if err != nil {
		return nil, errNotRunning
	}
	anyAlive, allAlive := false, true
	for _, name := range components {
		pid, start, err := readPIDFile(pidFilePath(o.StateDir, name))
		if err == nil && pidAlive(pid, start) {
			anyAlive = true
		} else {
			allAlive = false
		}
	}
	if !anyAlive {
		return nil, errNotRunning
	}
	if !allAlive {
		return nil, errors.New("some components are not running")
	}
	o.Ports = st.Ports
	o.FeatureGates = st.FeatureGates
	o.PodSubnet = st.PodSubnet
	o.Bridge = st.Bridge
	c := newCluster(o)
	c.Binaries = st.Binaries
	c.specs = st.Specs
	c.hostProcs = st.HostProcs
	c.Reused = true
	for _, name := range append(append([]string{}, components...), st.HostProcs...) {
		if pid, start, err := readPIDFile(pidFilePath(o.StateDir, name)); err == nil {
			c.procs[name] = &proc{spec: st.Specs[name], pid: pid, start: start,
				logPath: logFilePath(o.StateDir, name), pidPath: pidFilePath(o.StateDir, name)}
		}
	}
	if err := c.initClient(); err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.apiReady(cctx); err != nil {
		return nil, fmt.Errorf("apiserver not ready: %w", err)
	}
	return c, nil
}

func loadState(stateDir string) (*savedState, error) {
	data, err := os.ReadFile(filepath.Join(stateDir, "cluster.json"))
	if err != nil {
		return nil, err
	}
	var st savedState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

func (c *Cluster) saveState() error {
	c.mu.Lock()
	st := savedState{
		Ports: c.Ports, FeatureGates: c.FeatureGates, PodSubnet: c.opts.PodSubnet, Bridge: c.opts.Bridge,
		CacheDir: c.CacheDir, Binaries: c.Binaries, Specs: c.specs, HostProcs: c.hostProcs,
	}
	c.mu.Unlock()
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(c.StateDir, "cluster.json.tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(c.StateDir, "cluster.json"))
}

// wipeStateDir removes a stopped cluster's state dir, refusing while anything is mounted below it.
func wipeStateDir(dir string) error {
	if dir == "/" || dir == "" {
		return fmt.Errorf("refusing to use %q as state dir", dir)
	}
	if mps, err := mountsUnder(dir); err != nil {
		return err
	} else if len(mps) > 0 {
		return fmt.Errorf("refusing to wipe %s: still mounted: %s", dir, strings.Join(mps, ", "))
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	return os.MkdirAll(dir, 0o755)
}

func checkPortsFree(p Ports) error {
	var busy []string
	for name, port := range p.list() {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			busy = append(busy, fmt.Sprintf("%d (%s)", port, name))
			continue
		}
		l.Close()
	}
	if len(busy) > 0 {
		sort.Strings(busy)
		return fmt.Errorf("ports in use on 127.0.0.1: %s; is another local cluster running? "+
			"stop it with `go run ./tests/cmd/localcluster down` (or pass other ports)", strings.Join(busy, ", "))
	}
	return nil
}

// checkHostTools finds the Debian-provided pieces: runc, the CNI plugins and gcc.
func (c *Cluster) checkHostTools() error {
	var missing []string
	if p, err := exec.LookPath("runc"); err == nil {
		c.runcPath = p
	} else if _, err := os.Stat("/usr/sbin/runc"); err == nil {
		c.runcPath = "/usr/sbin/runc"
	} else {
		missing = append(missing, "runc (Debian package runc)")
	}
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
			c.cniBinDir = d
			break
		}
	}
	if c.cniBinDir == "" {
		missing = append(missing, "CNI plugins (Debian package containernetworking-plugins)")
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		missing = append(missing, "gcc (Debian package gcc)")
	}
	if os.Geteuid() != 0 {
		missing = append(missing, "root (the kubelet, containerd and runc need it)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing on this machine: %s (see docs/testing.md)", strings.Join(missing, "; "))
	}
	return nil
}

func (c *Cluster) installSignalHandler() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sigCh != nil {
		return
	}
	c.sigCh = make(chan os.Signal, 2)
	signal.Notify(c.sigCh, os.Interrupt, syscall.SIGTERM)
	ch := c.sigCh
	go func() {
		sig, ok := <-ch
		if !ok {
			return
		}
		c.log.Printf("got %v: stopping the cluster in %s", sig, c.StateDir)
		c.Stop()
		os.Exit(130)
	}()
}

// Detach removes the signal handler: the cluster keeps running after this process exits (the
// CLI's `up` and `demo`). Stop it later with Down(stateDir).
func (c *Cluster) Detach() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sigCh != nil {
		signal.Stop(c.sigCh)
		close(c.sigCh)
		c.sigCh = nil
	}
}

func (c *Cluster) start(ctx context.Context, images []string) error {
	o := c.opts
	for _, d := range []string{c.LogDir, c.PodLogsDir, c.CDIDir, c.KubeletRootDir, filepath.Join(c.StateDir, "pids"),
		filepath.Join(c.StateDir, "etcd"), filepath.Join(c.StateDir, "containerd"), filepath.Join(c.StateDir, "kubeconfigs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	p, err := generatePKI(filepath.Join(c.StateDir, "pki"), net.IPv4(10, 0, 0, 1))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	c.pki = p
	kcfg := func(key, user string) string {
		return string(kubeconfig(c.Server, p.CACert, p.Tokens[key], user))
	}
	kc := func(name string) string { return filepath.Join(c.StateDir, "kubeconfigs", name+".kubeconfig") }
	for _, f := range []struct{ path, content string }{
		{c.Kubeconfig, kcfg("admin", "tessera-admin")},
		{kc(Scheduler), kcfg("kube-scheduler", "kube-scheduler")},
		{kc(ControllerManager), kcfg("kube-controller-manager", "kube-controller-manager")},
		{kc(Kubelet), kcfg("kubelet", "kubelet")},
		{c.PluginKubeconfig, kcfg("plugins", "tessera-plugins")},
		{filepath.Join(c.StateDir, "config", "containerd.toml"), c.containerdConfig()},
		{filepath.Join(c.StateDir, "cni", "net.d", "10-tessera.conflist"), c.cniConfig()},
		{filepath.Join(c.StateDir, "config", "kubelet.yaml"), c.kubeletConfig()},
		{filepath.Join(c.StateDir, "config", "kube-scheduler.yaml"), fmt.Sprintf(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: %s
  qps: %d
  burst: %d
leaderElection:
  leaderElect: false
`, kc(Scheduler), o.ComponentQPS, 2*o.ComponentQPS)},
	} {
		if err := writeFile(f.path, f.content); err != nil {
			return err
		}
	}
	gates := featureGateFlag(c.FeatureGates)
	v := "--v=" + strconv.Itoa(o.Verbosity)
	b := c.Binaries
	port := o.Ports
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", port.Etcd)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", port.EtcdPeer)
	c.specs = map[string]procSpec{
		Etcd: {Name: Etcd, Path: b.Etcd, Args: []string{
			"--name=tessera", "--data-dir=" + filepath.Join(c.StateDir, "etcd"),
			"--listen-client-urls=" + etcdURL, "--advertise-client-urls=" + etcdURL,
			"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=tessera=" + peerURL, "--unsafe-no-fsync", "--log-level=warn",
		}},
		APIServer: {Name: APIServer, Path: b.APIServer, Args: []string{
			"--etcd-servers=" + etcdURL,
			"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port.APIServer),
			"--endpoint-reconciler-type=none",
			"--tls-cert-file=" + p.APICert, "--tls-private-key-file=" + p.APIKey,
			"--token-auth-file=" + p.TokenFile,
			"--authorization-mode=Node,RBAC",
			"--service-account-issuer=https://kubernetes.default.svc", "--service-account-key-file=" + p.SAPub,
			"--service-account-signing-key-file=" + p.SAKey,
			"--service-cluster-ip-range=10.0.0.0/24",
			// No kube-proxy here: webhooks (and aggregated APIs) are reached at their endpoints'
			// pod IPs on the bridge, not at Service IPs.
			"--enable-aggregator-routing=true",
			"--enable-priority-and-fairness=false",
			"--allow-privileged=true",
			"--kubelet-preferred-address-types=Hostname,InternalIP",
			"--profiling=false",
			"--feature-gates=" + gates, v,
		}},
		Scheduler: {Name: Scheduler, Path: b.Scheduler, Args: []string{
			"--config=" + filepath.Join(c.StateDir, "config", "kube-scheduler.yaml"),
			"--authentication-kubeconfig=" + kc(Scheduler), "--authorization-kubeconfig=" + kc(Scheduler),
			"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port.Scheduler),
			"--cert-dir=" + filepath.Join(c.StateDir, "pki", Scheduler),
			"--feature-gates=" + gates, v,
		}},
		ControllerManager: {Name: ControllerManager, Path: b.ControllerManager, Args: []string{
			"--kubeconfig=" + kc(ControllerManager), "--authentication-kubeconfig=" + kc(ControllerManager), "--authorization-kubeconfig=" + kc(ControllerManager),
			"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port.ControllerManager),
			"--cert-dir=" + filepath.Join(c.StateDir, "pki", ControllerManager),
			"--service-account-private-key-file=" + p.SAKey, "--root-ca-file=" + p.CACert,
			"--use-service-account-credentials=true",
			"--kube-api-qps=" + strconv.Itoa(o.ComponentQPS), "--kube-api-burst=" + strconv.Itoa(2*o.ComponentQPS),
			// The harness manages node readiness taints itself so simulated nodes stay schedulable.
			"--controllers=*,-node-lifecycle-controller",
			"--leader-elect=false", "--feature-gates=" + gates, v,
		}},
		Containerd: {Name: Containerd, Path: b.Containerd, Args: []string{
			"--config=" + filepath.Join(c.StateDir, "config", "containerd.toml"), "--log-level=info",
		}, Env: []string{"PATH=" + strings.Join(append(append([]string{}, b.Dirs...), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"), ":")}},
		Kubelet: {Name: Kubelet, Path: b.Kubelet, Args: []string{
			"--config=" + filepath.Join(c.StateDir, "config", "kubelet.yaml"),
			"--kubeconfig=" + kc(Kubelet),
			"--hostname-override=" + RealNodeName,
			"--root-dir=" + c.KubeletRootDir,
			"--cert-dir=" + filepath.Join(c.KubeletRootDir, "pki"),
			v,
		}},
	}
	if err := c.saveState(); err != nil {
		return err
	}
	step := func(name string, fn func(context.Context) error) error {
		t := time.Now()
		sctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
		defer cancel()
		if err := fn(sctx); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		c.log.Printf("  %-28s ready after %s", name, time.Since(t).Round(10*time.Millisecond))
		return nil
	}
	if err := step("etcd", func(ctx context.Context) error {
		if err := c.startComponent(Etcd); err != nil {
			return err
		}
		return c.waitHTTP(ctx, Etcd, etcdURL+"/health", nil, "")
	}); err != nil {
		return err
	}
	if err := step("kube-apiserver", func(ctx context.Context) error {
		if err := c.startComponent(APIServer); err != nil {
			return err
		}
		if err := c.initClient(); err != nil {
			return err
		}
		return c.waitFor(ctx, APIServer, c.apiReady)
	}); err != nil {
		return err
	}
	// Three independent chains from here: the scheduler; the controller manager and the default
	// ServiceAccount it creates; containerd, the images, the kubelet and the node becoming Ready.
	insecure := &tls.Config{InsecureSkipVerify: true} // self-signed serving certs on loopback
	chains := []func() error{
		func() error {
			return step(Scheduler, func(ctx context.Context) error {
				if err := c.startComponent(Scheduler); err != nil {
					return err
				}
				return c.waitHTTP(ctx, Scheduler, fmt.Sprintf("https://127.0.0.1:%d/healthz", port.Scheduler), insecure, "")
			})
		},
		func() error {
			if err := step(ControllerManager, func(ctx context.Context) error {
				if err := c.startComponent(ControllerManager); err != nil {
					return err
				}
				return c.waitHTTP(ctx, ControllerManager, fmt.Sprintf("https://127.0.0.1:%d/healthz", port.ControllerManager), insecure, "")
			}); err != nil {
				return err
			}
			return step("default ServiceAccount", func(ctx context.Context) error {
				return c.waitFor(ctx, ControllerManager, func(ctx context.Context) error {
					_, err := c.client.CoreV1().ServiceAccounts("default").Get(ctx, "default", getOpts)
					return err
				})
			})
		},
		func() error {
			if err := step(Containerd, func(ctx context.Context) error {
				if err := c.startComponent(Containerd); err != nil {
					return err
				}
				if err := c.waitFor(ctx, Containerd, func(ctx context.Context) error {
					_, err := c.Ctr(ctx, "version")
					return err
				}); err != nil {
					return err
				}
				return c.importImages(ctx, images)
			}); err != nil {
				return err
			}
			if err := step(Kubelet, func(ctx context.Context) error {
				if err := c.bindDevicePluginDir(); err != nil {
					return err
				}
				if err := c.startComponent(Kubelet); err != nil {
					return err
				}
				return c.waitHTTP(ctx, Kubelet, fmt.Sprintf("http://127.0.0.1:%d/healthz", port.KubeletHealthz), nil, "")
			}); err != nil {
				return err
			}
			return step("node "+RealNodeName+" Ready", func(ctx context.Context) error {
				return c.waitFor(ctx, Kubelet, func(ctx context.Context) error { return c.markNodeSchedulable(ctx, RealNodeName, false) })
			})
		},
	}
	errs := make([]error, len(chains))
	var wg sync.WaitGroup
	for i, chain := range chains {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = chain()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// bindDevicePluginDir makes HostDevicePluginDir show the cluster's DevicePluginDir.
func (c *Cluster) bindDevicePluginDir() error {
	for _, d := range []string{c.DevicePluginDir, HostDevicePluginDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if isMountPoint(HostDevicePluginDir) {
		return fmt.Errorf("%s is already a mount point: is another local cluster running? (localcluster down --state <its dir>)", HostDevicePluginDir)
	}
	if err := syscall.Mount(c.DevicePluginDir, HostDevicePluginDir, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount %s on %s: %w", c.DevicePluginDir, HostDevicePluginDir, err)
	}
	return nil
}

func (c *Cluster) startComponent(name string) error {
	c.mu.Lock()
	spec, ok := c.specs[name]
	c.mu.Unlock()
	if !ok {
		return fmt.Errorf("no spec for %s", name)
	}
	p, err := startProc(c.StateDir, spec)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.procs[name] = p
	c.mu.Unlock()
	return nil
}

// waitFor polls fn until it succeeds, the context ends, or the process behind component exits.
func (c *Cluster) waitFor(ctx context.Context, component string, fn func(context.Context) error) error {
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		last = fn(cctx)
		cancel()
		if last == nil {
			return nil
		}
		c.mu.Lock()
		p := c.procs[component]
		c.mu.Unlock()
		if p != nil {
			if gone, err := p.exited(); gone {
				return fmt.Errorf("%s exited (%v); last lines of %s:\n%s", component, err, p.logPath, tailFile(p.logPath, 25))
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%v (last error: %v)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) waitHTTP(ctx context.Context, component, url string, tlsCfg *tls.Config, token string) error {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true}}
	return c.waitFor(ctx, component, func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
		}
		return nil
	})
}

func (c *Cluster) initClient() error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS = 1000
	cfg.Burst = 2000
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	c.config = cfg
	c.client = cs
	return nil
}

// apiReady checks the apiserver's /readyz.
func (c *Cluster) apiReady(ctx context.Context) error {
	body, err := c.client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(body)))
	}
	return nil
}

// Client returns a clientset with admin rights.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// RESTConfig returns a copy of the admin REST config.
func (c *Cluster) RESTConfig() *rest.Config { return rest.CopyConfig(c.config) }

// CACertPool returns the pool with the cluster's CA (for hand-made TLS clients).
func (c *Cluster) CACertPool() (*x509.CertPool, error) {
	data, err := os.ReadFile(filepath.Join(c.StateDir, "pki", "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(data)
	return pool, nil
}

// Ctr runs ctr against the cluster's containerd in the k8s.io namespace and returns its output.
func (c *Cluster) Ctr(ctx context.Context, args ...string) (string, error) {
	return runCtr(ctx, c.Binaries.Ctr, c.ContainerdSocket, args...)
}

func runCtr(ctx context.Context, ctrPath, socket string, args ...string) (string, error) {
	full := append([]string{"--address", socket, "--namespace", "k8s.io"}, args...)
	cmd := exec.CommandContext(ctx, ctrPath, full...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

func (c *Cluster) importImages(ctx context.Context, archives []string) error {
	for _, a := range archives {
		if _, err := c.Ctr(ctx, "images", "import", a); err != nil {
			return err
		}
	}
	for _, ref := range []string{PauseImage, BusyboxImage} {
		// Pinned images are never garbage collected by the kubelet.
		if _, err := c.Ctr(ctx, "images", "label", ref, "io.cri-containerd.pinned=pinned"); err != nil {
			return err
		}
	}
	return nil
}

// LogFile returns the log file of a component or host process.
func (c *Cluster) LogFile(name string) string { return logFilePath(c.StateDir, name) }

// RestartComponent stops one component by PID and starts it again with the same flags, then
// waits until it is healthy again (for the kubelet: healthz and node Ready).
func (c *Cluster) RestartComponent(ctx context.Context, name string) error {
	c.mu.Lock()
	p := c.procs[name]
	spec, ok := c.specs[name]
	c.mu.Unlock()
	if !ok {
		return fmt.Errorf("unknown component %q", name)
	}
	if p != nil {
		stopPID(p.pid, p.start, 20*time.Second)
	}
	restarted := time.Now()
	if _, err := startProc(c.StateDir, spec); err != nil {
		return err
	}
	if _, err := c.reloadProc(name); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.StartTimeout)
	defer cancel()
	switch name {
	case Kubelet:
		if err := c.waitHTTP(ctx, name, fmt.Sprintf("http://127.0.0.1:%d/healthz", c.Ports.KubeletHealthz), nil, ""); err != nil {
			return err
		}
		// The node object still says Ready from before: wait for the new kubelet's first lease
		// renewal, then for Ready.
		if err := c.waitFor(ctx, name, func(ctx context.Context) error {
			lease, err := c.client.CoordinationV1().Leases("kube-node-lease").Get(ctx, RealNodeName, getOpts)
			if err != nil {
				return err
			}
			if lease.Spec.RenewTime == nil || lease.Spec.RenewTime.Time.Before(restarted) {
				return fmt.Errorf("node lease not renewed since the restart")
			}
			return nil
		}); err != nil {
			return err
		}
		return c.waitFor(ctx, name, func(ctx context.Context) error { return c.markNodeSchedulable(ctx, RealNodeName, false) })
	case APIServer:
		return c.waitFor(ctx, name, c.apiReady)
	case Etcd:
		return c.waitHTTP(ctx, name, fmt.Sprintf("http://127.0.0.1:%d/health", c.Ports.Etcd), nil, "")
	case Containerd:
		return c.waitFor(ctx, name, func(ctx context.Context) error { _, err := c.Ctr(ctx, "version"); return err })
	default:
		port := c.Ports.Scheduler
		if name == ControllerManager {
			port = c.Ports.ControllerManager
		}
		return c.waitHTTP(ctx, name, fmt.Sprintf("https://127.0.0.1:%d/healthz", port), &tls.Config{InsecureSkipVerify: true}, "")
	}
}

// reloadProc is a helper for RestartComponent: startProc already wrote the PID file; keep the
// handle so exits are noticed.
func (c *Cluster) reloadProc(name string) (*proc, error) {
	pid, start, err := readPIDFile(pidFilePath(c.StateDir, name))
	if err != nil {
		return nil, err
	}
	p := &proc{spec: c.specs[name], pid: pid, start: start, logPath: logFilePath(c.StateDir, name), pidPath: pidFilePath(c.StateDir, name)}
	c.mu.Lock()
	c.procs[name] = p
	c.mu.Unlock()
	return p, nil
}

// RestartKubelet restarts the real node's kubelet and waits until the node is Ready again.
func (c *Cluster) RestartKubelet(ctx context.Context) error { return c.RestartComponent(ctx, Kubelet) }

// Stop shuts the cluster down (kubelet and host processes first, then containers, containerd and
// the control plane), kills whatever is left, and unmounts everything under the state dir. It is
// safe to call more than once. The state dir (logs included) is kept until the next fresh Start.
func (c *Cluster) Stop() error {
	// Concurrent callers (the signal handler during a normal teardown) wait for the first.
	c.stopOnce.Do(func() {
		c.mu.Lock()
		c.stopped = true
		c.mu.Unlock()
		t := time.Now()
		c.stopErr = Down(c.StateDir, c.log.w)
		c.log.Printf("cluster stopped in %s", time.Since(t).Round(10*time.Millisecond))
	})
	return c.stopErr
}

// Down stops the cluster running from stateDir, whichever process started it: host processes and
// the kubelet first, then every container task through ctr, containerd and the control plane by
// PID (SIGTERM, then SIGKILL), then any process still tied to the state dir; finally it unmounts
// everything below stateDir and deletes the CNI bridge. Logs stay in <state>/logs.
func Down(stateDir string, logw io.Writer) error {
	if logw == nil {
		logw = os.Stderr
	}
	log := newLogger(logw)
	if abs, err := filepath.Abs(stateDir); err == nil {
		stateDir = abs
	}
	if _, err := os.Stat(stateDir); os.IsNotExist(err) {
		return nil
	}
	st, _ := loadState(stateDir)
	var binDirs []string
	ctrPath, bridge := "", ""
	if st != nil {
		if st.Binaries != nil {
			binDirs = st.Binaries.Dirs
			ctrPath = st.Binaries.Ctr
		}
		bridge = st.Bridge
	} else {
		cache := DefaultCacheDir()
		binDirs = []string{filepath.Join(cache, "bin")}
	}
	var errs []error
	stop := func(name string, grace time.Duration) {
		pid, start, err := readPIDFile(pidFilePath(stateDir, name))
		if err != nil || !pidAlive(pid, start) {
			return
		}
		log.Printf("stopping %s (pid %d)", name, pid)
		stopPID(pid, start, grace)
	}
	// The kubelet first, so nothing restarts containers; then our host processes (plugins).
	stop(Kubelet, 15*time.Second)
	hostPIDs, _ := filepath.Glob(filepath.Join(stateDir, "pids", hostProcPrefix+"*.pid"))
	for _, f := range hostPIDs {
		stop(strings.TrimSuffix(filepath.Base(f), ".pid"), 10*time.Second)
	}
	// Containers outlive containerd: kill every task while containerd still runs.
	socket := filepath.Join(stateDir, "containerd", "containerd.sock")
	if pid, start, err := readPIDFile(pidFilePath(stateDir, Containerd)); err == nil && pidAlive(pid, start) && ctrPath != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := runCtr(ctx, ctrPath, socket, "tasks", "list", "--quiet")
		if err == nil {
			ids := strings.Fields(out)
			if len(ids) > 0 {
				log.Printf("killing %d container tasks", len(ids))
			}
			for _, id := range ids {
				_, _ = runCtr(ctx, ctrPath, socket, "tasks", "kill", "--all", "--signal", "SIGKILL", id)
			}
			for _, id := range ids {
				for i := 0; i < 20; i++ {
					_, err := runCtr(ctx, ctrPath, socket, "tasks", "delete", "--force", id)
					if err == nil || strings.Contains(err.Error(), "not found") {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
		}
		cancel()
	}
	for _, name := range []string{Containerd, ControllerManager, Scheduler, APIServer, Etcd} {
		stop(name, 15*time.Second)
	}
	// Anything left: shims, container processes, components whose PID file was lost.
	for round := 0; round < 3; round++ {
		left := clusterProcesses(stateDir, binDirs)
		if len(left) == 0 {
			break
		}
		for _, p := range left {
			if round == 0 {
				log.Printf("killing leftover %s", p)
			}
			_ = syscall.Kill(p.PID, syscall.SIGKILL)
		}
		for _, p := range left {
			waitGone(p.PID, p.Start, 5*time.Second)
		}
	}
	if left := clusterProcesses(stateDir, binDirs); len(left) > 0 {
		var s []string
		for _, p := range left {
			s = append(s, p.String())
		}
		errs = append(errs, fmt.Errorf("processes still running: %s", strings.Join(s, "; ")))
	}
	if err := unmountAll(stateDir); err != nil {
		errs = append(errs, err)
	}
	if bridge != "" {
		if _, err := os.Stat(filepath.Join("/sys/class/net", bridge)); err == nil {
			if out, err := exec.Command("ip", "link", "delete", bridge).CombinedOutput(); err != nil {
				log.Printf("could not delete bridge %s: %v: %s", bridge, err, strings.TrimSpace(string(out)))
			}
		}
	}
	removeContainerLogLinks(stateDir)
	if len(errs) == 0 {
		removePodCgroups()
	}
	return errors.Join(errs...)
}

// removePodCgroups removes the empty cgroups the kubelet made under /kubepods in every cgroup v1
// hierarchy (and the unified one), deepest first. Cgroups that still hold processes stay.
func removePodCgroups() {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if _, err := os.Stat("/sys/fs/cgroup/kubepods"); err == nil {
		roots = append(roots, "/sys/fs/cgroup/kubepods")
	}
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(dirs[i])
		}
	}
}

// removeContainerLogLinks deletes the kubelet's symlinks in /var/log/containers (a path the kubelet
// does not let us move) that point into stateDir.
func removeContainerLogLinks(stateDir string) {
	entries, err := os.ReadDir("/var/log/containers")
	if err != nil {
		return
	}
	for _, e := range entries {
		p := filepath.Join("/var/log/containers", e.Name())
		if target, err := os.Readlink(p); err == nil && strings.HasPrefix(target, stateDir+"/") {
			_ = os.Remove(p)
		}
	}
}

// Leftovers lists what a stopped cluster left behind: live processes tied to stateDir and mounts
// below it. An empty result means the teardown was clean.
func Leftovers(stateDir string) ([]string, error) {
	if abs, err := filepath.Abs(stateDir); err == nil {
		stateDir = abs
	}
	var binDirs []string
	if st, err := loadState(stateDir); err == nil && st.Binaries != nil {
		binDirs = st.Binaries.Dirs
	} else {
		binDirs = []string{filepath.Join(DefaultCacheDir(), "bin")}
	}
	var out []string
	for _, p := range clusterProcesses(stateDir, binDirs) {
		out = append(out, "process "+p.String())
	}
	mps, err := mountsUnder(stateDir)
	if err != nil {
		return out, err
	}
	for _, m := range mps {
		out = append(out, "mount "+m)
	}
	return out, nil
}

// Running reports whether a cluster from stateDir has live processes.
func Running(stateDir string) bool {
	for _, name := range components {
		pid, start, err := readPIDFile(pidFilePath(stateDir, name))
		if err == nil && pidAlive(pid, start) {
			return true
		}
	}
	return false
}
