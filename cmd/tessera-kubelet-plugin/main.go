// Command tessera-kubelet-plugin is Tessera's DRA driver (resource.k8s.io/v1, driver
// gpu.tessera.dev) for the GPUs the sharing profile gives to the `dra` owner: it publishes them as
// ResourceSlices, prepares and unprepares claims for the kubelet, and reports device health. See
// docs/dra.md.
package main

import (
	"context"
	goflag "flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"
)

func main() {
	var o options
	fs := pflag.NewFlagSet("tessera-kubelet-plugin", pflag.ExitOnError)
	o.addFlags(fs)
	kfs := goflag.NewFlagSet("klog", goflag.ExitOnError)
	klog.InitFlags(kfs)
	fs.AddGoFlagSet(kfs)
	_ = fs.Parse(os.Args[1:])

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, nil)
	stop()
	klog.Flush()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tessera-kubelet-plugin:", err)
		os.Exit(1)
	}
}
