// Command tessera is Tessera's admin CLI: inspect a node's GPUs and drive simulated GPU nodes.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/backend"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	stop()
	klog.Flush()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tessera:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	var opts backend.Options
	root := &cobra.Command{
		Use:           "tessera",
		Short:         "Tessera admin CLI: inspect GPUs and drive simulated GPU nodes",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	opts.AddFlags(root.PersistentFlags())
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	root.PersistentFlags().AddGoFlag(klogFlags.Lookup("v"))
	root.AddCommand(newInspectCmd(&opts), newSimCmd(&opts), newMigCmd(&opts), newProfileCmd(&opts), newCdiCmd(&opts), newMPSCmd(&opts))
	return root
}
