package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/kubeclient"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/miggate"
	"github.com/tessera-gpu/tessera/partitioning/migmanager"
	"github.com/tessera-gpu/tessera/profile"
	"github.com/tessera-gpu/tessera/telemetry"
)

const migManagerComponent = "tessera-mig-manager"

type migManagerFlags struct {
	layouts       string
	defaultConfig string
	kubeconfig    string
	nodeName      string
	gateDir       string
	drainTimeout  time.Duration
	retryInterval time.Duration
	poll          time.Duration
	resync        time.Duration
	metrics       string
}

func migManagerCmd(opts *backend.Options) *cobra.Command {
	var f migManagerFlags
	cmd := &cobra.Command{
		Use:   "manager --config-file DIR|FILE",
		Short: "Run the node MIG manager: follow the node label " + migmanager.LabelConfig + " and apply the layout it names",
		Long: `Run the node MIG manager (the DaemonSet runs it on every MIG node).

It reads named layouts in mig-parted's v1 format (a mounted ConfigMap: key config.yaml, or a file),
follows the node label ` + migmanager.LabelConfig + ` (or the GPU operator's ` + migmanager.LabelNVIDIAConfig + `), and
applies the named layout: the devices the change touches are withdrawn from the device plugin and the
DRA driver first, the change waits until none of them is in use, then applies. Progress is in the
node label ` + migmanager.LabelState + ` (pending, applying, success, failed) and in Events.
At start (after a reboot) the selected layout is applied again. GPUs the DRA driver serves as
mig-dynamic, and GPUs whose sharing profile names its own layout, are never touched.`,
		Example: `  tessera --nvml=sim:dgx-h100 mig manager --config-file deployments/examples/mig/layouts.yaml \
      --kubeconfig ~/.kube/config --node-name gpu-node-1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runMigManager(cmd, opts, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.layouts, "config-file", "", "the layouts: a mig-parted v1 file, or a mounted ConfigMap directory (key "+migmanager.LayoutsKey+", or its only key); edits are followed")
	fl.StringVar(&f.defaultConfig, "default-config", "", "layout applied while the node has no "+migmanager.LabelConfig+" label (empty: leave MIG alone)")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig (in a pod: \"in-cluster\"); without it only --default-config selects and no label or Event is written")
	fl.StringVar(&f.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME); needed with --kubeconfig")
	fl.StringVar(&f.gateDir, "mig-manager-dir", "", "directory shared with the device plugin and the DRA driver for the handshake (default "+miggate.DefaultDir+", or <sim state dir>/mig-manager on a simulated node)")
	fl.DurationVar(&f.drainTimeout, "drain-timeout", 10*time.Minute, "how long a change waits for withdrawn devices still in use before it fails, leaving the current layout")
	fl.DurationVar(&f.retryInterval, "retry-interval", time.Minute, "how long a failed change waits before it is tried again")
	fl.DurationVar(&f.poll, "poll-interval", time.Second, "how often the layouts file and the front ends' answers are read")
	fl.StringVar(&f.metrics, "metrics-address", "", "address to serve /metrics and /healthz on, e.g. 127.0.0.1:9402 (empty: none)")
	fl.DurationVar(&f.resync, "resync-interval", time.Minute, "how often an applied layout is checked against the GPUs and applied again if it drifted (0: never)")
	return cmd
}

func runMigManager(cmd *cobra.Command, opts *backend.Options, f migManagerFlags) error {
	if f.layouts == "" {
		return errors.New("--config-file: name the layouts file or the mounted ConfigMap directory")
	}
	if _, err := os.Stat(f.layouts); err != nil {
		return fmt.Errorf("--config-file: %w", err)
	}
	ctx := cmd.Context()
	lib, node, err := opts.Open()
	if err != nil {
		return err
	}
	defer lib.Shutdown()
	boot, err := backend.BootIDFunc(node)()
	if err != nil {
		return err
	}
	mo := migmanager.Options{
		Lib: lib, GateDir: backend.MIGGateDir(f.gateDir, node, miggate.DefaultDir), BootID: boot,
		Layouts: f.layouts, DefaultConfig: f.defaultConfig, DrainTimeout: f.drainTimeout,
		RetryInterval: f.retryInterval, Poll: f.poll, Resync: f.resync,
	}
	if f.kubeconfig != "" {
		if f.nodeName == "" {
			return errors.New("--kubeconfig needs --node-name (or NODE_NAME)")
		}
		client, err := kubeclient.New(f.kubeconfig, migManagerComponent)
		if err != nil {
			return err
		}
		labels, err := profile.WatchNodeLabels(ctx, client, f.nodeName, 30*time.Second)
		if err != nil {
			return err
		}
		events := profile.NewNodeEvents(client, f.nodeName, migManagerComponent)
		defer events.Shutdown()
		mo.Labels, mo.Events, mo.State = labels, events, migmanager.NewKubeState(client, f.nodeName)
	}
	m, err := migmanager.New(mo)
	if err != nil {
		return err
	}
	if f.metrics != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(m.Collectors()...)
		if _, err := telemetry.Serve(ctx, f.metrics, telemetry.Handler(nil, reg)); err != nil {
			return err
		}
	}
	klog.InfoS("MIG manager running", "layouts", f.layouts, "handshake", mo.GateDir, "bootID", boot, "node", f.nodeName)
	return m.Run(ctx)
}
