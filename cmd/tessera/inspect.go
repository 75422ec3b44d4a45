package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
)

func newInspectCmd(opts *backend.Options) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Print the node's GPUs and MIG devices",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !validFormat(output) {
				return fmt.Errorf("-o %q: use one of %s", output, strings.Join(inventory.Formats, ", "))
			}
			lib, _, err := opts.Open()
			if err != nil {
				return err
			}
			defer lib.Shutdown()
			snap, err := inventory.New(lib).Snapshot(cmd.Context())
			if err != nil {
				return err
			}
			return inventory.Render(cmd.OutOrStdout(), snap, output)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: "+strings.Join(inventory.Formats, ", "))
	return cmd
}

func validFormat(f string) bool {
	for _, v := range inventory.Formats {
		if v == f {
			return true
		}
	}
	return false
}
