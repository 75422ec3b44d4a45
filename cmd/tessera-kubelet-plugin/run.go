package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/dra"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/profile"
	"github.com/tessera-gpu/tessera/telemetry"
	"github.com/tessera-gpu/tessera/telemetry/startup"
)

// version is stamped at build time (-ldflags "-X main.version=…").
var version = "dev"

type options struct {
	backend             backend.Options
	kubeconfig          string
	nodeName            string
	registryDir         string
	pluginsDir          string
	cdiDir              string
	stateDir            string
	configFile          string
	metricsAddress      string
	telemetry           telemetry.Flags
	driverRoot          string
	hostDriverRoot      string
	containerDriverRoot string
	devRoot             string
	procRoot            string
	hookPath            string
	sysfsRoot           string
	qps                 float32
	burst               int
	podUID              string
	resync              time.Duration
	healthProbe         time.Duration
	mpsRoot             string
	migManager          bool
	migManagerDir       string
}

func (o *options) addFlags(fs *pflag.FlagSet) {
	o.backend.AddFlags(fs)
	fs.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the API server (default: $KUBECONFIG, else the in-cluster config)")
	fs.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "the node this plugin serves (env NODE_NAME); required")
	fs.StringVar(&o.registryDir, "kubelet-registry-dir", kubeletplugin.KubeletRegistryDir, "where the kubelet looks for plugin registration sockets")
	fs.StringVar(&o.pluginsDir, "kubelet-plugins-dir", kubeletplugin.KubeletPluginsDir, "where plugins keep their sockets; the DRA socket is in <dir>/"+dra.DriverName)
	fs.StringVar(&o.cdiDir, "cdi-dir", cdi.DefaultSpecDir, "where the container runtime reads CDI specs; the per-claim specs go there")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/tessera/dra", "persistent directory for the claim checkpoints and GPU lock files")
	fs.StringVar(&o.configFile, "config-file", "", "the mounted profile ConfigMap (a directory: the node label tessera.dev/sharing-profile or nvidia.com/device-plugin.config picks the key, else \"default\", as for the device plugin) or one profile file; watched for changes. Without it every GPU is DRA's: whole, or its existing MIG devices when MIG mode is on")
	fs.StringVar(&o.metricsAddress, "metrics-address", "", "host:port to serve /metrics and /healthz on (empty: off)")
	fs.StringVar(&o.driverRoot, "driver-root", "/", "host directory the driver's files are installed under (/run/nvidia/driver under the GPU operator); simulated nodes: the simulator's host")
	fs.StringVar(&o.hostDriverRoot, "host-driver-root", "", "the driver root's path on the host when this process sees it at --driver-root (a container that mounts the host's driver root there); CDI specs name host paths under it (default: --driver-root)")
	fs.StringVar(&o.containerDriverRoot, "container-driver-root", "/", "where containers see the driver root")
	fs.StringVar(&o.devRoot, "dev-root", "/dev", "host directory holding the NVIDIA device nodes")
	fs.StringVar(&o.procRoot, "proc-root", "/proc", "host procfs")
	fs.StringVar(&o.hookPath, "cdi-hook-path", cdi.DefaultHookPath, "nvidia-cdi-hook as the container runtime sees it; simulated nodes: the simulator's stand-in")
	fs.StringVar(&o.sysfsRoot, "sysfs-root", "", "host sysfs, for the PCIe root complex of each GPU (default /sys; simulated nodes: the simulator's)")
	fs.Float32Var(&o.qps, "kube-api-qps", 500, "API client queries per second: one claim GET per prepare and one status write per claim, so keep it above the node's claim rate")
	fs.IntVar(&o.burst, "kube-api-burst", 1000, "API client burst")
	fs.StringVar(&o.podUID, "pod-uid", os.Getenv("POD_UID"), "this plugin pod's UID (env POD_UID, from the downward API): enables rolling updates, two instances serving side by side")
	fs.StringVar(&o.mpsRoot, "mps-root", mps.DefaultRoot, "directory of the MPS daemons' pipes, logs and state (shared GPUs with isolation mps); the same as the device plugin's")
	fs.DurationVar(&o.resync, "resync-interval", 30*time.Second, "how often the node's GPUs are read again (MIG devices made or removed outside the driver)")
	o.telemetry.AddFlags(fs)
	fs.BoolVar(&o.migManager, "mig-manager", true, "follow the MIG manager's handshake (tessera mig manager): devices a MIG layout change touches are withdrawn while it runs, and after a reboot the managed GPUs' devices until the manager has applied its layout again; without a manager on the node nothing is withdrawn")
	fs.StringVar(&o.migManagerDir, "mig-manager-dir", "", "the MIG manager's handshake directory (default "+miggate.DefaultDir+"; simulated nodes: <sim state dir>/mig-manager); the same as the manager's and the device plugin's")
	fs.DurationVar(&o.healthProbe, "health-probe-interval", 10*time.Second, "how often unhealthy GPUs are probed for recovery")
}

func restConfig(o options) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if o.kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("API client configuration: %w", err)
	}
	cfg.QPS, cfg.Burst = o.qps, o.burst
	cfg.UserAgent = "tessera-kubelet-plugin/" + version
	return cfg, nil
}

// defaultProfile is used without --config-file: every GPU belongs to DRA, whole, or as its existing
// MIG devices when MIG mode is on.
const defaultProfile = `apiVersion: tessera.dev/v1alpha1
kind: SharingProfile
spec:
  defaults: {owner: dra, mode: whole}
  rules:
    - name: mig-on
      selector: {migEnabled: true}
      owner: dra
      mode: mig-static
      mig: {layout: existing}
`

// run serves until ctx ends. started, if not nil, is called once the first slices are published.
func run(ctx context.Context, o options, started func(*dra.Driver)) error {
	phases := startup.New()
	logger := klog.FromContext(ctx)
	if o.nodeName == "" {
		return errors.New("--node-name (or NODE_NAME) is required")
	}
	if err := o.telemetry.Validate(); err != nil {
		return err
	}
	o.backend.DriverRoot = o.driverRoot
	lib, node, err := o.backend.Open()
	if err != nil {
		return err
	}
	defer lib.Shutdown()
	phases.Mark("nvml")
	cfg, err := restConfig(o)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	// Claim status writes get their own client (and rate limiter): they never delay a Prepare's GET.
	statusClient, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	phases.Mark("api-clients")

	bootIDFn := backend.BootIDFunc(nil)
	smi := filepath.Join(o.driverRoot, "usr/bin/nvidia-smi")
	mpsOpts := []mps.Option{mps.WithRoot(o.mpsRoot), mps.WithDriverRoot(o.driverRoot)}
	if node != nil {
		h := node.Host()
		mpsOpts = []mps.Option{mps.WithRoot(o.mpsRoot), mps.ForSimulatedHost(h)}
		r := cdi.Roots{Driver: o.driverRoot, Dev: o.devRoot, Proc: o.procRoot, Hook: o.hookPath}.OnSimulatedHost(h)
		o.driverRoot, o.devRoot, o.procRoot, o.hookPath = r.Driver, r.Dev, r.Proc, r.Hook
		smi = h.ToolPath("nvidia-smi")
		bootIDFn = backend.BootIDFunc(node)
		if o.sysfsRoot == "" {
			o.sysfsRoot = h.SysRoot()
		}
	}
	if o.sysfsRoot == "" {
		o.sysfsRoot = "/sys"
	}
	sys, err := lib.System()
	if err != nil {
		return err
	}
	gen, err := cdi.New(cdi.WithDriverRoot(o.driverRoot), cdi.WithHostDriverRoot(o.hostDriverRoot), cdi.WithContainerDriverRoot(o.containerDriverRoot),
		cdi.WithDevRoot(o.devRoot), cdi.WithProcRoot(o.procRoot), cdi.WithSpecDir(o.cdiDir),
		cdi.WithHookPath(o.hookPath), cdi.WithDriverVersion(sys.DriverVersion))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.cdiDir, 0o755); err != nil {
		return err
	}
	events := profile.NewNodeEvents(client, o.nodeName, "tessera-kubelet-plugin")
	defer events.Shutdown()

	// The sharing profile: the file, watched; or the built-in default.
	gpus := func(ctx context.Context) ([]api.GPUInfo, error) { return profile.GPUsFromNVML(ctx, lib) }
	var watcher *profile.Watcher
	var res *api.Resolution
	if o.configFile != "" {
		popts := profile.Options{Dir: filepath.Dir(o.configFile), DefaultProfile: filepath.Base(o.configFile), Events: events, GPUs: gpus}
		if st, err := os.Stat(o.configFile); err == nil && st.IsDir() {
			// The mounted ConfigMap: the node's label picks the profile, as for the device plugin,
			// so both front ends always agree on which GPUs are whose.
			labels, err := profile.WatchNodeLabels(ctx, client, o.nodeName, 30*time.Second)
			if err != nil {
				return err
			}
			popts = profile.Options{Dir: o.configFile, Labels: labels, Events: events, GPUs: gpus}
		}
		watcher, err = profile.NewWatcher(popts)
		if err != nil {
			return err
		}
		cur, _, err := watcher.Reload(ctx)
		if cur == nil {
			return fmt.Errorf("sharing profile %s: %w", o.configFile, err)
		}
		res = cur.Resolution
	} else {
		p, err := api.ParseProfile([]byte(defaultProfile))
		if err != nil {
			return err
		}
		g, err := gpus(ctx)
		if err != nil {
			return err
		}
		if res, err = api.Resolve(p.Profile, g); err != nil {
			return err
		}
	}
	// One boot ID for the driver and the MIG manager's handshake. The follower reads the plan now,
	// before the first publish, so that a plan of an earlier boot holds the managed GPUs' devices
	// from the very first slices.
	bootID, err := bootIDFn()
	if err != nil {
		return err
	}
	var gate *miggate.Follower
	if o.migManager {
		dir := backend.MIGGateDir(o.migManagerDir, node, miggate.DefaultDir)
		gate = miggate.NewFollower(dir, miggate.FrontEndDRA, bootID)
		logger.Info("Following the MIG manager's handshake", "dir", dir, "holds", miggate.FormatHolds(gate.Holds()))
	}
	phases.Mark("profile")
	policy, err := dra.HealthPolicy(res.Health)
	if err != nil {
		return fmt.Errorf("sharing profile health settings: %w", err)
	}
	monitor := health.NewMonitor(lib, policy, health.WithProbeInterval(o.healthProbe))

	dopts := []dra.Option{
		dra.WithNodeName(o.nodeName), dra.WithKubeClient(client), dra.WithStatusClient(statusClient), dra.WithStateDir(o.stateDir), dra.WithCDI(gen),
		dra.WithBootID(func() (string, error) { return bootID, nil }), dra.WithTimeSlicer(dra.NvidiaSMI{Path: smi}), dra.WithEvents(events),
		dra.WithHealth(monitor), dra.WithVersion(version), dra.WithSysfsRoot(o.sysfsRoot), dra.WithResyncInterval(o.resync),
		dra.WithMPS(mps.NewManager(lib, mpsOpts...)), dra.WithStartup(phases),
	}
	if gate != nil {
		dopts = append(dopts, dra.WithMIGGate(gate))
	}
	d, err := dra.New(ctx, lib, dopts...)
	if err != nil {
		return err
	}
	phases.Mark("checkpoints")
	if err := d.SetResolution(ctx, res); err != nil {
		return err
	}
	phases.Mark("inventory")
	pluginDir := filepath.Join(o.pluginsDir, dra.DriverName)
	if err := os.MkdirAll(pluginDir, 0o750); err != nil {
		return err
	}
	hopts := []kubeletplugin.Option{
		kubeletplugin.RegistrarDirectoryPath(o.registryDir),
		kubeletplugin.PluginDataDirectoryPath(pluginDir),
	}
	if o.podUID != "" {
		hopts = append(hopts, kubeletplugin.RollingUpdate(types.UID(o.podUID)))
	}
	if err := d.Start(ctx, hopts...); err != nil {
		return err
	}
	defer d.Stop()
	inv := d.Inventory()
	logger.Info("Serving the kubelet", "driver", dra.DriverName, "node", o.nodeName, "version", version,
		"devices", len(inv.Devices), "skippedGPUs", len(inv.Skipped), "bootID", d.BootID())

	if watcher != nil {
		go func() {
			_ = watcher.Run(ctx, func(cur *profile.Current) {
				if err := d.SetResolution(ctx, cur.Resolution); err != nil {
					logger.Error(err, "Applying the sharing profile")
				}
			})
		}()
	}
	if o.metricsAddress != "" {
		// GPU telemetry is exported only where it is scraped.
		reg := prometheus.NewRegistry()
		sampler, err := o.telemetry.Start(ctx, lib, "dra", d.TelemetrySource(), client, o.nodeName, func(to *telemetry.Options) {
			to.LastXIDs, to.OnIdleChange = monitor.LastXIDs, d.IdleChanged
		})
		if err != nil {
			return fmt.Errorf("telemetry: %w", err)
		}
		if sampler != nil {
			reg.MustRegister(sampler)
		}
		if watcher != nil {
			reg.MustRegister(telemetry.ProfileReloads("dra", watcher.Reloads))
		}
		reg.MustRegister(phases.Collector("dra"))
		own := func(context.Context) []byte {
			var b bytes.Buffer
			d.Metrics().WriteText(&b)
			return b.Bytes()
		}
		// In a rolling update (--pod-uid) on the host network, the instance being replaced holds
		// the port until it goes: wait for it rather than fail.
		wait := time.Duration(0)
		if o.podUID != "" {
			wait = time.Second
		}
		// The server stops when run returns, fatal driver error included.
		mctx, mcancel := context.WithCancel(ctx)
		defer mcancel()
		if _, err := telemetry.ServeWaiting(mctx, o.metricsAddress, telemetry.Handler(own, reg), wait); err != nil {
			return err
		}
		phases.Mark("metrics")
	}
	// One line says where start-up went, from main (after flag parsing) to serving; the process's
	// own start before main (loading the executable, package initialisation) is not in it.
	logger.Info("Started", "mainStarted", phases.Started().UTC().Format(time.RFC3339Nano), "total", phases.Total(),
		"phases", phases.String())
	if started != nil {
		started(d)
	}
	var err2 error
	select {
	case <-ctx.Done():
	case <-d.Done():
		err2 = errors.New("the driver stopped after a fatal error (see the log)")
	}
	logger.Info("Shutting down")
	return err2
}
