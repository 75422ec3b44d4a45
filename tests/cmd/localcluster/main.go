// Command localcluster runs Tessera's local Kubernetes cluster (see tests/harness):
//
//	localcluster up      build what is missing, start (or reuse) the cluster, print KUBECONFIG
//	localcluster status  show whether it runs and what is on it
//	localcluster demo    up, run a busybox pod, `tessera inspect`, and the DRA driver on a simulated
//	                     DGX H100: a MIG device made for a pod, two pods sharing a GPU by memory
//	localcluster down    stop it and clean up processes and mounts
//	localcluster build   only build the binaries and images into the cache
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/tests/harness"
)

func main() {
	var (
		stateDir string
		cacheDir string
		gateArgs map[string]string
	)
	opts := func() harness.Options {
		gates := map[string]bool{}
		for k, v := range gateArgs {
			gates[k] = v == "true"
		}
		return harness.Options{StateDir: stateDir, CacheDir: cacheDir, FeatureGates: gates, Log: os.Stdout}
	}
	root := &cobra.Command{
		Use:           "localcluster",
		Short:         "Run Tessera's local Kubernetes cluster (real control plane, kubelet, containerd)",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&stateDir, "state", harness.DefaultStateDir(), "cluster state directory ($TESSERA_STATE)")
	root.PersistentFlags().StringVar(&cacheDir, "cache", harness.DefaultCacheDir(), "build cache for binaries and images ($TESSERA_CACHE)")
	root.PersistentFlags().StringToStringVar(&gateArgs, "feature-gates", nil, "extra feature gates for every component, e.g. DRAConsumableCapacity=true")

	up := &cobra.Command{
		Use:   "up",
		Short: "Build what is missing and start the cluster (or reuse the running one)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := harness.Start(cmd.Context(), opts())
			if err != nil {
				return err
			}
			c.Detach()
			printUsage(c)
			return nil
		},
	}
	down := &cobra.Command{
		Use:   "down",
		Short: "Stop the cluster, kill its containers and unmount its directories",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := harness.Down(stateDir, os.Stdout); err != nil {
				return err
			}
			left, err := harness.Leftovers(stateDir)
			if err != nil {
				return err
			}
			if len(left) > 0 {
				return fmt.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
			}
			fmt.Printf("cluster in %s stopped; nothing left running or mounted\n", stateDir)
			return nil
		},
	}
	status := &cobra.Command{
		Use:   "status",
		Short: "Show whether the cluster runs, its nodes and pods",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !harness.Running(stateDir) {
				fmt.Printf("no cluster running from %s\n", stateDir)
				return nil
			}
			c, err := harness.Attach(cmd.Context(), opts())
			if err != nil {
				return err
			}
			out, err := c.Kubectl(cmd.Context(), "get", "nodes,pods", "-A", "-o", "wide")
			fmt.Print(out)
			if err != nil {
				return err
			}
			printUsage(c)
			return nil
		},
	}
	var tesseraBin string
	demo := &cobra.Command{
		Use:   "demo",
		Short: "Start the cluster, run a pod, and show `tessera inspect` on a simulated node",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDemo(cmd.Context(), opts(), tesseraBin)
		},
	}
	demo.Flags().StringVar(&tesseraBin, "tessera-bin", "bin", "directory holding the tessera binaries (make build)")
	build := &cobra.Command{
		Use:   "build",
		Short: "Only build the binaries and images into the cache (what up does first)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			t0 := time.Now()
			b, err := harness.EnsureBinaries(cmd.Context(), harness.BuildOptions{CacheDir: cacheDir, Log: os.Stdout})
			if err != nil {
				return err
			}
			if _, err := harness.EnsureImages(cmd.Context(), cacheDir, os.Stdout); err != nil {
				return err
			}
			fmt.Printf("binaries in %s (%s)\n", strings.Join(b.Dirs, ", "), time.Since(t0).Round(time.Second))
			return nil
		},
	}
	root.AddCommand(up, down, status, demo, build)

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: %v\n", err)
		os.Exit(1)
	}
}

func printUsage(c *harness.Cluster) {
	fmt.Printf("\nThe cluster keeps running. Use it with:\n\n  export KUBECONFIG=%s\n  %s get nodes\n\n", c.Kubeconfig, c.Binaries.Kubectl)
	fmt.Printf("Logs: %s   Stop it: make demo-down (go run ./tests/cmd/localcluster down)\n", c.LogDir)
}

func section(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func runDemo(ctx context.Context, o harness.Options, tesseraBin string) error {
	t0 := time.Now()
	section("Starting the local cluster (a cold build takes about 10 minutes; later runs reuse it)")
	c, err := harness.Start(ctx, o)
	if err != nil {
		return err
	}
	// Once up, the cluster outlives this command; the harness's Ctrl-C handler only guards startup.
	c.Detach()
	if c.Reused {
		fmt.Println("reused the running cluster")
	}

	section("Nodes")
	out, err := c.Kubectl(ctx, "get", "nodes", "-o", "wide")
	fmt.Print(out)
	if err != nil {
		return err
	}

	section("Running a busybox pod on node %q", c.NodeName)
	name := fmt.Sprintf("demo-%d", time.Now().Unix())
	pod := harness.BusyboxPod("default", name, "sh", "-c",
		`echo "hello from pod $(hostname): kubelet + containerd + runc on this machine"; echo "kernel: $(uname -sr)"; echo "cgroup: $(grep memory /proc/self/cgroup | cut -d: -f3)"`)
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	tp := time.Now()
	output, err := c.RunPod(pctx, pod)
	if err != nil {
		c.DumpDiagnostics(os.Stdout)
		return fmt.Errorf("demo pod: %w", err)
	}
	fmt.Printf("pod %s created -> Succeeded -> output read in %s; its output:\n", name, time.Since(tp).Round(10*time.Millisecond))
	for _, l := range strings.Split(strings.TrimRight(output, "\n"), "\n") {
		fmt.Printf("  | %s\n", l)
	}
	_ = c.Client().CoreV1().Pods("default").Delete(ctx, name, metav1.DeleteOptions{})

	section("tessera inspect on a simulated DGX H100 (--nvml=sim:dgx-h100)")
	runInspect(ctx, tesseraBin)

	section("Tessera's DRA driver (gpu.tessera.dev) for node %q on a simulated DGX H100", c.NodeName)
	if err := runDRADemo(ctx, c, tesseraBin); err != nil {
		c.DumpDiagnostics(os.Stdout)
		return fmt.Errorf("DRA demo: %w", err)
	}

	section("Done in %s", time.Since(t0).Round(100*time.Millisecond))
	printUsage(c)
	return nil
}

// runInspect shows `tessera --nvml=sim:dgx-h100 inspect`; a missing or failing binary is reported
// and does not fail the demo.
func runInspect(ctx context.Context, dir string) {
	bin := filepath.Join(dir, "tessera")
	if abs, err := filepath.Abs(bin); err == nil {
		bin = abs
	}
	if _, err := os.Stat(bin); err != nil {
		fmt.Printf("note: %s is not there (yet): build it with `make build`. Skipping this step.\n", bin)
		return
	}
	ictx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ictx, bin, "--nvml=sim:dgx-h100", "inspect")
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stdout
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			fmt.Printf("note: `%s --nvml=sim:dgx-h100 inspect` failed (%v); the demo goes on.\n", bin, err)
		} else {
			fmt.Printf("note: could not run %s: %v; the demo goes on.\n", bin, err)
		}
	}
}
