// Package helm renders and installs Tessera's chart (deployments/helm/tessera) through the Helm Go
// library: `make manifests` renders the static manifests with it, the unit tests lint and render
// the chart with it, and the end-to-end test installs it on the local cluster with it.
//
// Never link this package into a binary (or test binary) that also links go-nvml (anything that
// imports partitioning/nvmlib, profile, plugin, dra, ...): Helm brings kustomize, which imports Go's
// plugin package, and a binary with the plugin package binds every symbol at start, so go-nvml's
// NVML symbols, which are resolved only when libnvidia-ml is loaded, kill it at once ("symbol lookup
// error: undefined symbol: nvml..."). The end-to-end tests therefore install through the
// tessera-chart command, in its own process.
package helm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/common"
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/kube"
	ri "helm.sh/helm/v4/pkg/release"
	release "helm.sh/helm/v4/pkg/release/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"sigs.k8s.io/yaml"
)

// ChartDir is the chart's directory in this repository.
func ChartDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "tessera")
}

// SimValuesFile is the preset for simulated GPU nodes.
func SimValuesFile() string { return filepath.Join(ChartDir(), "values-sim.yaml") }

// Load reads the chart.
func Load(dir string) (*chart.Chart, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("loading chart %s: %w", dir, err)
	}
	return ch, nil
}

// Values merges values files (later ones win) and then overrides, as `helm -f a -f b` would.
func Values(files []string, overrides map[string]any) (map[string]any, error) {
	out := map[string]any{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var v map[string]any
		if err := yaml.Unmarshal(data, &v); err != nil {
			return nil, fmt.Errorf("values file %s: %w", f, err)
		}
		out = merge(out, v)
	}
	if overrides != nil {
		out = merge(out, overrides)
	}
	return out, nil
}

// merge returns a with b's values on top; maps merge key by key, anything else is replaced.
func merge(a, b map[string]any) map[string]any {
	out := make(map[string]any, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if bm, ok := v.(map[string]any); ok {
			if am, ok := out[k].(map[string]any); ok {
				out[k] = merge(am, bm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// deepCopy copies values: Helm edits the maps it is given (a null removes a key in place).
func deepCopy(v map[string]any) map[string]any {
	if v == nil {
		return nil
	}
	out := make(map[string]any, len(v))
	for k, x := range v {
		out[k] = deepCopyValue(x)
	}
	return out
}

func deepCopyValue(x any) any {
	switch t := x.(type) {
	case map[string]any:
		return deepCopy(t)
	case []any:
		c := make([]any, len(t))
		for i := range t {
			c[i] = deepCopyValue(t[i])
		}
		return c
	}
	return x
}

// Lint runs Helm's chart linter with the values; it returns the messages at warning or above.
func Lint(dir, namespace string, vals map[string]any) []string {
	res := lint.RunAll(dir, deepCopy(vals), namespace)
	var out []string
	for _, m := range res.Messages {
		if m.Severity >= support.WarningSev {
			out = append(out, m.Error())
		}
	}
	return out
}

// Render renders the chart client-side (as `helm template`) and returns the manifest.
func Render(ctx context.Context, dir, name, namespace string, vals map[string]any) (string, error) {
	ch, err := Load(dir)
	if err != nil {
		return "", err
	}
	inst := action.NewInstall(action.NewConfiguration())
	inst.DryRunStrategy = action.DryRunClient
	inst.ReleaseName, inst.Namespace, inst.Replace = name, namespace, true
	kv, err := common.ParseKubeVersion("v1.37.1")
	if err != nil {
		return "", err
	}
	inst.KubeVersion = kv
	rel, err := inst.RunWithContext(ctx, ch, deepCopy(vals))
	if err != nil {
		return "", fmt.Errorf("rendering chart %s: %w", dir, err)
	}
	r, err := asRelease(rel)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(r.Manifest) + "\n", nil
}

// InstallOptions say where and how to install.
type InstallOptions struct {
	Kubeconfig string
	Release    string
	Namespace  string
	Values     map[string]any
	// Wait for the release's workloads to be ready (DaemonSets scheduled and available).
	Wait bool
}

// Install installs (or upgrades) the chart with the kubeconfig's cluster, creating the namespace.
func Install(ctx context.Context, dir string, o InstallOptions) (*release.Release, error) {
	ch, err := Load(dir)
	if err != nil {
		return nil, err
	}
	cfg, err := actionConfig(o.Kubeconfig, o.Namespace)
	if err != nil {
		return nil, err
	}
	inst := action.NewInstall(cfg)
	inst.ReleaseName, inst.Namespace, inst.CreateNamespace = o.Release, o.Namespace, true
	inst.WaitStrategy = o.waitStrategy()
	rel, err := inst.RunWithContext(ctx, ch, deepCopy(o.Values))
	if err != nil {
		return nil, fmt.Errorf("installing chart %s as %s/%s: %w", dir, o.Namespace, o.Release, err)
	}
	return asRelease(rel)
}

// Upgrade upgrades an installed release to the chart with these values (helm upgrade, values not
// reused: pass them all).
func Upgrade(ctx context.Context, dir string, o InstallOptions) (*release.Release, error) {
	ch, err := Load(dir)
	if err != nil {
		return nil, err
	}
	cfg, err := actionConfig(o.Kubeconfig, o.Namespace)
	if err != nil {
		return nil, err
	}
	up := action.NewUpgrade(cfg)
	up.Namespace = o.Namespace
	up.WaitStrategy = o.waitStrategy()
	rel, err := up.RunWithContext(ctx, o.Release, ch, deepCopy(o.Values))
	if err != nil {
		return nil, fmt.Errorf("upgrading %s/%s to chart %s: %w", o.Namespace, o.Release, dir, err)
	}
	return asRelease(rel)
}

// waitStrategy: Helm waits for the workloads only when asked.
func (o InstallOptions) waitStrategy() kube.WaitStrategy {
	if o.Wait {
		return kube.StatusWatcherStrategy
	}
	return kube.HookOnlyStrategy
}

// asRelease is Helm's result as the v1 release this package's chart makes.
func asRelease(rel ri.Releaser) (*release.Release, error) {
	r, ok := rel.(*release.Release)
	if !ok {
		return nil, fmt.Errorf("unexpected release type %T", rel)
	}
	return r, nil
}

// actionConfig is Helm's configuration for the kubeconfig's cluster, releases kept in Secrets of
// the namespace (helm's default driver).
func actionConfig(kubeconfig, namespace string) (*action.Configuration, error) {
	flags := genericclioptions.NewConfigFlags(false)
	flags.KubeConfig = &kubeconfig
	flags.Namespace = &namespace
	cfg := action.NewConfiguration()
	if err := cfg.Init(flags, namespace, "secret"); err != nil {
		return nil, fmt.Errorf("helm configuration: %w", err)
	}
	return cfg, nil
}

// Uninstall removes the release.
func Uninstall(kubeconfig, namespace, name string) error {
	cfg, err := actionConfig(kubeconfig, namespace)
	if err != nil {
		return err
	}
	un := action.NewUninstall(cfg)
	un.WaitStrategy = kube.HookOnlyStrategy
	_, err = un.Run(name)
	return err
}
