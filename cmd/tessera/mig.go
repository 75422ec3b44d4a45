package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
)

func newMigCmd(opts *backend.Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mig",
		Short: "Make the node's MIG layout match a mig-parted v1 config, check it, or show it",
	}
	cmd.AddCommand(migApplyCmd(opts), migAssertCmd(opts), migShowCmd(opts), migManagerCmd(opts))
	return cmd
}

func migApplyCmd(opts *backend.Options) *cobra.Command {
	var file, name, output string
	var mo mig.Options
	cmd := &cobra.Command{
		Use:   "apply -f FILE -c NAME",
		Short: "Apply layout NAME: GPUs already matching are not touched; a failure rolls the GPU back",
		Example: `  tessera --nvml=sim:dgx-h100 mig apply -f deployments/examples/mig/layouts.yaml -c all-1g.10gb
  tessera mig apply -f layouts.yaml -c mixed --dry-run`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadMig(file, name)
			if err != nil {
				return err
			}
			lib, _, err := opts.Open()
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			rep, err := mig.Apply(cmd.Context(), lib, cfg, name, mo)
			if err != nil {
				return err
			}
			if err := printReport(cmd, rep, output); err != nil {
				return err
			}
			if !rep.OK() {
				return fmt.Errorf("layout %s was not applied on every selected GPU (see above)", name)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "mig-parted v1 config file")
	cmd.Flags().StringVarP(&name, "config", "c", "", "name of the layout in the file")
	cmd.Flags().BoolVar(&mo.DryRun, "dry-run", false, "print the plan and change nothing")
	cmd.Flags().BoolVar(&mo.Force, "force", false, "destroy MIG instances even while processes use them")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func migAssertCmd(opts *backend.Options) *cobra.Command {
	var file, name string
	cmd := &cobra.Command{
		Use:   "assert -f FILE -c NAME",
		Short: "Exit 1 and print the differences when the hardware does not match layout NAME",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadMig(file, name)
			if err != nil {
				return err
			}
			lib, _, err := opts.Open()
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			diffs, err := mig.Assert(cmd.Context(), lib, cfg, name)
			if err != nil {
				return err
			}
			for _, d := range diffs {
				fmt.Fprintln(cmd.OutOrStdout(), d)
			}
			if len(diffs) > 0 {
				return fmt.Errorf("the node does not match layout %s", name)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "the node matches layout %s\n", name)
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "mig-parted v1 config file")
	cmd.Flags().StringVarP(&name, "config", "c", "", "name of the layout in the file")
	return cmd
}

func migShowCmd(opts *backend.Options) *cobra.Command {
	return &cobra.Command{
		Use:   "show",
		Short: "Show each GPU's MIG mode and GPU instances with their placements",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lib, _, err := opts.Open()
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			snap, err := inventory.New(lib).Snapshot(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "GPU\tPRODUCT\tMIG\tLAYOUT")
			for _, g := range snap.GPUs {
				mode := "n/a"
				if g.MigCapable {
					mode = map[bool]string{true: "enabled", false: "disabled"}[g.MigEnabled]
					if g.MigModePendingChange() {
						mode += " (change pending reset)"
					}
				}
				var parts []string
				for _, m := range g.MigDevices {
					parts = append(parts, fmt.Sprintf("%s@%d", m.Profile, m.Placement.Start))
				}
				layout := strings.Join(parts, " ")
				if g.Error != "" {
					layout = g.Error
				} else if layout == "" {
					layout = "-"
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", g.Index, g.ProductName, mode, layout)
			}
			return tw.Flush()
		},
	}
}

func loadMig(file, name string) (*mig.Config, error) {
	if file == "" || name == "" {
		return nil, fmt.Errorf("give the config file with -f and the layout with -c")
	}
	return mig.LoadConfig(file)
}

func printReport(cmd *cobra.Command, rep mig.Report, output string) error {
	switch output {
	case "json":
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	case "table", "":
	default:
		return fmt.Errorf("-o %q: use table or json", output)
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tPRODUCT\tSTATUS\tLAYOUT\tDETAIL")
	for _, g := range rep.GPUs {
		var parts []string
		for _, i := range g.Layout {
			parts = append(parts, i.String())
		}
		detail := g.Message
		if detail == "" && (len(g.Created) > 0 || len(g.Destroyed) > 0) {
			detail = fmt.Sprintf("created %d, destroyed %d", len(g.Created), len(g.Destroyed))
		}
		layout := strings.Join(parts, " ")
		if layout == "" {
			layout = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\n", g.GPU, g.Product, g.Status, layout, detail)
	}
	return tw.Flush()
}
