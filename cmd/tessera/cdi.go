package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
)

func newCdiCmd(opts *backend.Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cdi",
		Short: "Write and list the CDI specs through which containers get the node's GPUs",
	}
	cmd.AddCommand(cdiGenerateCmd(opts), cdiListCmd())
	return cmd
}

func cdiGenerateCmd(opts *backend.Options) *cobra.Command {
	var (
		driverRoot, containerDriverRoot, devRoot, procRoot, outputDir string
		kind, hookPath                                                string
		noHooks, noCompat                                             bool
		replicas                                                      int
	)
	cmd := &cobra.Command{
		Use:   "generate",
		Short: "Write the node spec: every GPU (by index and UUID) and every MIG device, validated, atomically",
		Long: `Write the node's CDI spec (<output-dir>/<vendor>-<class>.json): each GPU by index and UUID, each MIG
device by <gpu>:<gi>:<ci> and UUID, and with --replicas N also N time-sliced replicas (<uuid>::<i>) of
each. Every container given one of them also gets /dev/nvidiactl and the other control nodes, the
driver's libraries, utilities, firmware and IPC sockets, and the nvidia-cdi-hook hooks.

On a simulated node (--nvml=sim:…) the roots default to the simulator's host (its dev, proc and
driver directories) and the hook to its stand-in nvidia-cdi-hook; a host without one needs --no-hooks.`,
		Example: `  tessera cdi generate
  tessera cdi generate --driver-root /run/nvidia/driver --hook-path /usr/local/nvidia/toolkit/nvidia-cdi-hook
  tessera --nvml=sim:dgx-a100 cdi generate --output-dir /tmp/cdi`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if replicas < 0 {
				return fmt.Errorf("--replicas %d: must be 0 or more", replicas)
			}
			lib, node, err := opts.Open()
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			snap, err := inventory.New(lib).Snapshot(cmd.Context())
			if err != nil {
				return err
			}
			if node != nil {
				r := cdi.Roots{Driver: driverRoot, Dev: devRoot, Proc: procRoot, Hook: hookPath}.OnSimulatedHost(node.Host())
				driverRoot, devRoot, procRoot, hookPath = r.Driver, r.Dev, r.Proc, r.Hook
			}
			gopts := []cdi.Option{
				cdi.WithDriverRoot(driverRoot), cdi.WithContainerDriverRoot(containerDriverRoot),
				cdi.WithDevRoot(devRoot), cdi.WithProcRoot(procRoot), cdi.WithSpecDir(outputDir),
				cdi.WithVendorClass(kind), cdi.WithHookPath(hookPath),
			}
			if snap.System.DriverVersion != "" {
				gopts = append(gopts, cdi.WithDriverVersion(snap.System.DriverVersion))
			}
			if noHooks {
				gopts = append(gopts, cdi.WithoutHooks())
			}
			if noCompat {
				gopts = append(gopts, cdi.WithoutCUDACompatHook())
			}
			g, err := cdi.New(gopts...)
			if err != nil {
				return err
			}
			devices := cdi.FromSnapshot(snap)
			if len(devices) == 0 {
				return fmt.Errorf("no GPU could be read: nothing to write")
			}
			for _, d := range slices.Clone(devices) {
				for i := range replicas {
					devices = append(devices, d.Replica(i))
				}
			}
			if _, err := g.CleanupStale(cdi.Stale{}); err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning:", err)
			}
			path, err := g.WriteNodeSpec(devices)
			if err != nil {
				return err
			}
			names := 0
			for _, d := range devices {
				names += len(d.Names())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %d devices of kind %s (driver %s)\n", path, names, g.Kind(), g.DriverVersion())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&driverRoot, "driver-root", "/", "host directory the driver's files are installed under (/run/nvidia/driver under the GPU operator)")
	f.StringVar(&containerDriverRoot, "container-driver-root", "/", "where containers see the driver root")
	f.StringVar(&devRoot, "dev-root", "/dev", "host directory holding the NVIDIA device nodes")
	f.StringVar(&procRoot, "proc-root", "/proc", "host procfs (devices, driver/nvidia/...)")
	f.StringVar(&outputDir, "output-dir", cdi.DefaultSpecDir, "directory to write the spec to")
	f.StringVar(&kind, "kind", cdi.DefaultVendorClass, "CDI kind (vendor/class) of the devices")
	f.StringVar(&hookPath, "hook-path", cdi.DefaultHookPath, "nvidia-cdi-hook as the container runtime sees it")
	f.BoolVar(&noHooks, "no-hooks", false, "write no nvidia-cdi-hook hooks (for nodes without the NVIDIA Container Toolkit)")
	f.BoolVar(&noCompat, "no-cuda-compat-hook", false, "leave out the enable-cuda-compat hook (NVIDIA Container Toolkit before 1.17.5)")
	f.IntVar(&replicas, "replicas", 0, "also write N time-sliced replicas of every GPU and MIG device")
	return cmd
}

func cdiListCmd() *cobra.Command {
	var specDir, kind, output string
	var all bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the CDI devices a container runtime resolves from the spec directory, and the specs' errors",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if all {
				kind = ""
			}
			l, err := cdi.List(specDir, kind)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			switch output {
			case "json":
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(l); err != nil {
					return err
				}
			case "table":
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "DEVICE\tSPEC")
				for _, d := range l.Devices {
					fmt.Fprintf(tw, "%s\t%s\n", d.Name, d.Spec)
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				paths := make([]string, 0, len(l.Errors))
				for p := range l.Errors {
					paths = append(paths, p)
				}
				slices.Sort(paths)
				for _, p := range paths {
					for _, e := range l.Errors[p] {
						fmt.Fprintf(cmd.ErrOrStderr(), "error: %s: %s\n", p, e)
					}
				}
			default:
				return fmt.Errorf("-o %q: use table or json", output)
			}
			if len(l.Errors) > 0 {
				return fmt.Errorf("%d spec file(s) in %s have errors", len(l.Errors), specDir)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&specDir, "spec-dir", cdi.DefaultSpecDir, "CDI spec directory to read")
	cmd.Flags().StringVar(&kind, "kind", cdi.DefaultVendorClass, "list only devices of this CDI kind")
	cmd.Flags().BoolVar(&all, "all", false, "list devices of every kind")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}
