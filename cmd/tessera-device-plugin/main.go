// Command tessera-device-plugin is Tessera's kubelet device plugin: a drop-in replacement for
// NVIDIA's k8s-device-plugin (same resource names, same config files) that serves the GPUs the
// sharing profile gives to the device-plugin owner. See docs/device-plugin.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/health"
	"github.com/tessera-gpu/tessera/kubeclient"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/plugin"
	"github.com/tessera-gpu/tessera/profile"
	"github.com/tessera-gpu/tessera/telemetry"
)

const component = "tessera-device-plugin"

type options struct {
	backend             backend.Options
	configFile          string
	dir                 string
	cdiDir              string
	nodeName            string
	kubeconfig          string
	metricsAddress      string
	podResourcesSocket  string
	driverRoot          string
	hostDriverRoot      string
	containerDriverRoot string
	devRoot             string
	procRoot            string
	hookPath            string
	noHooks             bool
	mpsRoot             string
	mpsDaemons          string
	mpsMultiUser        bool
	replicaPolicy       string
	migPolicy           string
	probeInterval       time.Duration
	quietPeriod         time.Duration
	profileInterval     time.Duration
	migManager          bool
	migManagerDir       string
	telemetry           telemetry.Flags
}

func (o *options) addFlags(fs *pflag.FlagSet) {
	o.backend.AddFlags(fs)
	fs.StringVar(&o.configFile, "config-file", "", "a SharingProfile or NVIDIA device-plugin config (version: v1), or a directory of them (a mounted ConfigMap; the node label "+
		api.NodeLabelProfile+" or "+api.NodeLabelNVIDIAConfig+" picks one, else the key \"default\"). Edits are followed. Empty: every GPU whole as nvidia.com/gpu")
	fs.StringVar(&o.dir, "device-plugin-dir", pluginapi.DevicePluginPath, "where the kubelet's kubelet.sock is and the plugin's sockets go")
	fs.StringVar(&o.cdiDir, "cdi-dir", cdi.DefaultSpecDir, "where the CDI node spec is written")
	fs.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME); needed with --kubeconfig")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for node labels, label-selected profiles and Events (in a pod: \"in-cluster\"); without it the plugin runs from the config file alone")
	fs.StringVar(&o.metricsAddress, "metrics-address", "", "address to serve /metrics and /healthz on, e.g. 127.0.0.1:9400; empty: none")
	fs.StringVar(&o.podResourcesSocket, "pod-resources-socket", "auto", "the kubelet's PodResources socket, which says which devices are in use (auto: <kubelet root>/pod-resources/kubelet.sock, the kubelet root being the parent of --device-plugin-dir; none: no such socket, changes apply at once)")
	fs.StringVar(&o.driverRoot, "driver-root", "/", "host directory the NVIDIA driver is installed under (a simulated node: its host)")
	fs.StringVar(&o.hostDriverRoot, "host-driver-root", "", "the driver root's path on the host when this process sees it at --driver-root (a container that mounts the host's driver root there); CDI specs name host paths under it (default: --driver-root)")
	fs.StringVar(&o.containerDriverRoot, "container-driver-root", "/", "where containers see the driver root")
	fs.StringVar(&o.devRoot, "dev-root", "/dev", "host directory of the NVIDIA device nodes")
	fs.StringVar(&o.procRoot, "proc-root", "/proc", "host procfs")
	fs.StringVar(&o.hookPath, "hook-path", cdi.DefaultHookPath, "nvidia-cdi-hook as the container runtime sees it")
	fs.BoolVar(&o.noHooks, "no-hooks", false, "write no nvidia-cdi-hook hooks into the CDI spec")
	fs.StringVar(&o.mpsRoot, "mps-root", mps.DefaultRoot, "directory of the MPS daemons' pipes, logs and state")
	fs.StringVar(&o.mpsDaemons, "mps-daemons", "start", "start: the plugin starts (or adopts) the MPS daemons of mps GPUs; attach: another container runs them (tessera mps run)")
	fs.BoolVar(&o.mpsMultiUser, "mps-multi-user", false, "start MPS daemons with -multiuser-server")
	fs.StringVar(&o.replicaPolicy, "replica-policy", string(plugin.Distributed), "preferred allocation of time-sliced replicas and MPS clients: distributed or packed")
	fs.StringVar(&o.migPolicy, "mig-policy", string(plugin.Packed), "preferred allocation of MIG devices: distributed or packed")
	fs.DurationVar(&o.probeInterval, "health-probe-interval", 10*time.Second, "how often unhealthy GPUs are probed for recovery")
	fs.DurationVar(&o.quietPeriod, "health-quiet-period", health.DefaultQuietPeriod, "how long a transient fault must stay quiet before its GPU is healthy again")
	fs.DurationVar(&o.profileInterval, "config-poll-interval", time.Second, "how often the config file is checked for edits")
	fs.BoolVar(&o.migManager, "mig-manager", true, "follow the node MIG manager (tessera mig manager): withdraw the devices a layout change touches until it is done, and after a reboot wait for it before advertising the GPUs it manages")
	o.telemetry.AddFlags(fs)
	fs.StringVar(&o.migManagerDir, "mig-manager-dir", "", "the MIG manager's handshake directory (default "+miggate.DefaultDir+", or <sim state dir>/mig-manager on a simulated node)")
}

func main() {
	var o options
	fs := pflag.NewFlagSet(component, pflag.ExitOnError)
	o.addFlags(fs)
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	fs.AddGoFlagSet(klogFlags)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "Usage of %s:\n%s\nXID table:\n%s", component, fs.FlagUsages(), health.DefaultPolicy().Table())
	}
	_ = fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, nil)
	stop()
	klog.Flush()
	if err != nil {
		fmt.Fprintln(os.Stderr, component+":", err)
		os.Exit(1)
	}
}

// run serves until ctx ends; started, if not nil, is called with the plugin once it serves its
// first profile.
func run(ctx context.Context, o options, started func(*plugin.Plugin)) error {
	replicaPolicy, err := plugin.ParsePolicy(o.replicaPolicy)
	if err != nil {
		return fmt.Errorf("--replica-policy: %w", err)
	}
	migPolicy, err := plugin.ParsePolicy(o.migPolicy)
	if err != nil {
		return fmt.Errorf("--mig-policy: %w", err)
	}
	if err := o.telemetry.Validate(); err != nil {
		return err
	}
	if o.mpsDaemons != "start" && o.mpsDaemons != "attach" {
		return fmt.Errorf("--mps-daemons %q: use start or attach", o.mpsDaemons)
	}
	o.backend.DriverRoot = o.driverRoot
	lib, node, err := o.backend.Open()
	if err != nil {
		if !failOnInitError(o.configFile) {
			// NVIDIA's failOnInitError: false: on a node without a usable driver, wait instead of
			// crash-looping, so one DaemonSet can cover mixed nodes.
			klog.ErrorS(err, "NVML is not available; failOnInitError is false, so the plugin waits and serves nothing")
			<-ctx.Done()
			return nil
		}
		return err
	}
	defer lib.Shutdown()

	// CDI: on a simulated node the roots and hook default to the simulator's host.
	mpsOpts := []mps.Option{mps.WithRoot(o.mpsRoot), mps.WithDriverRoot(o.driverRoot)}
	if node != nil {
		h := node.Host()
		r := cdi.Roots{Driver: o.driverRoot, Dev: o.devRoot, Proc: o.procRoot, Hook: o.hookPath}.OnSimulatedHost(h)
		o.driverRoot, o.devRoot, o.procRoot, o.hookPath = r.Driver, r.Dev, r.Proc, r.Hook
		mpsOpts = []mps.Option{mps.WithRoot(o.mpsRoot), mps.ForSimulatedHost(h)}
	}
	gen, err := newCDI(o, lib)
	if err != nil {
		klog.ErrorS(err, "No CDI specs: only the envvar and volume-mounts device list strategies work")
	}

	pol := health.DefaultPolicy()
	pol.QuietPeriod = o.quietPeriod
	monitor := health.NewMonitor(lib, pol, health.WithProbeInterval(o.probeInterval))
	go func() {
		if err := monitor.Run(ctx); err != nil {
			klog.ErrorS(err, "Health events are not watched; devices stay as they are")
		}
	}()

	popts := []plugin.Option{
		plugin.WithDevicePluginDir(o.dir), plugin.WithHealth(monitor), plugin.WithPolicies(replicaPolicy, migPolicy),
		plugin.WithMPS(mps.NewManager(lib, mpsOpts...), o.mpsDaemons == "attach", o.mpsMultiUser),
	}
	if gen != nil {
		popts = append(popts, plugin.WithCDI(gen))
	}
	if sock := podResourcesSocket(o); sock != "" {
		pr, err := plugin.NewPodResources(sock)
		if err != nil {
			return err
		}
		defer pr.Close()
		popts = append(popts, plugin.WithInUse(pr))
	}

	var labels profile.LabelSource
	var events profile.EventRecorder
	var client kubernetes.Interface
	if o.kubeconfig != "" {
		if o.nodeName == "" {
			return errors.New("--kubeconfig needs --node-name (or NODE_NAME)")
		}
		client, err = kubeclient.New(o.kubeconfig, component)
		if err != nil {
			return err
		}
		nl, err := profile.WatchNodeLabels(ctx, client, o.nodeName, 30*time.Second)
		if err != nil {
			return err
		}
		ne := profile.NewNodeEvents(client, o.nodeName, component)
		defer ne.Shutdown()
		labels, events = nl, ne
		popts = append(popts, plugin.WithEvents(ne), plugin.WithNodeLabels(plugin.NewKubeLabeler(client, o.nodeName)))
	}

	if o.migManager {
		boot, err := backend.BootIDFunc(node)()
		if err != nil {
			return err
		}
		popts = append(popts, plugin.WithMIGGate(miggate.NewFollower(backend.MIGGateDir(o.migManagerDir, node, miggate.DefaultDir), miggate.FrontEndDevicePlugin, boot)))
	}
	p, err := plugin.New(ctx, lib, popts...)
	if err != nil {
		return err
	}
	watcher, first, err := loadProfile(ctx, o, lib, labels, events)
	if err != nil {
		return err
	}
	if err := p.Update(ctx, first); err != nil {
		klog.ErrorS(err, "Some GPUs are not served")
	}
	go p.RunMIGGate(ctx)
	if watcher != nil {
		go func() {
			_ = watcher.Run(ctx, func(cur *profile.Current) {
				if err := p.Update(ctx, cur.Resolution); err != nil {
					klog.ErrorS(err, "Profile change applied with errors", "profile", cur.Selection.Name)
				}
			})
		}()
	}
	if o.metricsAddress != "" {
		// GPU telemetry is exported only where it is scraped.
		reg := prometheus.NewRegistry()
		sampler, err := o.telemetry.Start(ctx, lib, "device-plugin", p.TelemetrySource(), client, o.nodeName, func(to *telemetry.Options) { to.LastXIDs = monitor.LastXIDs })
		if err != nil {
			return fmt.Errorf("telemetry: %w", err)
		}
		if sampler != nil {
			reg.MustRegister(sampler)
		}
		if watcher != nil {
			reg.MustRegister(telemetry.ProfileReloads("device-plugin", watcher.Reloads))
		}
		if _, err := telemetry.Serve(ctx, o.metricsAddress, telemetry.Handler(p.MetricsText, reg)); err != nil {
			return err
		}
	}
	if started != nil {
		started(p)
	}
	klog.InfoS("Device plugin running", "dir", o.dir, "resources", len(p.Resources()))
	return p.Run(ctx)
}

func newCDI(o options, lib nvmlib.Interface) (*cdi.Generator, error) {
	gopts := []cdi.Option{cdi.WithDriverRoot(o.driverRoot), cdi.WithHostDriverRoot(o.hostDriverRoot), cdi.WithContainerDriverRoot(o.containerDriverRoot),
		cdi.WithDevRoot(o.devRoot), cdi.WithProcRoot(o.procRoot), cdi.WithSpecDir(o.cdiDir), cdi.WithHookPath(o.hookPath)}
	if sys, err := lib.System(); err == nil && sys.DriverVersion != "" {
		gopts = append(gopts, cdi.WithDriverVersion(sys.DriverVersion))
	}
	if o.noHooks {
		gopts = append(gopts, cdi.WithoutHooks())
	}
	if err := os.MkdirAll(o.cdiDir, 0o755); err != nil {
		return nil, err
	}
	g, err := cdi.New(gopts...)
	if err != nil {
		return nil, err
	}
	if _, err := g.CleanupStale(cdi.Stale{}); err != nil {
		klog.ErrorS(err, "CDI cleanup")
	}
	return g, nil
}

func podResourcesSocket(o options) string {
	switch o.podResourcesSocket {
	case "none", "":
		return ""
	case "auto":
		return plugin.PodResourcesSocketFor(filepath.Dir(filepath.Clean(o.dir)))
	}
	return o.podResourcesSocket
}

// loadProfile reads the first profile: the built-in default without --config-file, else the file
// or directory through a watcher that follows edits (and labels, for a directory).
func loadProfile(ctx context.Context, o options, lib nvmlib.Interface, labels profile.LabelSource, events profile.EventRecorder) (*profile.Watcher, *api.Resolution, error) {
	gpus := func(ctx context.Context) ([]api.GPUInfo, error) { return profile.GPUsFromNVML(ctx, lib) }
	if o.configFile == "" {
		parsed, err := api.ParseProfile([]byte("version: v1\n"))
		if err != nil {
			return nil, nil, err
		}
		g, err := gpus(ctx)
		if err != nil {
			return nil, nil, err
		}
		res, err := api.Resolve(parsed.Profile, g)
		return nil, res, err
	}
	wopts := profile.Options{Labels: labels, Events: events, GPUs: gpus, Interval: o.profileInterval}
	fi, err := os.Stat(o.configFile)
	if err != nil {
		return nil, nil, fmt.Errorf("--config-file: %w", err)
	}
	if fi.IsDir() {
		wopts.Dir = o.configFile
	} else {
		wopts.File = o.configFile
	}
	w, err := profile.NewWatcher(wopts)
	if err != nil {
		return nil, nil, err
	}
	cur, _, err := w.Reload(ctx)
	if cur == nil {
		if err == nil {
			err = errors.New("no profile")
		}
		return nil, nil, fmt.Errorf("--config-file %s: %w", o.configFile, err)
	}
	return w, cur.Resolution, nil
}

// failOnInitError reads the config's failOnInitError (a file, or a directory's "default" key); true
// unless the config says false.
func failOnInitError(configFile string) bool {
	if configFile == "" {
		return true
	}
	path := configFile
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		path = filepath.Join(path, "default")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return true
	}
	p, err := api.ParseProfile(data)
	if err != nil || p.Profile.Spec.DevicePlugin == nil || p.Profile.Spec.DevicePlugin.FailOnInitError == nil {
		return true
	}
	return *p.Profile.Spec.DevicePlugin.FailOnInitError
}
