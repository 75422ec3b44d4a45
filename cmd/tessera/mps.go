package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/mps"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// mpsFlags are the flags every `tessera mps` command shares.
type mpsFlags struct {
	root       string
	driverRoot string
}

func newMPSCmd(opts *backend.Options) *cobra.Command {
	var f mpsFlags
	cmd := &cobra.Command{
		Use:   "mps",
		Short: "Run, inspect and stop the MPS control daemons (one per GPU) that Tessera's front ends share",
		Long: `Run, inspect and stop MPS control daemons. Each GPU in MPS mode has one daemon with its own pipe
and log directories under --mps-root; the GPU is in EXCLUSIVE_PROCESS compute mode while the daemon
owns it and goes back to its previous mode on stop. A daemon outlives the command that started it;
the next command (or the device plugin, or the DRA driver) re-adopts it. See docs/sharing.md for what
MPS isolates and what it does not.`,
	}
	cmd.PersistentFlags().StringVar(&f.root, "mps-root", "", "directory of the daemons' pipe, log and state directories (default "+mps.DefaultRoot+"; <sim-state-dir>/mps on a simulated node)")
	cmd.PersistentFlags().StringVar(&f.driverRoot, "driver-root", "/", "where the NVIDIA driver's files are (its usr/bin holds nvidia-cuda-mps-control); ignored on a simulated node")
	cmd.AddCommand(mpsStartCmd(opts, &f), mpsStopCmd(opts, &f), mpsStatusCmd(opts, &f), mpsRunCmd(opts, &f))
	return cmd
}

// openMPS opens the backend and a Manager for it.
func openMPS(opts *backend.Options, f *mpsFlags) (nvmlib.Interface, *mps.Manager, error) {
	lib, node, err := opts.Open()
	if err != nil {
		return nil, nil, err
	}
	root := f.root
	var mopts []mps.Option
	if node != nil {
		if root == "" {
			root = filepath.Join(node.Dir(), "mps")
		}
		mopts = append(mopts, mps.ForSimulatedHost(node.Host()))
	} else {
		mopts = append(mopts, mps.WithDriverRoot(f.driverRoot))
	}
	if root != "" {
		mopts = append(mopts, mps.WithRoot(root))
	}
	return lib, mps.NewManager(lib, mopts...), nil
}

// daemonConfig holds the flags that say what a daemon must look like.
type daemonConfig struct {
	threads   int
	memory    string
	multiUser bool
}

func (c *daemonConfig) addFlags(cmd *cobra.Command) {
	cmd.Flags().IntVar(&c.threads, "thread-percentage", 0, "cap every client at this share of the GPU's threads, 1-100 (server-side; 0: no cap)")
	cmd.Flags().StringVar(&c.memory, "pinned-memory", "", "cap every client's device memory, e.g. 10Gi or 8192Mi (server-side; empty: no cap)")
	cmd.Flags().BoolVar(&c.multiUser, "multi-user", false, "let clients of every Linux user share the GPU at once ("+mps.FlagMultiUser+"; Volta or newer, daemon as root)")
}

func (c *daemonConfig) config() (mps.Config, error) {
	cfg := mps.Config{Limits: mps.Limits{ActiveThreadPercentage: c.threads}, MultiUser: c.multiUser}
	if c.memory != "" {
		q, err := resource.ParseQuantity(c.memory)
		if err != nil || q.Sign() <= 0 {
			return cfg, fmt.Errorf("--pinned-memory %q: give a positive quantity such as 10Gi or 8192Mi", c.memory)
		}
		mib := q.Value() / (1 << 20)
		if q.Value()%(1<<20) != 0 || mib == 0 {
			return cfg, fmt.Errorf("--pinned-memory %q: MPS takes whole MiB: use e.g. %dMi", c.memory, max(1, mib))
		}
		cfg.Limits.PinnedMemoryMiB = uint64(mib)
	}
	return cfg, nil
}

// gpuArgs expands "all" into every GPU index.
func gpuArgs(lib nvmlib.Interface, args []string) ([]string, error) {
	if len(args) == 1 && args[0] == "all" {
		n, err := lib.DeviceCount()
		if err != nil {
			return nil, err
		}
		out := make([]string, n)
		for i := range n {
			out[i] = strconv.Itoa(i)
		}
		return out, nil
	}
	return args, nil
}

func mpsStartCmd(opts *backend.Options, f *mpsFlags) *cobra.Command {
	var dc daemonConfig
	cmd := &cobra.Command{
		Use:   "start GPU... | all",
		Short: "Make each GPU (index or UUID) run an MPS control daemon with these limits, re-adopting a running one",
		Example: `  tessera --nvml=sim:dgx-h100 mps start 0 1 --thread-percentage 50 --pinned-memory 20Gi
  tessera mps start all --multi-user`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := dc.config()
			if err != nil {
				return err
			}
			lib, m, err := openMPS(opts, f)
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			gpus, err := gpuArgs(lib, args)
			if err != nil {
				return err
			}
			var errs []error
			for _, g := range gpus {
				d, err := m.Ensure(cmd.Context(), g, cfg)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				verb := "started"
				if d.Adopted() {
					verb = "already running"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "GPU %d (%s): MPS daemon %s, pid %d, %s; pipe directory %s\n",
					d.GPU().Index, d.GPU().UUID, verb, d.PID(), d.Limits(), d.Paths().Pipe)
			}
			return errors.Join(errs...)
		},
	}
	dc.addFlags(cmd)
	return cmd
}

func mpsStopCmd(opts *backend.Options, f *mpsFlags) *cobra.Command {
	var so mps.StopOptions
	cmd := &cobra.Command{
		Use:   "stop GPU... | all",
		Short: "Quit each GPU's MPS daemon and restore the GPU's previous compute mode",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lib, m, err := openMPS(opts, f)
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			gpus, err := gpuArgs(lib, args)
			if err != nil {
				return err
			}
			var errs []error
			for _, g := range gpus {
				errs = append(errs, m.Stop(cmd.Context(), g, so))
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().BoolVar(&so.Force, "force", false, "stop although clients are registered (their GPU work fails)")
	return cmd
}

func mpsStatusCmd(opts *backend.Options, f *mpsFlags) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "List the MPS daemons Tessera runs, their limits and clients",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lib, m, err := openMPS(opts, f)
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			st, err := m.List()
			if err != nil {
				return err
			}
			if output == "json" {
				if st == nil {
					st = []mps.Status{}
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			if output != "table" {
				return fmt.Errorf("--output %q: use table or json", output)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "GPU\tUUID\tPID\tRUNNING\tMULTI-USER\tLIMITS\tCLIENTS\tRESTORES")
			for _, s := range st {
				running := "yes"
				if !s.Running {
					running = "no: " + s.Reason
				}
				ids := make([]string, len(s.Clients))
				for i, c := range s.Clients {
					ids[i] = c.ID
				}
				fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%v\t%s\t%s\t%s\n", s.GPUIndex, s.GPUUUID, s.PID, running, s.MultiUser,
					s.Limits, orDash(strings.Join(ids, ",")), s.PreviousComputeMode)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func mpsRunCmd(opts *backend.Options, f *mpsFlags) *cobra.Command {
	var dc daemonConfig
	var keep bool
	cmd := &cobra.Command{
		Use:   "run GPU... | all",
		Short: "Ensure the GPUs' MPS daemons and stay in the foreground until signalled, then stop them (the DaemonSet's MPS container)",
		Long: `Ensure the GPUs' MPS daemons, re-adopting running ones, and wait for SIGTERM or SIGINT; then stop
them and restore the GPUs' compute modes (unless --keep). Run it as its own container of the
DaemonSet, sharing the pod's PID namespace with the plugin, so that a restart of the plugin does
not touch the daemons and the plugin attaches to them through --mps-root.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := dc.config()
			if err != nil {
				return err
			}
			lib, m, err := openMPS(opts, f)
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			gpus, err := gpuArgs(lib, args)
			if err != nil {
				return err
			}
			var ensured []string
			var errs []error
			for _, g := range gpus {
				d, err := m.Ensure(cmd.Context(), g, cfg)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				ensured = append(ensured, d.GPU().UUID)
				fmt.Fprintf(cmd.OutOrStdout(), "GPU %d (%s): MPS daemon pid %d, %s\n", d.GPU().Index, d.GPU().UUID, d.PID(), d.Limits())
			}
			if err := errors.Join(errs...); err == nil {
				<-cmd.Context().Done()
			}
			if keep {
				return errors.Join(errs...)
			}
			// Stop even after the context ended: the signal is the reason to stop.
			ctx := context.WithoutCancel(cmd.Context())
			for _, uuid := range ensured {
				errs = append(errs, m.Stop(ctx, uuid, mps.StopOptions{Force: true}))
			}
			return errors.Join(errs...)
		},
	}
	dc.addFlags(cmd)
	cmd.Flags().BoolVar(&keep, "keep", false, "leave the daemons running on exit")
	return cmd
}
