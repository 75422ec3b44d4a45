// Command tessera-chart renders, installs and uninstalls Tessera's chart through the Helm Go library,
// for machines without the helm CLI (the end-to-end tests install with it, in a process of its own:
// see the package comment of deployments/helm).
//
//	tessera-chart render    [-f values.yaml]... [--release tessera] [--namespace tessera-system]
//	tessera-chart install   --kubeconfig FILE [-f values.yaml]... [--release tessera] [--namespace tessera-system]
//	tessera-chart upgrade   --kubeconfig FILE [-f values.yaml]... [--release tessera] [--namespace tessera-system]
//	tessera-chart uninstall --kubeconfig FILE [--release tessera] [--namespace tessera-system]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/tessera-gpu/tessera/deployments/helm"
)

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet("tessera-chart "+cmd, flag.ExitOnError)
	var values files
	fs.Var(&values, "f", "values file (repeatable; later ones win)")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster (install, uninstall)")
	release := fs.String("release", "tessera", "release name")
	namespace := fs.String("namespace", "tessera-system", "release namespace")
	chart := fs.String("chart", helm.ChartDir(), "chart directory")
	_ = fs.Parse(os.Args[2:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cmd, *chart, *kubeconfig, *release, *namespace, values); err != nil {
		fmt.Fprintln(os.Stderr, "tessera-chart:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cmd, chart, kubeconfig, release, namespace string, values []string) error {
	vals, err := helm.Values(values, nil)
	if err != nil {
		return err
	}
	switch cmd {
	case "render":
		m, err := helm.Render(ctx, chart, release, namespace, vals)
		if err != nil {
			return err
		}
		fmt.Print(m)
		return nil
	case "install":
		if kubeconfig == "" {
			return fmt.Errorf("install needs --kubeconfig (or KUBECONFIG)")
		}
		rel, err := helm.Install(ctx, chart, helm.InstallOptions{Kubeconfig: kubeconfig, Release: release, Namespace: namespace, Values: vals})
		if err != nil {
			return err
		}
		fmt.Printf("installed %s/%s revision %d\n", rel.Namespace, rel.Name, rel.Version)
		return nil
	case "upgrade":
		if kubeconfig == "" {
			return fmt.Errorf("upgrade needs --kubeconfig (or KUBECONFIG)")
		}
		rel, err := helm.Upgrade(ctx, chart, helm.InstallOptions{Kubeconfig: kubeconfig, Release: release, Namespace: namespace, Values: vals})
		if err != nil {
			return err
		}
		fmt.Printf("upgraded %s/%s to revision %d\n", rel.Namespace, rel.Name, rel.Version)
		return nil
	case "uninstall":
		if kubeconfig == "" {
			return fmt.Errorf("uninstall needs --kubeconfig (or KUBECONFIG)")
		}
		if err := helm.Uninstall(kubeconfig, namespace, release); err != nil {
			return err
		}
		fmt.Printf("uninstalled %s/%s\n", namespace, release)
		return nil
	}
	usage()
	return nil
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: tessera-chart render|install|upgrade|uninstall [-f values.yaml]... [--kubeconfig FILE] [--release NAME] [--namespace NS]")
	os.Exit(2)
}
