package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/sim"
)

func newSimCmd(opts *backend.Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Drive a simulated GPU node (select it with --nvml=sim:<node> or TESSERA_NVML)",
	}
	cmd.AddCommand(
		simListCmd(),
		simStatusCmd(opts),
		simInjectCmd(opts),
		simSetCmd(opts),
		simProcessCmd(opts),
		simNodeOp(opts, "clear", "Clear injected faults (lost GPU, ECC counts, last XID)", true, func(n *sim.Node, gpu int) error { return n.Clear(gpu) }),
		simNodeOp(opts, "reset", "Reset GPUs as nvidia-smi -r does: pending MIG mode applies, MIG instances and processes are gone", true, func(n *sim.Node, gpu int) error { return n.ResetGPU(gpu) }),
		simNodeOp(opts, "reboot", "Reboot the node: new boot ID, MIG mode kept, MIG instances gone", false, func(n *sim.Node, _ int) error { return n.Reboot() }),
		simWipeCmd(opts),
	)
	return cmd
}

func simListCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the built-in simulated nodes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tGPUS\tDESCRIPTION")
			for _, name := range sim.BuiltinNodes() {
				spec, err := sim.BuiltinNode(name)
				if err != nil {
					return err
				}
				var parts []string
				for _, g := range spec.GPUs {
					parts = append(parts, fmt.Sprintf("%dx %s", g.Count, g.Model))
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", name, strings.Join(parts, " + "), spec.Description)
			}
			return tw.Flush()
		},
	}
}

func simStatusCmd(opts *backend.Options) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the simulated node's state directory, boot ID, host roots and injected faults",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := opts.OpenNode()
			if err != nil {
				return err
			}
			boot, err := n.BootID()
			if err != nil {
				return err
			}
			gpus, err := n.Status()
			if err != nil {
				return err
			}
			h := n.Host()
			st := struct {
				Node       string          `json:"node"`
				StateDir   string          `json:"stateDir"`
				BootID     string          `json:"bootID"`
				DevRoot    string          `json:"devRoot"`
				ProcRoot   string          `json:"procRoot"`
				DriverRoot string          `json:"driverRoot"`
				GPUs       []sim.GPUStatus `json:"gpus"`
			}{n.Spec().Spec.Name, n.Dir(), boot, h.DevRoot(), h.ProcRoot(), h.DriverRoot(), gpus}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Node:        %s\nState dir:   %s\nBoot ID:     %s\nDev root:    %s\nProc root:   %s\nDriver root: %s\n\n",
				st.Node, st.StateDir, st.BootID, st.DevRoot, st.ProcRoot, st.DriverRoot)
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "GPU\tLOST\tLAST XID\tECC SBE\tECC DBE\tPROCESSES")
			for _, g := range gpus {
				fmt.Fprintf(tw, "%d\t%v\t%d\t%d\t%d\t%d\n", g.Index, g.Lost, g.LastXID, g.ECCSingle, g.ECCDouble, g.Processes)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func simInjectCmd(opts *backend.Options) *cobra.Command {
	var (
		gpu, gi, ci int
		xid         uint64
		ecc         string
		lost        bool
	)
	cmd := &cobra.Command{
		Use:   "inject",
		Short: "Inject a health event: --xid N, --ecc single|double, or --lost",
		Example: `  tessera --nvml=sim:dgx-h100 sim inject --gpu 3 --xid 79
  tessera --nvml=sim:dgx-a100 sim inject --gpu 0 --xid 94 --gi 7 --ci 0
  tessera --nvml=sim:dgx-h100 sim inject --gpu 1 --ecc double`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			chosen := 0
			for _, set := range []bool{cmd.Flags().Changed("xid"), ecc != "", lost} {
				if set {
					chosen++
				}
			}
			if chosen != 1 {
				return fmt.Errorf("give exactly one of --xid N, --ecc single|double, --lost")
			}
			if (gi >= 0) != (ci >= 0) {
				return fmt.Errorf("--gi and --ci name a MIG device together: give both or neither")
			}
			n, err := opts.OpenNode()
			if err != nil {
				return err
			}
			switch {
			case lost:
				err = n.InjectGPULost(gpu)
			case ecc == "single" || ecc == "double":
				err = n.InjectECC(gpu, ecc == "double")
			case ecc != "":
				return fmt.Errorf("--ecc %q: use single or double", ecc)
			default:
				err = n.InjectXID(gpu, xid, gi, ci)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "injected into GPU %d of %s\n", gpu, n.Spec().Spec.Name)
			return nil
		},
	}
	cmd.Flags().IntVar(&gpu, "gpu", 0, "GPU index")
	cmd.Flags().Uint64Var(&xid, "xid", 0, "XID error code (79: GPU fell off the bus, also marks it lost)")
	cmd.Flags().StringVar(&ecc, "ecc", "", "ECC error: single or double")
	cmd.Flags().BoolVar(&lost, "lost", false, "the GPU falls off the bus (XID 79; NVML calls return ERROR_GPU_IS_LOST)")
	cmd.Flags().IntVar(&gi, "gi", -1, "GPU instance of the MIG device the XID concerns")
	cmd.Flags().IntVar(&ci, "ci", -1, "compute instance of the MIG device the XID concerns")
	return cmd
}

func simSetCmd(opts *backend.Options) *cobra.Command {
	var (
		gpu                                 int
		util, memUtil, power, temp, smClock int
		memUsed                             uint64
	)
	cmd := &cobra.Command{
		Use:     "set",
		Short:   "Set a GPU's readings: utilization, memory used, power, temperature, SM clock",
		Example: `  tessera --nvml=sim:dgx-h100 sim set --gpu 2 --utilization 85 --memory-used 40000 --power 550000`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var s sim.Settings
			f := cmd.Flags()
			if f.Changed("utilization") {
				s.UtilizationGPU = &util
			}
			if f.Changed("memory-utilization") {
				s.UtilizationMemory = &memUtil
			}
			if f.Changed("memory-used") {
				s.MemoryUsedMiB = &memUsed
			}
			if f.Changed("power") {
				s.PowerMilliwatts = &power
			}
			if f.Changed("temperature") {
				s.TemperatureC = &temp
			}
			if f.Changed("sm-clock") {
				s.SMClockMHz = &smClock
			}
			if s == (sim.Settings{}) {
				return fmt.Errorf("nothing to set: give one or more of --utilization, --memory-utilization, --memory-used, --power, --temperature, --sm-clock")
			}
			n, err := opts.OpenNode()
			if err != nil {
				return err
			}
			return n.Set(gpu, s)
		},
	}
	cmd.Flags().IntVar(&gpu, "gpu", 0, "GPU index")
	cmd.Flags().IntVar(&util, "utilization", 0, "GPU utilization, percent")
	cmd.Flags().IntVar(&memUtil, "memory-utilization", 0, "memory bandwidth utilization, percent")
	cmd.Flags().Uint64Var(&memUsed, "memory-used", 0, "framebuffer memory used outside any process, MiB")
	cmd.Flags().IntVar(&power, "power", 0, "power draw, milliwatts")
	cmd.Flags().IntVar(&temp, "temperature", 0, "GPU temperature, °C")
	cmd.Flags().IntVar(&smClock, "sm-clock", 0, "SM clock, MHz")
	return cmd
}

func simProcessCmd(opts *backend.Options) *cobra.Command {
	var gpu, pid, gi, ci, sm int
	var mem uint64
	cmd := &cobra.Command{
		Use:   "process start|set|end",
		Short: "Start or end a simulated compute process on a GPU (processes make MIG changes wait)",
		Example: `  tessera --nvml=sim:dgx-a100 sim process start --gpu 0 --pid 4242 --memory 2048
  tessera --nvml=sim:dgx-a100 sim process set --gpu 0 --pid 4242 --sm-percent 35
  tessera --nvml=sim:dgx-a100 sim process end --gpu 0 --pid 4242`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := opts.OpenNode()
			if err != nil {
				return err
			}
			switch args[0] {
			case "start":
				if err := n.AddProcess(gpu, pid, mem, gi, ci); err != nil || sm == 0 {
					return err
				}
				return n.SetProcessUtilization(gpu, pid, sm)
			case "set":
				return n.SetProcessUtilization(gpu, pid, sm)
			case "end":
				return n.EndProcesses(gpu, pid)
			}
			return fmt.Errorf("%q: use start, set or end", args[0])
		},
	}
	cmd.Flags().IntVar(&gpu, "gpu", 0, "GPU index")
	cmd.Flags().IntVar(&pid, "pid", 0, "process ID (end: 0 ends every process on the GPU)")
	cmd.Flags().Uint64Var(&mem, "memory", 0, "memory the process uses, MiB")
	cmd.Flags().IntVar(&sm, "sm-percent", 0, "the process's SM utilization as NVML's process utilization reports it, 0-100")
	cmd.Flags().IntVar(&gi, "gi", -1, "run on this MIG device's GPU instance")
	cmd.Flags().IntVar(&ci, "ci", -1, "run on this MIG device's compute instance")
	return cmd
}

func simNodeOp(opts *backend.Options, use, short string, perGPU bool, op func(*sim.Node, int) error) *cobra.Command {
	gpu := -1
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := opts.OpenNode()
			if err != nil {
				return err
			}
			if err := op(n, gpu); err != nil {
				return err
			}
			what := "all GPUs"
			if gpu >= 0 {
				what = fmt.Sprintf("GPU %d", gpu)
			}
			if !perGPU {
				what = "node"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: %s of %s done\n", use, what, n.Spec().Spec.Name)
			return nil
		},
	}
	if perGPU {
		cmd.Flags().IntVar(&gpu, "gpu", -1, "GPU index (default: every GPU)")
	}
	return cmd
}

func simWipeCmd(opts *backend.Options) *cobra.Command {
	return &cobra.Command{
		Use:   "wipe",
		Short: "Delete the simulated node's state directory (the next use starts from factory state)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !opts.Simulated() {
				return fmt.Errorf("wipe needs a simulated node: pass --nvml=sim:<node>")
			}
			spec, err := sim.ParseTarget(opts.NVML)
			if err != nil {
				return err
			}
			dir := opts.SimStateDir
			if dir == "" {
				dir = sim.DefaultStateDir(spec.Name)
			}
			if err := sim.Wipe(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wiped %s\n", dir)
			return nil
		},
	}
}
