package helm_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/apiserver/pkg/admission"
	plugincel "k8s.io/apiserver/pkg/admission/plugin/cel"
	"k8s.io/apiserver/pkg/admission/plugin/policy/validating"
	"k8s.io/apiserver/pkg/admission/plugin/webhook/matchconditions"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/cel/environment"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/deployments/helm"
)

// The tests install as release "acme" so that names go through the chart's fullname
// ("acme-tessera") rather than equal the chart's name by chance.
const (
	release   = "acme"
	namespace = "gpu-system"
	fullname  = "acme-tessera"
)

// Node components: their name suffix and the key of their values.
var nodeComponents = map[string]string{
	"device-plugin":  "devicePlugin",
	"kubelet-plugin": "kubeletPlugin",
	"mig-manager":    "migManager",
}

// allOn turns on every optional component, so one render holds every object the chart can make.
var allOn = map[string]any{
	"migManager": map[string]any{"enabled": true},
	"mpsDaemons": map[string]any{"enabled": true},
}

// nodeLabels are the labels the node writers set, from testdata/node-labels.yaml, which
// codecheck/ keeps equal to the code's. (This test binary links the Helm library, which links Go's
// plugin package and with it immediate binding of every C symbol: go-nvml's lazily resolved NVML
// symbols would stop it at start. So nothing here imports a package that imports go-nvml.)
type nodeLabelsFile struct {
	DevicePlugin     []string `json:"devicePlugin"`
	MIGManager       []string `json:"migManager"`
	MIGManagerConfig string   `json:"migManagerConfig"`
	MIGLayoutsKey    string   `json:"migLayoutsKey"`
}

func nodeLabels(t *testing.T) nodeLabelsFile {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "node-labels.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var f nodeLabelsFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.DevicePlugin) == 0 || len(f.MIGManager) == 0 || f.MIGManagerConfig == "" || f.MIGLayoutsKey == "" {
		t.Fatalf("testdata/node-labels.yaml is incomplete: %+v", f)
	}
	return f
}

// ---------------------------------------------------------------------------------------------
// Rendering and parsing

type rendered struct {
	values   map[string]any // the chart's values.yaml, then the files, then the overrides
	manifest string
	objs     []*unstructured.Unstructured
}

func simFiles() []string { return []string{helm.SimValuesFile()} }

// overrides merges override maps (later win), as several --set would.
func overrides(ms ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, m := range ms {
		v, err := helm.Values(nil, m)
		if err != nil {
			panic(err)
		}
		out = mergeMaps(out, v)
	}
	return out
}

func mergeMaps(a, b map[string]any) map[string]any {
	out := maps.Clone(a)
	for k, v := range b {
		if bm, ok := v.(map[string]any); ok {
			if am, ok := out[k].(map[string]any); ok {
				out[k] = mergeMaps(am, bm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

func render(t *testing.T, files []string, set map[string]any) *rendered {
	t.Helper()
	vals, err := helm.Values(files, set)
	if err != nil {
		t.Fatal(err)
	}
	manifest, err := helm.Render(context.Background(), helm.ChartDir(), release, namespace, vals)
	if err != nil {
		t.Fatal(err)
	}
	eff, err := helm.Values(append([]string{filepath.Join(helm.ChartDir(), "values.yaml")}, files...), set)
	if err != nil {
		t.Fatal(err)
	}
	return &rendered{values: eff, manifest: manifest, objs: parseObjects(t, manifest)}
}

// parseObjects splits a multi-document manifest into objects; comment-only documents are skipped.
func parseObjects(t *testing.T, manifest string) []*unstructured.Unstructured {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(manifest)))
	var out []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			t.Fatalf("not YAML: %v\n%s", err, doc)
		}
		if string(j) == "null" {
			continue
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(j); err != nil {
			t.Fatalf("not an object: %v\n%s", err, doc)
		}
		out = append(out, u)
	}
	if len(out) == 0 {
		t.Fatal("the chart rendered no objects")
	}
	return out
}

func key(u *unstructured.Unstructured) string { return u.GetKind() + "/" + u.GetName() }

func (r *rendered) keys() []string {
	var out []string
	for _, u := range r.objs {
		out = append(out, key(u))
	}
	sort.Strings(out)
	return out
}

func (r *rendered) find(kind, name string) *unstructured.Unstructured {
	for _, u := range r.objs {
		if u.GetKind() == kind && u.GetName() == name {
			return u
		}
	}
	return nil
}

func (r *rendered) get(t *testing.T, kind, name string) *unstructured.Unstructured {
	t.Helper()
	u := r.find(kind, name)
	if u == nil {
		t.Fatalf("no %s %s among %v", kind, name, r.keys())
	}
	return u
}

func (r *rendered) all(kind string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, u := range r.objs {
		if u.GetKind() == kind {
			out = append(out, u)
		}
	}
	return out
}

// as decodes an object into its API type, strictly: a field the type does not have is an error.
func as[T any](t *testing.T, u *unstructured.Unstructured) *T {
	t.Helper()
	out, err := decodeStrict[T](u)
	if err != nil {
		t.Fatalf("%s: %v", key(u), err)
	}
	return out
}

func decodeStrict[T any](u *unstructured.Unstructured) (*T, error) {
	j, err := json.Marshal(u.Object)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	out := new(T)
	if err := dec.Decode(out); err != nil {
		return nil, err
	}
	return out, nil
}

func (r *rendered) daemonSet(t *testing.T, component string) *appsv1.DaemonSet {
	t.Helper()
	return as[appsv1.DaemonSet](t, r.get(t, "DaemonSet", fullname+"-"+component))
}

func (r *rendered) daemonSets(t *testing.T) []*appsv1.DaemonSet {
	t.Helper()
	var out []*appsv1.DaemonSet
	for _, u := range r.all("DaemonSet") {
		out = append(out, as[appsv1.DaemonSet](t, u))
	}
	if len(out) == 0 {
		t.Fatal("no DaemonSets rendered")
	}
	return out
}

// val reads a dotted path of the effective values.
func (r *rendered) val(t *testing.T, p string) any {
	t.Helper()
	var cur any = r.values
	for _, k := range strings.Split(p, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			t.Fatalf("values: %s: %q is not in a map", p, k)
		}
		cur = m[k]
	}
	return cur
}

// component is the chart component a DaemonSet belongs to (its name without the fullname).
func component(t *testing.T, ds *appsv1.DaemonSet) string {
	t.Helper()
	c, ok := strings.CutPrefix(ds.Name, fullname+"-")
	if !ok || nodeComponents[c] == "" {
		t.Fatalf("DaemonSet %s is no known node component", ds.Name)
	}
	return c
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

func containerNames(spec corev1.PodSpec) []string {
	var out []string
	for _, c := range spec.Containers {
		out = append(out, c.Name)
	}
	return out
}

// flags maps each --flag=value (or -flag=value) of a container's args to its value.
func flags(c corev1.Container) map[string]string {
	out := map[string]string{}
	for _, a := range c.Args {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		k, v, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		out[k] = v
	}
	return out
}

func env(c corev1.Container, name string) (corev1.EnvVar, bool) {
	for _, e := range c.Env {
		if e.Name == name {
			return e, true
		}
	}
	return corev1.EnvVar{}, false
}

func volume(spec corev1.PodSpec, name string) (corev1.Volume, bool) {
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v, true
		}
	}
	return corev1.Volume{}, false
}

// under reports whether p is dir or inside it.
func under(p, dir string) bool {
	p, dir = path.Clean(p), path.Clean(dir)
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// ---------------------------------------------------------------------------------------------
// Lint and well-formedness

func TestLint(t *testing.T) {
	for name, vals := range map[string]struct {
		files []string
		set   map[string]any
	}{
		"defaults":         {},
		"values-sim":       {files: simFiles()},
		"everything on":    {set: allOn},
		"sim, everything":  {files: simFiles(), set: allOn},
		"cert-manager":     {set: map[string]any{"webhook": map[string]any{"certManager": map[string]any{"enabled": true}}}},
		"everything off":   {set: map[string]any{"devicePlugin": map[string]any{"enabled": false}, "kubeletPlugin": map[string]any{"enabled": false}, "webhook": map[string]any{"enabled": false}, "deviceClasses": map[string]any{"create": false}}},
		"host network":     {set: map[string]any{"hostNetwork": true}},
		"other host paths": {set: map[string]any{"hostPaths": map[string]any{"kubeletRoot": "/data/kubelet"}}},
	} {
		t.Run(name, func(t *testing.T) {
			v, err := helm.Values(vals.files, vals.set)
			if err != nil {
				t.Fatal(err)
			}
			if msgs := helm.Lint(helm.ChartDir(), namespace, v); len(msgs) > 0 {
				t.Errorf("helm lint:\n%s", strings.Join(msgs, "\n"))
			}
		})
	}
}

// The linter does report a chart that renders bad YAML: the test above can fail.
func TestLintReportsErrors(t *testing.T) {
	v, err := helm.Values(nil, map[string]any{"priorityClassName": "a: b"})
	if err != nil {
		t.Fatal(err)
	}
	if msgs := helm.Lint(helm.ChartDir(), namespace, v); len(msgs) == 0 {
		t.Error("lint of a chart that renders `priorityClassName: a: b` reports nothing")
	}
}

// Every object decodes strictly into its Kubernetes type (a misspelt or misplaced field is an
// error), namespaced objects are in the release namespace and cluster-scoped ones in none, and no
// two objects share a kind and name.
func TestObjectsAreWellFormed(t *testing.T) {
	clusterScoped := map[string]bool{
		"ClusterRole": true, "ClusterRoleBinding": true, "DeviceClass": true, "ValidatingAdmissionPolicy": true,
		"ValidatingAdmissionPolicyBinding": true, "ValidatingWebhookConfiguration": true,
	}
	for name, r := range map[string]*rendered{
		"defaults":             render(t, nil, nil),
		"everything on":        render(t, nil, allOn),
		"sim, everything on":   render(t, simFiles(), allOn),
		"cert-manager":         render(t, nil, map[string]any{"webhook": map[string]any{"certManager": map[string]any{"enabled": true}}}),
		"host network, no sps": render(t, nil, map[string]any{"hostNetwork": true, "kubeletPlugin": map[string]any{"seamlessUpgrade": false}}),
	} {
		t.Run(name, func(t *testing.T) {
			seen := map[string]bool{}
			for _, u := range r.objs {
				if seen[key(u)] {
					t.Errorf("%s rendered twice", key(u))
				}
				seen[key(u)] = true
				gvk := u.GroupVersionKind()
				if gvk.Group == "cert-manager.io" {
					if gvk.Version != "v1" || (gvk.Kind != "Issuer" && gvk.Kind != "Certificate") {
						t.Errorf("unexpected cert-manager object %s", gvk)
					}
				} else {
					obj, err := scheme.Scheme.New(gvk)
					if err != nil {
						t.Errorf("%s: %v", key(u), err)
						continue
					}
					j, _ := json.Marshal(u.Object)
					dec := json.NewDecoder(bytes.NewReader(j))
					dec.DisallowUnknownFields()
					if err := dec.Decode(obj); err != nil {
						t.Errorf("%s does not decode strictly as %s: %v", key(u), gvk, err)
					}
				}
				if clusterScoped[u.GetKind()] {
					if u.GetNamespace() != "" {
						t.Errorf("cluster-scoped %s has namespace %q", key(u), u.GetNamespace())
					}
				} else if u.GetNamespace() != namespace {
					t.Errorf("%s is in namespace %q, want the release's %q", key(u), u.GetNamespace(), namespace)
				}
				if u.GetLabels()["app.kubernetes.io/instance"] != release {
					t.Errorf("%s lacks the release's instance label: %v", key(u), u.GetLabels())
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------------------------
// The default render

func TestDefaultObjects(t *testing.T) {
	r := render(t, nil, nil)
	want := []string{
		"ClusterRole/" + fullname + "-device-plugin",
		"ClusterRole/" + fullname + "-kubelet-plugin",
		"ClusterRoleBinding/" + fullname + "-device-plugin",
		"ClusterRoleBinding/" + fullname + "-kubelet-plugin",
		"ConfigMap/tessera-sharing-profiles",
		"DaemonSet/" + fullname + "-device-plugin",
		"DaemonSet/" + fullname + "-kubelet-plugin",
		"Deployment/" + fullname + "-webhook",
		"DeviceClass/gpu.tessera.dev",
		"DeviceClass/mig.tessera.dev",
		"DeviceClass/shared.gpu.tessera.dev",
		"DeviceClass/time-sliced.gpu.tessera.dev",
		"Secret/" + fullname + "-webhook-tls",
		"Service/" + fullname + "-webhook",
		"ServiceAccount/" + fullname + "-device-plugin",
		"ServiceAccount/" + fullname + "-kubelet-plugin",
		"ServiceAccount/" + fullname + "-webhook",
		"ValidatingAdmissionPolicy/" + fullname + "-device-plugin-node",
		"ValidatingAdmissionPolicy/" + fullname + "-resourceslices",
		"ValidatingAdmissionPolicyBinding/" + fullname + "-device-plugin-node",
		"ValidatingAdmissionPolicyBinding/" + fullname + "-resourceslices",
		"ValidatingWebhookConfiguration/" + fullname + "-webhook",
	}
	if got := r.keys(); !slices.Equal(got, want) {
		t.Errorf("objects:\n got %v\nwant %v", got, want)
	}
}

// Every node DaemonSet runs as system-node-critical, on the nodes and with the tolerations the values
// name, and with the affinity, host network and pull secrets they set.
func TestNodeDaemonSetsScheduling(t *testing.T) {
	custom := map[string]any{
		"nodeSelector":     map[string]any{"gpu.example.com/pool": "a100"},
		"tolerations":      []any{map[string]any{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}},
		"affinity":         map[string]any{"nodeAffinity": map[string]any{"requiredDuringSchedulingIgnoredDuringExecution": map[string]any{"nodeSelectorTerms": []any{map[string]any{"matchExpressions": []any{map[string]any{"key": "zone", "operator": "In", "values": []any{"a"}}}}}}}},
		"hostNetwork":      true,
		"imagePullSecrets": []any{map[string]any{"name": "registry"}},
	}
	for name, set := range map[string]map[string]any{
		"defaults": allOn,
		"custom":   overrides(allOn, custom),
	} {
		t.Run(name, func(t *testing.T) {
			r := render(t, nil, set)
			var wantSel map[string]string
			if err := roundTrip(r.val(t, "nodeSelector"), &wantSel); err != nil {
				t.Fatal(err)
			}
			var wantTol []corev1.Toleration
			if err := roundTrip(r.val(t, "tolerations"), &wantTol); err != nil {
				t.Fatal(err)
			}
			if len(wantSel) == 0 || len(wantTol) == 0 {
				t.Fatalf("test values have no nodeSelector or tolerations: %v %v", wantSel, wantTol)
			}
			var wantAff *corev1.Affinity
			if a, _ := r.val(t, "affinity").(map[string]any); len(a) > 0 {
				if err := roundTrip(a, &wantAff); err != nil {
					t.Fatal(err)
				}
			}
			hostNet := r.val(t, "hostNetwork").(bool)
			dss := r.daemonSets(t)
			if len(dss) != 3 {
				t.Errorf("%d DaemonSets, want 3 (device plugin, kubelet plugin, MIG manager)", len(dss))
			}
			for _, ds := range dss {
				spec := ds.Spec.Template.Spec
				if spec.PriorityClassName != "system-node-critical" {
					t.Errorf("%s: priorityClassName %q, want system-node-critical", ds.Name, spec.PriorityClassName)
				}
				if !reflect.DeepEqual(spec.NodeSelector, wantSel) {
					t.Errorf("%s: nodeSelector %v, want %v", ds.Name, spec.NodeSelector, wantSel)
				}
				if !reflect.DeepEqual(spec.Tolerations, wantTol) {
					t.Errorf("%s: tolerations %+v, want %+v", ds.Name, spec.Tolerations, wantTol)
				}
				if !reflect.DeepEqual(spec.Affinity, wantAff) {
					t.Errorf("%s: affinity %+v, want %+v", ds.Name, spec.Affinity, wantAff)
				}
				if spec.HostNetwork != hostNet {
					t.Errorf("%s: hostNetwork %v, want %v", ds.Name, spec.HostNetwork, hostNet)
				}
				if hostNet && spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
					t.Errorf("%s: on the host network with dnsPolicy %q, want ClusterFirstWithHostNet", ds.Name, spec.DNSPolicy)
				}
				if name == "custom" && !slices.Equal(spec.ImagePullSecrets, []corev1.LocalObjectReference{{Name: "registry"}}) {
					t.Errorf("%s: imagePullSecrets %v", ds.Name, spec.ImagePullSecrets)
				}
				if spec.HostPID || spec.HostIPC {
					t.Errorf("%s: hostPID %v hostIPC %v, want neither", ds.Name, spec.HostPID, spec.HostIPC)
				}
				// Probes on the host network must not listen on, or be probed at, the pod IP only.
				for _, c := range spec.Containers {
					if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && hostNet && c.LivenessProbe.HTTPGet.Host != "127.0.0.1" {
						t.Errorf("%s/%s: liveness probe host %q on the host network", ds.Name, c.Name, c.LivenessProbe.HTTPGet.Host)
					}
				}
			}
		})
	}
}

func roundTrip(in, out any) error {
	j, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return json.Unmarshal(j, out)
}

// A node container is privileged exactly when its component's `privileged` value says so; any other
// is locked down: every capability dropped, read-only root, no privilege escalation, the runtime's
// default seccomp profile.
func TestNodeContainerSecurity(t *testing.T) {
	cases := []map[string]bool{
		{"devicePlugin": true, "kubeletPlugin": true, "migManager": true},
		{"devicePlugin": false, "kubeletPlugin": false, "migManager": false},
		{"devicePlugin": true, "kubeletPlugin": false, "migManager": true},
		{"devicePlugin": false, "kubeletPlugin": true, "migManager": false},
	}
	for _, c := range cases {
		set := overrides(allOn)
		for comp, p := range c {
			set = overrides(set, map[string]any{comp: map[string]any{"privileged": p}})
		}
		t.Run(fmt.Sprint(c), func(t *testing.T) {
			r := render(t, nil, set)
			checked := 0
			for _, ds := range r.daemonSets(t) {
				priv := r.val(t, nodeComponents[component(t, ds)]+".privileged").(bool)
				if priv != c[nodeComponents[component(t, ds)]] {
					t.Fatalf("values: %s privileged %v, want %v", ds.Name, priv, c[nodeComponents[component(t, ds)]])
				}
				if len(ds.Spec.Template.Spec.InitContainers) > 0 {
					t.Errorf("%s: init containers %v are not checked by this test", ds.Name, ds.Spec.Template.Spec.InitContainers)
				}
				for _, ctr := range ds.Spec.Template.Spec.Containers {
					checkNodeSecurity(t, ds.Name+"/"+ctr.Name, ctr.SecurityContext, priv)
					checked++
				}
				if psc := ds.Spec.Template.Spec.SecurityContext; psc != nil && !reflect.DeepEqual(*psc, corev1.PodSecurityContext{}) {
					t.Errorf("%s: pod securityContext %+v: the containers' settings are the whole story only without one", ds.Name, psc)
				}
			}
			if checked != 4 { // device-plugin, mps-daemons, kubelet-plugin, mig-manager
				t.Errorf("checked %d containers, want 4", checked)
			}
		})
	}
}

func checkNodeSecurity(t *testing.T, where string, sc *corev1.SecurityContext, privileged bool) {
	t.Helper()
	if sc == nil {
		t.Errorf("%s: no securityContext", where)
		return
	}
	isPriv := sc.Privileged != nil && *sc.Privileged
	if isPriv != privileged {
		t.Errorf("%s: privileged %v, want %v", where, isPriv, privileged)
	}
	if privileged {
		return
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
		t.Errorf("%s: capabilities %+v, want drop [ALL] and add none", where, sc.Capabilities)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem %v, want true", where, sc.ReadOnlyRootFilesystem)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation %v, want false", where, sc.AllowPrivilegeEscalation)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile %+v, want RuntimeDefault", where, sc.SeccompProfile)
	}
	if sc.ProcMount != nil && *sc.ProcMount != corev1.DefaultProcMount {
		t.Errorf("%s: procMount %v", where, *sc.ProcMount)
	}
}

// The webhook runs as a non-root user without a service account token and without privileges.
func TestWebhookDeploymentHardening(t *testing.T) {
	r := render(t, nil, nil)
	name := fullname + "-webhook"
	d := as[appsv1.Deployment](t, r.get(t, "Deployment", name))
	spec := d.Spec.Template.Spec
	if spec.ServiceAccountName != name {
		t.Errorf("serviceAccountName %q, want %q", spec.ServiceAccountName, name)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("pod automountServiceAccountToken %v, want false", spec.AutomountServiceAccountToken)
	}
	sa := as[corev1.ServiceAccount](t, r.get(t, "ServiceAccount", name))
	if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Errorf("ServiceAccount automountServiceAccountToken %v, want false", sa.AutomountServiceAccountToken)
	}
	for _, v := range spec.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					t.Errorf("volume %s projects a service account token", v.Name)
				}
			}
		}
	}
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Fatalf("pod securityContext %+v, want runAsNonRoot", psc)
	}
	if psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("runAsUser %v, want a non-zero UID (runAsNonRoot cannot check an image's named user)", psc.RunAsUser)
	}
	if psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod seccompProfile %+v, want RuntimeDefault", psc.SeccompProfile)
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Error("the webhook shares a host namespace")
	}
	if got := containerNames(spec); !slices.Equal(got, []string{"webhook"}) {
		t.Fatalf("containers %v", got)
	}
	c := spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("no container securityContext")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged")
	}
	if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
		t.Error("the container overrides the pod's user with root")
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
		t.Errorf("capabilities %+v, want drop [ALL]", sc.Capabilities)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("root filesystem is writable")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("privilege escalation allowed")
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			t.Errorf("the webhook mounts host path %s", v.HostPath.Path)
		}
	}
}

// ---------------------------------------------------------------------------------------------
// RBAC

type rbacRule struct{ group, resource, verb string }

func rules(t *testing.T, r *rendered, name string) (set map[rbacRule]bool, raw []rbacv1.PolicyRule) {
	t.Helper()
	cr := as[rbacv1.ClusterRole](t, r.get(t, "ClusterRole", name))
	set = map[rbacRule]bool{}
	for _, rule := range cr.Rules {
		for _, g := range rule.APIGroups {
			for _, res := range rule.Resources {
				for _, v := range rule.Verbs {
					set[rbacRule{g, res, v}] = true
				}
			}
		}
	}
	return set, cr.Rules
}

func TestRBACHasNoWildcards(t *testing.T) {
	for name, r := range map[string]*rendered{"defaults": render(t, nil, nil), "everything on": render(t, nil, allOn)} {
		t.Run(name, func(t *testing.T) {
			var roles []*unstructured.Unstructured
			roles = append(roles, r.all("ClusterRole")...)
			roles = append(roles, r.all("Role")...)
			if len(roles) == 0 {
				t.Fatal("no roles rendered")
			}
			for _, u := range roles {
				cr := as[rbacv1.ClusterRole](t, u)
				if cr.AggregationRule != nil {
					t.Errorf("%s aggregates other roles", key(u))
				}
				if len(cr.Rules) == 0 {
					t.Errorf("%s has no rules", key(u))
				}
				for i, rule := range cr.Rules {
					for field, list := range map[string][]string{"apiGroups": rule.APIGroups, "resources": rule.Resources, "verbs": rule.Verbs, "resourceNames": rule.ResourceNames, "nonResourceURLs": rule.NonResourceURLs} {
						for _, s := range list {
							if strings.Contains(s, "*") {
								t.Errorf("%s rule %d: %s has %q", key(u), i, field, s)
							}
						}
					}
					for _, res := range rule.Resources {
						if res == "secrets" || strings.HasPrefix(res, "secrets/") || res == "serviceaccounts/token" {
							t.Errorf("%s rule %d grants %v on %s", key(u), i, rule.Verbs, res)
						}
					}
					for _, v := range rule.Verbs {
						if v == "escalate" || v == "bind" || v == "impersonate" {
							t.Errorf("%s rule %d grants %s", key(u), i, v)
						}
					}
				}
			}
		})
	}
}

// Every ClusterRole is bound, by a ClusterRoleBinding of its name, to the ServiceAccount of the same
// component in the release namespace only, and that ServiceAccount is the one its workload runs as.
func TestRBACBindingsMatchWorkloads(t *testing.T) {
	r := render(t, nil, allOn)
	crs := r.all("ClusterRole")
	if len(crs) != 3 {
		t.Errorf("%d ClusterRoles, want 3 (device plugin, kubelet plugin, MIG manager)", len(crs))
	}
	for _, u := range crs {
		name := u.GetName()
		var bindings []*rbacv1.ClusterRoleBinding
		for _, b := range r.all("ClusterRoleBinding") {
			crb := as[rbacv1.ClusterRoleBinding](t, b)
			if crb.RoleRef.Name == name {
				bindings = append(bindings, crb)
			}
		}
		if len(bindings) != 1 {
			t.Errorf("ClusterRole %s is bound by %d ClusterRoleBindings, want 1", name, len(bindings))
			continue
		}
		b := bindings[0]
		if b.Name != name {
			t.Errorf("ClusterRole %s is bound by %s, want a binding of the same name", name, b.Name)
		}
		if b.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name}) {
			t.Errorf("%s: roleRef %+v", b.Name, b.RoleRef)
		}
		want := []rbacv1.Subject{{Kind: "ServiceAccount", Name: name, Namespace: namespace}}
		if !reflect.DeepEqual(b.Subjects, want) {
			t.Errorf("%s: subjects %+v, want %+v", b.Name, b.Subjects, want)
		}
		sa := r.get(t, "ServiceAccount", name)
		if sa.GetNamespace() != namespace {
			t.Errorf("ServiceAccount %s in %q", name, sa.GetNamespace())
		}
		ds := as[appsv1.DaemonSet](t, r.get(t, "DaemonSet", name))
		if ds.Spec.Template.Spec.ServiceAccountName != name {
			t.Errorf("DaemonSet %s runs as %q, want %q", name, ds.Spec.Template.Spec.ServiceAccountName, name)
		}
	}
	// No ClusterRoleBinding grants a role the chart does not make (cluster-admin, say).
	for _, b := range r.all("ClusterRoleBinding") {
		crb := as[rbacv1.ClusterRoleBinding](t, b)
		if r.find("ClusterRole", crb.RoleRef.Name) == nil {
			t.Errorf("%s binds ClusterRole %s, which the chart does not make", crb.Name, crb.RoleRef.Name)
		}
	}
	// Every workload runs as a ServiceAccount of the chart.
	for _, u := range append(r.all("DaemonSet"), r.all("Deployment")...) {
		var spec corev1.PodSpec
		if u.GetKind() == "DaemonSet" {
			spec = as[appsv1.DaemonSet](t, u).Spec.Template.Spec
		} else {
			spec = as[appsv1.Deployment](t, u).Spec.Template.Spec
		}
		if spec.ServiceAccountName == "" || r.find("ServiceAccount", spec.ServiceAccountName) == nil {
			t.Errorf("%s runs as ServiceAccount %q, which the chart does not make", key(u), spec.ServiceAccountName)
		}
	}
}

func TestKubeletPluginRBACIsExact(t *testing.T) {
	r := render(t, nil, nil)
	got, raw := rules(t, r, fullname+"-kubelet-plugin")
	want := map[rbacRule]bool{}
	for _, w := range []struct {
		group, resource string
		verbs           []string
	}{
		{"resource.k8s.io", "resourceclaims", []string{"get"}},
		{"resource.k8s.io", "resourceclaims/status", []string{"patch"}},
		{"resource.k8s.io", "resourceslices", []string{"get", "list", "watch", "create", "update", "delete"}},
		// Its Node: the slices' owner, and the label that picks its sharing profile (watched).
		{"", "nodes", []string{"get", "list", "watch"}},
		{"", "pods", []string{"get", "list", "watch"}},
		{"", "events", []string{"create", "patch"}},
	} {
		for _, v := range w.verbs {
			want[rbacRule{w.group, w.resource, v}] = true
		}
	}
	for rule := range got {
		if !want[rule] {
			t.Errorf("grants more than it needs: %+v", rule)
		}
	}
	for rule := range want {
		if !got[rule] {
			t.Errorf("lacks %+v", rule)
		}
	}
	for _, rule := range raw {
		if len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			t.Errorf("unexpected rule %+v", rule)
		}
	}
}

// The device plugin and the MIG manager get what they use and no more.
func TestNodeWritersRBAC(t *testing.T) {
	r := render(t, nil, allOn)
	for comp, want := range map[string][]rbacRule{
		"device-plugin": {
			{"", "nodes", "get"}, {"", "nodes", "list"}, {"", "nodes", "watch"}, {"", "nodes", "patch"},
			{"", "pods", "get"}, {"", "pods", "list"}, {"", "pods", "watch"},
			{"", "events", "create"}, {"", "events", "patch"},
		},
		"mig-manager": {
			{"", "nodes", "get"}, {"", "nodes", "list"}, {"", "nodes", "watch"}, {"", "nodes", "patch"},
			{"", "events", "create"}, {"", "events", "patch"},
		},
	} {
		got, _ := rules(t, r, fullname+"-"+comp)
		wantSet := map[rbacRule]bool{}
		for _, w := range want {
			wantSet[w] = true
		}
		if !maps.Equal(got, wantSet) {
			t.Errorf("%s: rules %v, want %v", comp, slices.Collect(maps.Keys(got)), want)
		}
	}
}

// ---------------------------------------------------------------------------------------------
// Host paths

// hostPathRoots are the host directories whose paths Tessera writes into specs and sockets.
func hostPathRoots(t *testing.T, r *rendered) []string {
	t.Helper()
	var out []string
	for _, k := range []string{"kubeletRoot", "cdiDir", "stateDir", "mpsRoot"} {
		out = append(out, r.val(t, "hostPaths."+k).(string))
	}
	return out
}

// Path flags of the node binaries: each names a host path, so it must lie inside a host path
// volume mounted at its own path.
var pathFlags = []string{"device-plugin-dir", "pod-resources-socket", "kubelet-plugins-dir", "kubelet-registry-dir", "cdi-dir", "state-dir", "mps-root", "mig-manager-dir"}

func checkHostPaths(t *testing.T, r *rendered) (mounted map[string]bool) {
	t.Helper()
	roots := hostPathRoots(t, r)
	mounted = map[string]bool{}
	for _, ds := range r.daemonSets(t) {
		spec := ds.Spec.Template.Spec
		for _, c := range spec.Containers {
			sameSide := map[string]bool{} // mount paths whose host path is the same path
			for _, m := range c.VolumeMounts {
				v, ok := volume(spec, m.Name)
				if !ok {
					t.Errorf("%s/%s mounts volume %s, which the pod does not have", ds.Name, c.Name, m.Name)
					continue
				}
				if v.HostPath == nil {
					continue
				}
				if m.SubPath != "" || m.SubPathExpr != "" {
					t.Errorf("%s/%s: host path %s mounted with a subPath", ds.Name, c.Name, v.HostPath.Path)
				}
				// The one deliberate exception: MPS clients get <mpsRoot>/shm as /dev/shm, so the
				// daemons' containers mount it there too.
				if m.MountPath == "/dev/shm" && path.Base(v.HostPath.Path) == "shm" {
					mounted[path.Clean(v.HostPath.Path)] = true
					continue
				}
				for _, root := range roots {
					if under(v.HostPath.Path, root) {
						if path.Clean(m.MountPath) != path.Clean(v.HostPath.Path) {
							t.Errorf("%s/%s: host path %s (under %s) mounted at %s: specs and sockets would name a path the host does not have", ds.Name, c.Name, v.HostPath.Path, root, m.MountPath)
						}
						mounted[path.Clean(v.HostPath.Path)] = true
					}
				}
				if path.Clean(m.MountPath) == path.Clean(v.HostPath.Path) {
					sameSide[path.Clean(m.MountPath)] = !m.ReadOnly
				}
			}
			for flag, val := range flags(c) {
				if !slices.Contains(pathFlags, flag) {
					continue
				}
				found := false
				for mp := range sameSide {
					if under(val, mp) {
						found = true
					}
				}
				if !found {
					t.Errorf("%s/%s: --%s=%s is not inside a host path mounted at its own path (%v)", ds.Name, c.Name, flag, val, slices.Sorted(maps.Keys(sameSide)))
				}
			}
		}
	}
	return mounted
}

func TestHostPathsSameInsideAndOut(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		got := checkHostPaths(t, render(t, nil, allOn))
		for _, p := range []string{"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources", "/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi", "/var/lib/tessera/dra", "/var/lib/tessera/mig-manager", "/run/tessera/mps"} {
			if !got[p] {
				t.Errorf("%s is not mounted (mounted: %v)", p, slices.Sorted(maps.Keys(got)))
			}
		}
		if !got["/run/tessera/mps/shm"] {
			t.Errorf("the MPS shared memory directory is not mounted (mounted: %v)", slices.Sorted(maps.Keys(got)))
		}
	})
	t.Run("sim", func(t *testing.T) {
		got := checkHostPaths(t, render(t, simFiles(), allOn))
		if !got["/var/lib/tessera/sim/dgx-h100"] {
			t.Errorf("the simulated node's state is not mounted (mounted: %v)", slices.Sorted(maps.Keys(got)))
		}
	})
	t.Run("moved", func(t *testing.T) {
		set := overrides(allOn, map[string]any{"hostPaths": map[string]any{
			"kubeletRoot": "/data/kubelet", "cdiDir": "/etc/cdi", "stateDir": "/srv/tessera", "mpsRoot": "/run/gpu-mps",
		}})
		for name, files := range map[string][]string{"real": nil, "sim": simFiles()} {
			r := render(t, files, set)
			got := checkHostPaths(t, r)
			want := []string{"/data/kubelet/plugins", "/data/kubelet/plugins_registry", "/data/kubelet/device-plugins", "/data/kubelet/pod-resources", "/etc/cdi", "/srv/tessera/dra", "/run/gpu-mps"}
			if name == "sim" {
				want = append(want, "/srv/tessera/sim/dgx-h100")
			} else {
				want = append(want, "/srv/tessera/mig-manager")
			}
			for _, p := range want {
				if !got[p] {
					t.Errorf("%s: %s is not mounted (mounted: %v)", name, p, slices.Sorted(maps.Keys(got)))
				}
			}
			// No default path is left behind anywhere in the node DaemonSets.
			for _, u := range r.all("DaemonSet") {
				walkStrings(u.Object, func(s string) {
					for _, old := range []string{"/var/lib/kubelet", "/var/run/cdi", "/var/lib/tessera", "/run/tessera"} {
						if strings.Contains(s, old) {
							t.Errorf("%s: %s: %q still names %s", name, key(u), s, old)
						}
					}
				})
			}
		}
	})
}

func walkStrings(v any, f func(string)) {
	switch t := v.(type) {
	case string:
		f(t)
	case map[string]any:
		for _, x := range t {
			walkStrings(x, f)
		}
	case []any:
		for _, x := range t {
			walkStrings(x, f)
		}
	}
}

// Moving the kubelet's root moves every path the plugins take from it, in their flags and mounts.
func TestKubeletRootMoves(t *testing.T) {
	r := render(t, nil, map[string]any{"hostPaths": map[string]any{"kubeletRoot": "/data/kubelet"}})
	dp := r.daemonSet(t, "device-plugin")
	dpc := container(t, dp.Spec.Template.Spec, "device-plugin")
	kp := r.daemonSet(t, "kubelet-plugin")
	kpc := container(t, kp.Spec.Template.Spec, "kubelet-plugin")
	for _, c := range []struct {
		c          corev1.Container
		flag, want string
	}{
		{dpc, "device-plugin-dir", "/data/kubelet/device-plugins"},
		{dpc, "pod-resources-socket", "/data/kubelet/pod-resources/kubelet.sock"},
		{kpc, "kubelet-plugins-dir", "/data/kubelet/plugins"},
		{kpc, "kubelet-registry-dir", "/data/kubelet/plugins_registry"},
	} {
		got, ok := flags(c.c)[c.flag]
		if !ok {
			t.Errorf("%s: no --%s", c.c.Name, c.flag)
			continue
		}
		if path.Clean(got) != c.want {
			t.Errorf("%s: --%s=%s, want %s", c.c.Name, c.flag, got, c.want)
		}
	}
	for _, c := range []struct {
		spec             corev1.PodSpec
		ctr, volume, dir string
	}{
		{dp.Spec.Template.Spec, "device-plugin", "device-plugins", "/data/kubelet/device-plugins"},
		{dp.Spec.Template.Spec, "device-plugin", "pod-resources", "/data/kubelet/pod-resources"},
		{kp.Spec.Template.Spec, "kubelet-plugin", "plugins", "/data/kubelet/plugins"},
		{kp.Spec.Template.Spec, "kubelet-plugin", "plugins-registry", "/data/kubelet/plugins_registry"},
	} {
		v, ok := volume(c.spec, c.volume)
		if !ok || v.HostPath == nil || v.HostPath.Path != c.dir {
			t.Errorf("volume %s: %+v, want host path %s", c.volume, v.VolumeSource, c.dir)
		}
		found := false
		for _, m := range container(t, c.spec, c.ctr).VolumeMounts {
			if m.Name == c.volume {
				found = true
				if m.MountPath != c.dir {
					t.Errorf("%s: %s mounted at %s, want %s", c.ctr, c.volume, m.MountPath, c.dir)
				}
			}
		}
		if !found {
			t.Errorf("%s does not mount %s", c.ctr, c.volume)
		}
	}
}

// ---------------------------------------------------------------------------------------------
// Toggles

func TestToggleDevicePlugin(t *testing.T) {
	objs := func(r *rendered) []string {
		var out []string
		for _, k := range r.keys() {
			if strings.Contains(k, "device-plugin") {
				out = append(out, k)
			}
		}
		return out
	}
	want := []string{
		"ClusterRole/" + fullname + "-device-plugin",
		"ClusterRoleBinding/" + fullname + "-device-plugin",
		"DaemonSet/" + fullname + "-device-plugin",
		"ServiceAccount/" + fullname + "-device-plugin",
		"ValidatingAdmissionPolicy/" + fullname + "-device-plugin-node",
		"ValidatingAdmissionPolicyBinding/" + fullname + "-device-plugin-node",
	}
	if got := objs(render(t, nil, nil)); !slices.Equal(got, want) {
		t.Errorf("enabled: %v, want %v", got, want)
	}
	off := render(t, nil, map[string]any{"devicePlugin": map[string]any{"enabled": false}})
	if got := objs(off); len(got) > 0 {
		t.Errorf("disabled, still rendered: %v", got)
	}
	for _, k := range []string{"DaemonSet/" + fullname + "-kubelet-plugin", "ValidatingAdmissionPolicy/" + fullname + "-resourceslices"} {
		if !slices.Contains(off.keys(), k) {
			t.Errorf("disabling the device plugin removed %s", k)
		}
	}
}

func TestToggleMIGManager(t *testing.T) {
	cmName := fullname + "-mig-layouts"
	migObjs := []string{
		"ClusterRole/" + fullname + "-mig-manager",
		"ClusterRoleBinding/" + fullname + "-mig-manager",
		"ConfigMap/" + cmName,
		"DaemonSet/" + fullname + "-mig-manager",
		"ServiceAccount/" + fullname + "-mig-manager",
		"ValidatingAdmissionPolicy/" + fullname + "-mig-manager-node",
		"ValidatingAdmissionPolicyBinding/" + fullname + "-mig-manager-node",
	}
	off := render(t, nil, nil)
	for _, k := range migObjs {
		if slices.Contains(off.keys(), k) {
			t.Errorf("MIG manager off by default, yet %s is rendered", k)
		}
	}
	r := render(t, nil, map[string]any{"migManager": map[string]any{"enabled": true, "defaultConfig": "all-3g.40gb"}})
	for _, k := range migObjs {
		if !slices.Contains(r.keys(), k) {
			t.Errorf("no %s", k)
		}
	}
	// The layouts, verbatim, under the key the MIG manager reads from a directory. (codecheck/
	// parses the default layouts with the MIG manager's parser.)
	layoutsKey := nodeLabels(t).MIGLayoutsKey
	cm := as[corev1.ConfigMap](t, r.get(t, "ConfigMap", cmName))
	if got := slices.Sorted(maps.Keys(cm.Data)); !slices.Equal(got, []string{layoutsKey}) {
		t.Fatalf("ConfigMap keys %v, want [%s]", got, layoutsKey)
	}
	layouts := cm.Data[layoutsKey]
	if layouts != r.val(t, "migManager.layouts") || !strings.Contains(layouts, "all-3g.40gb:") {
		t.Errorf("%s differs from migManager.layouts (or lacks the layout the test picks):\n%s", layoutsKey, layouts)
	}
	ds := r.daemonSet(t, "mig-manager")
	spec := ds.Spec.Template.Spec
	c := container(t, spec, "mig-manager")
	if !slices.Equal(c.Command, []string{"/usr/bin/tessera"}) || !slices.Equal(c.Args[:2], []string{"mig", "manager"}) {
		t.Errorf("runs %v %v, want tessera mig manager", c.Command, c.Args)
	}
	f := flags(c)
	if f["default-config"] != "all-3g.40gb" {
		t.Errorf("--default-config=%q", f["default-config"])
	}
	// --config-file is the directory the layouts ConfigMap is mounted at.
	v, ok := volume(spec, "layouts")
	if !ok || v.ConfigMap == nil || v.ConfigMap.Name != cmName {
		t.Fatalf("layouts volume %+v, want ConfigMap %s", v, cmName)
	}
	mounted := false
	for _, m := range c.VolumeMounts {
		if m.Name == "layouts" && path.Clean(m.MountPath) == path.Clean(f["config-file"]) {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("--config-file=%s is not where the layouts are mounted (%+v)", f["config-file"], c.VolumeMounts)
	}
	// An existing ConfigMap instead of the chart's.
	r = render(t, nil, map[string]any{"migManager": map[string]any{"enabled": true, "configMapName": "site-layouts"}})
	if r.find("ConfigMap", cmName) != nil {
		t.Error("configMapName given, yet the chart makes its own layouts ConfigMap")
	}
	if v, _ := volume(r.daemonSet(t, "mig-manager").Spec.Template.Spec, "layouts"); v.ConfigMap == nil || v.ConfigMap.Name != "site-layouts" {
		t.Errorf("layouts volume %+v, want ConfigMap site-layouts", v)
	}
}

func TestToggleMPSDaemons(t *testing.T) {
	off := render(t, nil, nil).daemonSet(t, "device-plugin").Spec.Template.Spec
	if got := containerNames(off); !slices.Equal(got, []string{"device-plugin"}) {
		t.Errorf("MPS daemons off: containers %v", got)
	}
	if off.ShareProcessNamespace != nil && *off.ShareProcessNamespace {
		t.Error("MPS daemons off: the process namespace is shared")
	}
	if got := flags(container(t, off, "device-plugin"))["mps-daemons"]; got != "start" {
		t.Errorf("MPS daemons off: --mps-daemons=%s, want start", got)
	}

	r := render(t, nil, map[string]any{"mpsDaemons": map[string]any{"enabled": true, "threadPercentage": 50, "multiUser": true}})
	spec := r.daemonSet(t, "device-plugin").Spec.Template.Spec
	if got := containerNames(spec); !slices.Equal(got, []string{"device-plugin", "mps-daemons"}) {
		t.Fatalf("containers %v, want device-plugin and mps-daemons", got)
	}
	if spec.ShareProcessNamespace == nil || !*spec.ShareProcessNamespace {
		t.Error("shareProcessNamespace is not set: the plugin cannot see the MPS daemons")
	}
	plugin := container(t, spec, "device-plugin")
	if got := flags(plugin)["mps-daemons"]; got != "attach" {
		t.Errorf("--mps-daemons=%s, want attach", got)
	}
	mps := container(t, spec, "mps-daemons")
	if !slices.Equal(mps.Command, []string{"/usr/bin/tessera"}) || len(mps.Args) < 3 || !slices.Equal(mps.Args[:3], []string{"mps", "run", "all"}) {
		t.Errorf("mps-daemons runs %v %v, want tessera mps run all", mps.Command, mps.Args)
	}
	mf := flags(mps)
	if mf["mps-root"] != flags(plugin)["mps-root"] || mf["mps-root"] != r.val(t, "hostPaths.mpsRoot") {
		t.Errorf("--mps-root: daemons %q, plugin %q, want both %v", mf["mps-root"], flags(plugin)["mps-root"], r.val(t, "hostPaths.mpsRoot"))
	}
	if mf["thread-percentage"] != "50" {
		t.Errorf("--thread-percentage=%q", mf["thread-percentage"])
	}
	if _, ok := mf["multi-user"]; !ok {
		t.Error("no --multi-user")
	}
	// Both containers mount the one MPS volume at the same path.
	mountOf := func(c corev1.Container) string {
		for _, m := range c.VolumeMounts {
			if m.Name == "mps" {
				return m.MountPath
			}
		}
		return ""
	}
	if mountOf(mps) == "" || mountOf(mps) != mountOf(plugin) {
		t.Errorf("mps volume mounted at %q (daemons) and %q (plugin)", mountOf(mps), mountOf(plugin))
	}
	for _, e := range []string{"NODE_NAME", "TESSERA_NVML"} {
		if _, ok := env(mps, e); !ok {
			t.Errorf("mps-daemons lacks env %s", e)
		}
	}
}

func TestToggleSeamlessUpgrade(t *testing.T) {
	for _, seamless := range []bool{true, false} {
		t.Run(fmt.Sprint(seamless), func(t *testing.T) {
			r := render(t, nil, map[string]any{"kubeletPlugin": map[string]any{"seamlessUpgrade": seamless}})
			ds := r.daemonSet(t, "kubelet-plugin")
			us := ds.Spec.UpdateStrategy
			if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil {
				t.Fatalf("updateStrategy %+v", us)
			}
			surge, unavail := us.RollingUpdate.MaxSurge, us.RollingUpdate.MaxUnavailable
			if seamless {
				if surge == nil || surge.IntValue() != 1 || unavail == nil || unavail.IntValue() != 0 {
					t.Errorf("maxSurge %v maxUnavailable %v, want 1 and 0", surge, unavail)
				}
			} else if (surge != nil && surge.IntValue() != 0) || unavail == nil || unavail.IntValue() != 1 {
				t.Errorf("maxSurge %v maxUnavailable %v, want none and 1", surge, unavail)
			}
			e, ok := env(container(t, ds.Spec.Template.Spec, "kubelet-plugin"), "POD_UID")
			if ok != seamless {
				t.Fatalf("POD_UID set: %v, want %v", ok, seamless)
			}
			if ok && (e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.uid") {
				t.Errorf("POD_UID %+v, want the pod's metadata.uid", e)
			}
		})
	}
}

func TestToggleWebhook(t *testing.T) {
	isWebhook := func(k string) bool { return strings.Contains(k, "/"+fullname+"-webhook") }
	on := slices.DeleteFunc(render(t, nil, nil).keys(), func(k string) bool { return !isWebhook(k) })
	want := []string{
		"Deployment/" + fullname + "-webhook",
		"Secret/" + fullname + "-webhook-tls",
		"Service/" + fullname + "-webhook",
		"ServiceAccount/" + fullname + "-webhook",
		"ValidatingWebhookConfiguration/" + fullname + "-webhook",
	}
	if !slices.Equal(on, want) {
		t.Errorf("webhook on: %v, want %v", on, want)
	}
	for _, set := range []map[string]any{
		{"webhook": map[string]any{"enabled": false}},
		{"webhook": map[string]any{"enabled": false, "certManager": map[string]any{"enabled": true}}},
	} {
		r := render(t, nil, set)
		for _, k := range r.keys() {
			if isWebhook(k) || strings.HasPrefix(k, "Issuer/") || strings.HasPrefix(k, "Certificate/") || strings.HasPrefix(k, "ValidatingWebhookConfiguration/") || strings.HasPrefix(k, "Secret/") {
				t.Errorf("webhook off (%v), still rendered: %s", set, k)
			}
		}
	}
}

func TestToggleDeviceClasses(t *testing.T) {
	want := []string{"gpu.tessera.dev", "mig.tessera.dev", "shared.gpu.tessera.dev", "time-sliced.gpu.tessera.dev"}
	names := func(r *rendered) []string {
		var out []string
		for _, u := range r.all("DeviceClass") {
			out = append(out, u.GetName())
		}
		sort.Strings(out)
		return out
	}
	if got := names(render(t, nil, nil)); !slices.Equal(got, want) {
		t.Errorf("DeviceClasses %v, want %v", got, want)
	}
	if got := names(render(t, nil, map[string]any{"deviceClasses": map[string]any{"create": false}})); len(got) > 0 {
		t.Errorf("deviceClasses.create=false, still rendered %v", got)
	}
}

// ---------------------------------------------------------------------------------------------
// Sharing profiles and the simulated preset

// The kubelet plugin's --config-file and the device plugin's directory are where the profile
// ConfigMap is mounted, and the ConfigMap has the key the kubelet plugin reads; the webhook's
// ConfigMap rule selects it.
func TestProfileConfigMapWiring(t *testing.T) {
	// kubeletPlugin.profile "" : the plugin reads the directory and picks by node label, as the
	// device plugin does; a key pins it to that file.
	for _, pinned := range []string{"", "default"} {
		r := render(t, nil, overrides(allOn, map[string]any{"kubeletPlugin": map[string]any{"profile": pinned}}))
		cmName := r.val(t, "sharingProfiles.name").(string)
		cm := as[corev1.ConfigMap](t, r.get(t, "ConfigMap", cmName))
		if cm.Labels[api.ConfigMapLabel] != "true" {
			t.Errorf("ConfigMap labels %v lack %s=true: the webhook would not validate it", cm.Labels, api.ConfigMapLabel)
		}
		for comp, wantFile := range map[string]string{"device-plugin": "", "kubelet-plugin": pinned} {
			spec := r.daemonSet(t, comp).Spec.Template.Spec
			v, ok := volume(spec, "profiles")
			if !ok || v.ConfigMap == nil || v.ConfigMap.Name != cmName {
				t.Fatalf("%s: profiles volume %+v, want ConfigMap %s", comp, v, cmName)
			}
			c := container(t, spec, comp)
			cfg := flags(c)["config-file"]
			var mountPath string
			for _, m := range c.VolumeMounts {
				if m.Name == "profiles" {
					mountPath = m.MountPath
				}
			}
			if mountPath == "" {
				t.Fatalf("%s does not mount the profiles", comp)
			}
			if wantFile == "" {
				if path.Clean(cfg) != path.Clean(mountPath) {
					t.Errorf("%s: --config-file=%s, want the mounted ConfigMap directory %s", comp, cfg, mountPath)
				}
				continue
			}
			if path.Clean(cfg) != path.Join(mountPath, wantFile) {
				t.Errorf("%s: --config-file=%s, want %s", comp, cfg, path.Join(mountPath, wantFile))
			}
			if _, ok := cm.Data[wantFile]; !ok {
				t.Errorf("%s reads profile %q, which the ConfigMap lacks (keys %v)", comp, wantFile, slices.Collect(maps.Keys(cm.Data)))
			}
		}
	}
	r := render(t, nil, nil)
	vwc := as[admissionregistrationv1.ValidatingWebhookConfiguration](t, r.get(t, "ValidatingWebhookConfiguration", fullname+"-webhook"))
	for _, w := range vwc.Webhooks {
		if w.Name != "profiles.tessera.dev" {
			continue
		}
		if w.ObjectSelector == nil || w.ObjectSelector.MatchLabels[api.ConfigMapLabel] != "true" {
			t.Errorf("profiles webhook objectSelector %+v", w.ObjectSelector)
		}
	}
}

func TestSimPreset(t *testing.T) {
	r := render(t, simFiles(), allOn)
	if r.val(t, "nvml") != "sim:dgx-h100" {
		t.Fatalf("values-sim.yaml: nvml %v", r.val(t, "nvml"))
	}
	stateDir := r.val(t, "hostPaths.stateDir").(string) + "/sim/dgx-h100"
	for _, ds := range r.daemonSets(t) {
		spec := ds.Spec.Template.Spec
		if _, ok := spec.NodeSelector["nvidia.com/gpu.present"]; ok {
			t.Errorf("%s: nodeSelector %v: simulated nodes carry no GPU labels", ds.Name, spec.NodeSelector)
		}
		v, ok := volume(spec, "sim-state")
		if !ok || v.HostPath == nil || v.HostPath.Path != stateDir {
			t.Errorf("%s: sim-state volume %+v, want host path %s", ds.Name, v.VolumeSource, stateDir)
		}
		for _, vol := range spec.Volumes {
			if vol.Name == "driver-root" || (vol.HostPath != nil && vol.HostPath.Path == r.val(t, "hostPaths.driverRoot")) {
				t.Errorf("%s: volume %s (%+v): a simulated node has no driver to mount", ds.Name, vol.Name, vol.VolumeSource)
			}
		}
		for _, c := range spec.Containers {
			where := ds.Name + "/" + c.Name
			if e, _ := env(c, "TESSERA_NVML"); e.Value != "sim:dgx-h100" {
				t.Errorf("%s: TESSERA_NVML=%q, want sim:dgx-h100", where, e.Value)
			}
			if e, _ := env(c, "TESSERA_SIM_STATE"); e.Value != stateDir {
				t.Errorf("%s: TESSERA_SIM_STATE=%q, want %s", where, e.Value, stateDir)
			}
			mountedAt := ""
			for _, m := range c.VolumeMounts {
				if m.Name == "sim-state" {
					mountedAt = m.MountPath
				}
				if m.MountPath == "/driver-root" {
					t.Errorf("%s mounts /driver-root", where)
				}
			}
			if mountedAt != stateDir {
				t.Errorf("%s: sim-state mounted at %q, want %s (CDI specs name its files)", where, mountedAt, stateDir)
			}
			for _, a := range c.Args {
				if strings.HasPrefix(a, "--driver-root") || strings.HasPrefix(a, "--container-driver-root") {
					t.Errorf("%s: %s on a simulated node", where, a)
				}
			}
			checkNodeSecurity(t, where, c.SecurityContext, false)
		}
	}
	// The real preset, for contrast: the driver root is mounted and the simulated state is not.
	real := render(t, nil, nil)
	for _, ds := range real.daemonSets(t) {
		if _, ok := volume(ds.Spec.Template.Spec, "sim-state"); ok {
			t.Errorf("real nodes: %s mounts the simulated state", ds.Name)
		}
		if _, ok := volume(ds.Spec.Template.Spec, "driver-root"); !ok {
			t.Errorf("real nodes: %s lacks the driver root", ds.Name)
		}
		for _, c := range ds.Spec.Template.Spec.Containers {
			if _, ok := env(c, "TESSERA_SIM_STATE"); ok {
				t.Errorf("real nodes: %s/%s has TESSERA_SIM_STATE", ds.Name, c.Name)
			}
		}
	}
}

// The sharing profiles the chart ships are the values' verbatim and validate with the parser
// `tessera profile validate` and the webhook use. (codecheck/ resolves the simulated preset's
// profile on a simulated DGX H100.)
func TestSharingProfilesValidate(t *testing.T) {
	for name, files := range map[string][]string{"defaults": nil, "values-sim": simFiles()} {
		t.Run(name, func(t *testing.T) {
			r := render(t, files, nil)
			cm := as[corev1.ConfigMap](t, r.get(t, "ConfigMap", r.val(t, "sharingProfiles.name").(string)))
			want := r.val(t, "sharingProfiles.profiles").(map[string]any)
			if len(cm.Data) == 0 || len(cm.Data) != len(want) {
				t.Fatalf("the profile ConfigMap has keys %v, want %v", slices.Collect(maps.Keys(cm.Data)), slices.Collect(maps.Keys(want)))
			}
			for k, v := range cm.Data {
				if v != want[k] {
					t.Errorf("profile %s is not the values' sharingProfiles.profiles.%s:\n%s", k, k, v)
				}
				p, err := api.ParseProfile([]byte(v))
				if err != nil {
					t.Errorf("profile %s: %v", k, err)
					continue
				}
				if len(p.Warnings) > 0 {
					t.Errorf("profile %s: warnings %v", k, p.Warnings)
				}
			}
			// The whole ConfigMap, as the webhook and `tessera profile validate` read one.
			if _, warns, err := api.ParseConfigMapData(cm.Data); err != nil || len(warns) > 0 {
				t.Errorf("ConfigMap: %v %v", err, warns)
			}
		})
	}
	// The parser does refuse a bad profile: the test above can fail.
	r := render(t, nil, map[string]any{"sharingProfiles": map[string]any{"profiles": map[string]any{"bad": "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\nspec:\n  defaults: {owner: nobody}\n"}}})
	cm := as[corev1.ConfigMap](t, r.get(t, "ConfigMap", r.val(t, "sharingProfiles.name").(string)))
	if _, _, err := api.ParseConfigMapData(cm.Data); err == nil {
		t.Error("a profile with owner nobody validates")
	}
}

// ---------------------------------------------------------------------------------------------
// Webhook certificates

func decodePEMCert(t *testing.T, what string, data []byte) *x509.Certificate {
	t.Helper()
	block, rest := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("%s is not a PEM certificate", what)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		t.Errorf("%s holds more than one PEM block", what)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return c
}

func TestWebhookGeneratedCertificates(t *testing.T) {
	r := render(t, nil, nil)
	name := fullname + "-webhook"
	svcDNS := name + "." + namespace + ".svc"
	sec := as[corev1.Secret](t, r.get(t, "Secret", name+"-tls"))
	if sec.Type != corev1.SecretTypeTLS {
		t.Errorf("Secret type %q, want kubernetes.io/tls", sec.Type)
	}
	if got := slices.Sorted(maps.Keys(sec.Data)); !slices.Equal(got, []string{"ca.crt", "tls.crt", "tls.key"}) {
		t.Fatalf("Secret keys %v", got)
	}
	caPEM := sec.Data["ca.crt"]
	ca := decodePEMCert(t, "ca.crt", caPEM)
	leaf := decodePEMCert(t, "tls.crt", sec.Data["tls.crt"])
	if !ca.IsCA {
		t.Error("ca.crt is not a CA")
	}
	if !slices.Contains(leaf.DNSNames, svcDNS) {
		t.Errorf("serving certificate names %v, want %s", leaf.DNSNames, svcDNS)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: svcDNS, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("the serving certificate does not verify against ca.crt for %s: %v", svcDNS, err)
	}
	if _, err := tls.X509KeyPair(sec.Data["tls.crt"], sec.Data["tls.key"]); err != nil {
		t.Errorf("tls.key does not match tls.crt: %v", err)
	}
	vwc := as[admissionregistrationv1.ValidatingWebhookConfiguration](t, r.get(t, "ValidatingWebhookConfiguration", name))
	checkWebhookNames(t, vwc)
	for _, w := range vwc.Webhooks {
		if !bytes.Equal(w.ClientConfig.CABundle, caPEM) {
			t.Errorf("%s: caBundle is not the Secret's ca.crt", w.Name)
		}
	}
	if _, ok := vwc.Annotations["cert-manager.io/inject-ca-from"]; ok {
		t.Error("cert-manager annotation without cert-manager")
	}
	checkWebhookWiring(t, r, vwc)
	// The raw caBundle is the base64 of the PEM, as the API takes it.
	raw, _, _ := unstructured.NestedSlice(r.get(t, "ValidatingWebhookConfiguration", name).Object, "webhooks")
	b64, _, _ := unstructured.NestedString(raw[0].(map[string]any), "clientConfig", "caBundle")
	if dec, err := base64.StdEncoding.DecodeString(b64); err != nil || !bytes.Equal(dec, caPEM) {
		t.Errorf("caBundle is not base64 of ca.crt: %v", err)
	}
}

// checkWebhookNames: the claims and the profiles webhooks are there (and maybe more).
func checkWebhookNames(t *testing.T, vwc *admissionregistrationv1.ValidatingWebhookConfiguration) {
	t.Helper()
	var names []string
	for _, w := range vwc.Webhooks {
		names = append(names, w.Name)
	}
	for _, want := range []string{"claims.gpu.tessera.dev", "profiles.tessera.dev"} {
		if !slices.Contains(names, want) {
			t.Errorf("webhooks %v lack %s", names, want)
		}
	}
}

// checkWebhookWiring: the webhooks call the chart's Service, which selects the webhook's pods and
// forwards to their HTTPS port; the pods mount the certificate Secret.
func checkWebhookWiring(t *testing.T, r *rendered, vwc *admissionregistrationv1.ValidatingWebhookConfiguration) {
	t.Helper()
	name := fullname + "-webhook"
	svc := as[corev1.Service](t, r.get(t, "Service", name))
	d := as[appsv1.Deployment](t, r.get(t, "Deployment", name))
	for k, v := range svc.Spec.Selector {
		if d.Spec.Template.Labels[k] != v {
			t.Errorf("Service selector %v does not select the webhook's pods %v", svc.Spec.Selector, d.Spec.Template.Labels)
		}
	}
	if !reflect.DeepEqual(d.Spec.Selector.MatchLabels, svc.Spec.Selector) {
		t.Errorf("Deployment selector %v, Service selector %v", d.Spec.Selector.MatchLabels, svc.Spec.Selector)
	}
	c := container(t, d.Spec.Template.Spec, "webhook")
	for _, w := range vwc.Webhooks {
		s := w.ClientConfig.Service
		if s == nil || s.Name != name || s.Namespace != namespace || s.Port == nil {
			t.Errorf("%s: clientConfig.service %+v", w.Name, s)
			continue
		}
		if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
			t.Errorf("%s: sideEffects %v", w.Name, w.SideEffects)
		}
		found := false
		for _, p := range svc.Spec.Ports {
			if p.Port != *s.Port {
				continue
			}
			found = true
			for _, cp := range c.Ports {
				if (p.TargetPort.String() == cp.Name || p.TargetPort.IntValue() == int(cp.ContainerPort)) && fmt.Sprint(cp.ContainerPort) != flags(c)["port"] {
					t.Errorf("Service port %d targets container port %d; the webhook listens on %s", p.Port, cp.ContainerPort, flags(c)["port"])
				}
			}
		}
		if !found {
			t.Errorf("%s calls port %d, which the Service lacks", w.Name, *s.Port)
		}
	}
	v, ok := volume(d.Spec.Template.Spec, "tls")
	if !ok || v.Secret == nil || v.Secret.SecretName != name+"-tls" {
		t.Errorf("tls volume %+v, want Secret %s-tls", v.VolumeSource, name)
	}
}

func TestWebhookCertManager(t *testing.T) {
	name := fullname + "-webhook"
	svcDNS := name + "." + namespace + ".svc"
	r := render(t, nil, map[string]any{"webhook": map[string]any{"certManager": map[string]any{"enabled": true}}})
	if s := r.all("Secret"); len(s) > 0 {
		t.Errorf("with cert-manager the chart renders Secrets %v", s)
	}
	if strings.Contains(r.manifest, "PRIVATE KEY") {
		t.Error("with cert-manager the manifest holds a private key")
	}
	issuer := r.get(t, "Issuer", name)
	if _, ok, _ := unstructured.NestedMap(issuer.Object, "spec", "selfSigned"); !ok {
		t.Errorf("Issuer spec %v, want selfSigned", issuer.Object["spec"])
	}
	cert := r.get(t, "Certificate", name)
	secretName, _, _ := unstructured.NestedString(cert.Object, "spec", "secretName")
	if secretName != name+"-tls" {
		t.Errorf("Certificate secretName %q, want %s-tls (what the Deployment mounts)", secretName, name)
	}
	dns, _, _ := unstructured.NestedStringSlice(cert.Object, "spec", "dnsNames")
	if !slices.Contains(dns, svcDNS) {
		t.Errorf("Certificate dnsNames %v, want %s", dns, svcDNS)
	}
	ref, _, _ := unstructured.NestedStringMap(cert.Object, "spec", "issuerRef")
	if ref["name"] != name || ref["kind"] != "Issuer" {
		t.Errorf("issuerRef %v, want Issuer %s", ref, name)
	}
	vwc := as[admissionregistrationv1.ValidatingWebhookConfiguration](t, r.get(t, "ValidatingWebhookConfiguration", name))
	checkWebhookNames(t, vwc)
	if got := vwc.Annotations["cert-manager.io/inject-ca-from"]; got != namespace+"/"+cert.GetName() {
		t.Errorf("inject-ca-from %q, want %s/%s", got, namespace, cert.GetName())
	}
	for _, w := range vwc.Webhooks {
		if len(w.ClientConfig.CABundle) > 0 {
			t.Errorf("%s: caBundle set; cert-manager injects it", w.Name)
		}
	}
	checkWebhookWiring(t, r, vwc)

	// An issuer of the site's: no Issuer of the chart's, the Certificate names the given one.
	r = render(t, nil, map[string]any{"webhook": map[string]any{"certManager": map[string]any{"enabled": true, "issuerName": "site-ca"}}})
	if is := r.all("Issuer"); len(is) > 0 {
		t.Errorf("issuerName given, yet Issuers %v", is)
	}
	ref, _, _ = unstructured.NestedStringMap(r.get(t, "Certificate", name).Object, "spec", "issuerRef")
	if ref["name"] != "site-ca" {
		t.Errorf("issuerRef %v, want site-ca", ref)
	}
}

// ---------------------------------------------------------------------------------------------
// Node-scoped admission policies: structure

func saUser(component string) string {
	return "system:serviceaccount:" + namespace + ":" + fullname + "-" + component
}

func TestNodePoliciesStructure(t *testing.T) {
	r := render(t, nil, allOn)
	for policy, c := range map[string]struct {
		component string
		group     string
		resource  string
		ops       []admissionregistrationv1.OperationType
	}{
		fullname + "-resourceslices":     {"kubelet-plugin", "resource.k8s.io", "resourceslices", []admissionregistrationv1.OperationType{"CREATE", "UPDATE", "DELETE"}},
		fullname + "-device-plugin-node": {"device-plugin", "", "nodes", []admissionregistrationv1.OperationType{"UPDATE"}},
		fullname + "-mig-manager-node":   {"mig-manager", "", "nodes", []admissionregistrationv1.OperationType{"UPDATE"}},
	} {
		vap := as[admissionregistrationv1.ValidatingAdmissionPolicy](t, r.get(t, "ValidatingAdmissionPolicy", policy))
		spec := vap.Spec
		if spec.FailurePolicy == nil || *spec.FailurePolicy != admissionregistrationv1.Fail {
			t.Errorf("%s: failurePolicy %v, want Fail", policy, spec.FailurePolicy)
		}
		if spec.ParamKind != nil {
			t.Errorf("%s: paramKind %+v", policy, spec.ParamKind)
		}
		// Exactly one match condition, on exactly the component's service account, which is the
		// one its DaemonSet runs as.
		want := fmt.Sprintf("request.userInfo.username == %q", saUser(c.component))
		if len(spec.MatchConditions) != 1 || strings.TrimSpace(spec.MatchConditions[0].Expression) != want {
			t.Errorf("%s: matchConditions %+v, want one: %s", policy, spec.MatchConditions, want)
		}
		ds := r.daemonSet(t, c.component)
		if got := "system:serviceaccount:" + ds.Namespace + ":" + ds.Spec.Template.Spec.ServiceAccountName; got != saUser(c.component) {
			t.Errorf("%s: the DaemonSet runs as %s, the policy matches %s", policy, got, saUser(c.component))
		}
		mc := spec.MatchConstraints
		if mc == nil || len(mc.ResourceRules) != 1 {
			t.Fatalf("%s: matchConstraints %+v", policy, mc)
		}
		if mc.MatchPolicy == nil || *mc.MatchPolicy != admissionregistrationv1.Equivalent {
			t.Errorf("%s: matchPolicy %v, want Equivalent (every API version)", policy, mc.MatchPolicy)
		}
		rr := mc.ResourceRules[0]
		if !slices.Equal(rr.APIGroups, []string{c.group}) || !slices.Equal(rr.Resources, []string{c.resource}) || !slices.Equal(rr.Operations, c.ops) {
			t.Errorf("%s: resource rule %+v, want %s %s %v", policy, rr, c.group, c.resource, c.ops)
		}
		if len(spec.Validations) == 0 {
			t.Errorf("%s: no validations", policy)
		}
		b := as[admissionregistrationv1.ValidatingAdmissionPolicyBinding](t, r.get(t, "ValidatingAdmissionPolicyBinding", policy))
		if b.Spec.PolicyName != policy || !slices.Equal(b.Spec.ValidationActions, []admissionregistrationv1.ValidationAction{admissionregistrationv1.Deny}) {
			t.Errorf("binding %s: %+v, want policy %s with Deny", policy, b.Spec, policy)
		}
		if b.Spec.MatchResources != nil || b.Spec.ParamRef != nil {
			t.Errorf("binding %s narrows the policy: %+v", policy, b.Spec)
		}
	}
	// nodeScopedPolicy=false drops the ResourceSlice policy and only it.
	off := render(t, nil, map[string]any{"kubeletPlugin": map[string]any{"nodeScopedPolicy": false}})
	if off.find("ValidatingAdmissionPolicy", fullname+"-resourceslices") != nil || off.find("ValidatingAdmissionPolicyBinding", fullname+"-resourceslices") != nil {
		t.Error("nodeScopedPolicy=false, yet the ResourceSlice policy is rendered")
	}
	if off.find("ValidatingAdmissionPolicy", fullname+"-device-plugin-node") == nil {
		t.Error("nodeScopedPolicy=false removed the device plugin's node policy")
	}
}

// ---------------------------------------------------------------------------------------------
// Node-scoped admission policies: behaviour, through the API server's own CEL compiler and
// validator (k8s.io/apiserver, as its ValidatingAdmissionPolicy plugin compiles a policy).

type policy struct {
	name      string
	validator validating.Validator
}

// compilePolicy compiles a policy as the API server does: each expression is first checked in the
// environment the API server validates new policies with (a policy that fails this is refused at
// creation), then the policy is built as the admission plugin builds it (compilePolicy in
// k8s.io/apiserver/pkg/admission/plugin/policy/validating).
func compilePolicy(t *testing.T, vap *admissionregistrationv1.ValidatingAdmissionPolicy) *policy {
	t.Helper()
	envSet := environment.MustBaseEnvSet(environment.DefaultCompatibilityVersion())
	withAuthz := plugincel.OptionalVariableDeclarations{HasAuthorizer: true}
	noAuthz := plugincel.OptionalVariableDeclarations{}

	check, err := plugincel.NewCompositedCompiler(envSet)
	if err != nil {
		t.Fatal(err)
	}
	compileErr := func(what string, res plugincel.CompilationResult) {
		t.Helper()
		if res.Error != nil {
			t.Errorf("%s: %s: %v", vap.Name, what, res.Error)
		}
	}
	for _, v := range vap.Spec.Variables {
		compileErr("variable "+v.Name, check.CompileAndStoreVariable(&validating.Variable{Name: v.Name, Expression: v.Expression}, withAuthz, environment.NewExpressions))
	}
	for _, mc := range vap.Spec.MatchConditions {
		compileErr("matchCondition "+mc.Name, check.CompileCELExpression((*matchconditions.MatchCondition)(&mc), withAuthz, environment.NewExpressions))
	}
	for i, v := range vap.Spec.Validations {
		compileErr(fmt.Sprintf("validation %d", i), check.CompileCELExpression(&validating.ValidationCondition{Expression: v.Expression}, withAuthz, environment.NewExpressions))
		if v.MessageExpression != "" {
			compileErr(fmt.Sprintf("validation %d messageExpression", i), check.CompileCELExpression(&validating.MessageExpressionCondition{MessageExpression: v.MessageExpression}, noAuthz, environment.NewExpressions))
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	comp, err := plugincel.NewCompositedCompiler(envSet)
	if err != nil {
		t.Fatal(err)
	}
	var vars []plugincel.NamedExpressionAccessor
	for _, v := range vap.Spec.Variables {
		vars = append(vars, &validating.Variable{Name: v.Name, Expression: v.Expression})
	}
	comp.CompileAndStoreVariables(vars, withAuthz, environment.StoredExpressions)
	var matchers []plugincel.ExpressionAccessor
	for i := range vap.Spec.MatchConditions {
		matchers = append(matchers, (*matchconditions.MatchCondition)(&vap.Spec.MatchConditions[i]))
	}
	validations := make([]plugincel.ExpressionAccessor, len(vap.Spec.Validations))
	messages := make([]plugincel.ExpressionAccessor, len(vap.Spec.Validations))
	for i, v := range vap.Spec.Validations {
		validations[i] = &validating.ValidationCondition{Expression: v.Expression, Message: v.Message, Reason: v.Reason}
		if v.MessageExpression != "" {
			messages[i] = &validating.MessageExpressionCondition{MessageExpression: v.MessageExpression}
		}
	}
	matcher := matchconditions.NewMatcher(comp.CompileCondition(matchers, withAuthz, environment.StoredExpressions), vap.Spec.FailurePolicy, "policy", "validate", vap.Name)
	v := validating.NewValidator(
		comp.CompileCondition(validations, withAuthz, environment.StoredExpressions),
		matcher,
		comp.CompileCondition(nil, withAuthz, environment.StoredExpressions),
		comp.CompileCondition(messages, noAuthz, environment.StoredExpressions),
		vap.Spec.FailurePolicy,
		nil,
	)
	if err := v.CompileError(); err != nil {
		t.Fatalf("%s: %v", vap.Name, err)
	}
	return &policy{name: vap.Name, validator: v}
}

// admit runs the policy on a request; it returns the denial messages (none: admitted). An
// evaluation error fails the test: with failurePolicy Fail it would refuse every request.
func (p *policy) admit(t *testing.T, op admission.Operation, gvr schema.GroupVersionResource, gvk schema.GroupVersionKind, obj, old kruntime.Object, u user.Info) []string {
	t.Helper()
	var name string
	for _, o := range []kruntime.Object{obj, old} {
		if o != nil {
			name = o.(metav1.Object).GetName()
		}
	}
	attrs := admission.NewAttributesRecord(obj, old, gvk, "", name, gvr, "", op, nil, false, u)
	va := &admission.VersionedAttributes{Attributes: attrs, VersionedKind: gvk}
	if obj != nil {
		va.VersionedObject = admission.NewLazyObject(obj)
	}
	if old != nil {
		va.VersionedOldObject = admission.NewLazyObject(old)
	}
	res := p.validator.Validate(context.Background(), gvr, va, nil, nil, celconfig.RuntimeCELCostBudget, nil)
	var denied []string
	for _, d := range res.Decisions {
		if d.Evaluation == validating.EvalError {
			t.Errorf("%s: evaluation error: %s", p.name, d.Message)
		}
		if d.Action == validating.ActionDeny {
			denied = append(denied, d.Message)
		}
	}
	return denied
}

func saInfo(component, node string) user.Info {
	u := &user.DefaultInfo{
		Name:   saUser(component),
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"},
	}
	if node != "" {
		u.Extra = map[string][]string{
			"authentication.kubernetes.io/node-name":     {node},
			"authentication.kubernetes.io/pod-name":      {fullname + "-" + component + "-x7k2p"},
			"authentication.kubernetes.io/credential-id": {"JTI=1"},
		}
	}
	return u
}

func (r *rendered) policy(t *testing.T, name string) *policy {
	t.Helper()
	return compilePolicy(t, as[admissionregistrationv1.ValidatingAdmissionPolicy](t, r.get(t, "ValidatingAdmissionPolicy", name)))
}

// Every policy's expressions compile in the API server's environment, in every configuration.
func TestNodePoliciesCompile(t *testing.T) {
	for name, r := range map[string]*rendered{"defaults": render(t, nil, nil), "everything on": render(t, nil, allOn), "sim": render(t, simFiles(), allOn)} {
		t.Run(name, func(t *testing.T) {
			vaps := r.all("ValidatingAdmissionPolicy")
			if len(vaps) == 0 {
				t.Fatal("no policies")
			}
			for _, u := range vaps {
				compilePolicy(t, as[admissionregistrationv1.ValidatingAdmissionPolicy](t, u))
			}
		})
	}
}

func TestResourceSlicePolicyBehaviour(t *testing.T) {
	p := render(t, nil, nil).policy(t, fullname+"-resourceslices")
	gvr := resourcev1.SchemeGroupVersion.WithResource("resourceslices")
	gvk := resourcev1.SchemeGroupVersion.WithKind("ResourceSlice")
	slice := func(name string, mod func(*resourcev1.ResourceSlice)) *resourcev1.ResourceSlice {
		s := &resourcev1.ResourceSlice{
			TypeMeta:   metav1.TypeMeta{APIVersion: resourcev1.SchemeGroupVersion.String(), Kind: "ResourceSlice"},
			ObjectMeta: metav1.ObjectMeta{Name: name + "-gpu.tessera.dev-abcde"},
			Spec: resourcev1.ResourceSliceSpec{
				Driver:   "gpu.tessera.dev",
				NodeName: &name,
				Pool:     resourcev1.ResourcePool{Name: name, ResourceSliceCount: 1},
				Devices:  []resourcev1.Device{{Name: "gpu-0"}},
			},
		}
		if mod != nil {
			mod(s)
		}
		return s
	}
	own, other := slice("node-a", nil), slice("node-b", nil)
	own2 := slice("node-a", func(s *resourcev1.ResourceSlice) {
		s.Spec.Devices = append(s.Spec.Devices, resourcev1.Device{Name: "gpu-1"})
	})
	allNodes := slice("node-a", func(s *resourcev1.ResourceSlice) { s.Spec.NodeName = nil; s.Spec.AllNodes = ptr(true) })
	plugin := saInfo("kubelet-plugin", "node-a")
	for _, c := range []struct {
		name     string
		op       admission.Operation
		obj, old kruntime.Object
		user     user.Info
		deny     string // a part of the denial message; "" admits
	}{
		{"create own", admission.Create, own, nil, plugin, ""},
		{"update own", admission.Update, own2, own, plugin, ""},
		{"delete own", admission.Delete, nil, own, plugin, ""},
		{"create another node's", admission.Create, other, nil, plugin, "may not write a ResourceSlice of node 'node-b'"},
		{"update another node's", admission.Update, other, other, plugin, "node-b"},
		{"delete another node's", admission.Delete, nil, other, plugin, "node-b"},
		{"create a slice of no node", admission.Create, allNodes, nil, plugin, "of node ''"},
		{"token of no node", admission.Create, own, nil, saInfo("kubelet-plugin", ""), "names no node"},
		{"another user", admission.Create, other, nil, &user.DefaultInfo{Name: "system:node:node-a", Groups: []string{"system:nodes"}}, ""},
		{"another release's plugin", admission.Create, other, nil, &user.DefaultInfo{Name: "system:serviceaccount:" + namespace + ":other-tessera-kubelet-plugin", Extra: map[string][]string{"authentication.kubernetes.io/node-name": {"node-a"}}}, ""},
		{"the device plugin", admission.Create, other, nil, saInfo("device-plugin", "node-a"), ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			checkDecision(t, p.admit(t, c.op, gvr, gvk, c.obj, c.old, c.user), c.deny)
		})
	}
}

func checkDecision(t *testing.T, denied []string, want string) {
	t.Helper()
	if want == "" {
		if len(denied) > 0 {
			t.Errorf("denied: %q, want admitted", denied)
		}
		return
	}
	if !slices.ContainsFunc(denied, func(m string) bool { return strings.Contains(m, want) }) {
		t.Errorf("denials %q, want one saying %q", denied, want)
	}
}

func ptr[T any](v T) *T { return &v }

func TestNodePoliciesBehaviour(t *testing.T) {
	r := render(t, nil, allOn)
	nl := nodeLabels(t)
	migState := nl.MIGManager[0]
	gvr := corev1.SchemeGroupVersion.WithResource("nodes")
	gvk := corev1.SchemeGroupVersion.WithKind("Node")
	base := func(name string) *corev1.Node {
		return &corev1.Node{
			TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
			ObjectMeta: metav1.ObjectMeta{
				Name:        name,
				Labels:      map[string]string{"kubernetes.io/hostname": name, "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", nl.MIGManagerConfig: "all-3g.40gb", migState: "pending"},
				Annotations: map[string]string{"node.alpha.kubernetes.io/ttl": "0"},
			},
			Spec: corev1.NodeSpec{PodCIDR: "10.0.0.0/24"},
		}
	}
	with := func(n *corev1.Node, mod func(*corev1.Node)) *corev1.Node {
		c := n.DeepCopy()
		mod(c)
		return c
	}
	label := func(k, v string) func(*corev1.Node) {
		return func(n *corev1.Node) {
			if n.Labels == nil {
				n.Labels = map[string]string{}
			}
			if v == "" {
				delete(n.Labels, k)
			} else {
				n.Labels[k] = v
			}
		}
	}
	a, b := base("node-a"), base("node-b")
	noLabels := with(a, func(n *corev1.Node) { n.Labels = nil })

	type tc struct {
		name     string
		obj, old *corev1.Node
		user     user.Info
		deny     string
	}
	// Common to both writers: only the own node, only labels, only its own labels.
	common := func(comp, ownKey, ownVal string) []tc {
		u := saInfo(comp, "node-a")
		return []tc{
			{"own label on own node", with(a, label(ownKey, ownVal)), a, u, ""},
			{"own label onto a node without labels", with(noLabels, label(ownKey, ownVal)), noLabels, u, ""},
			{"own label removed", with(a, label(ownKey, "")), a, u, ""},
			{"no change", a, a, u, ""},
			{"own label on another node", with(b, label(ownKey, ownVal)), b, u, "may only change its own Node, not node-b"},
			{"token of no node", with(a, label(ownKey, ownVal)), a, saInfo(comp, ""), "may only change its own Node"},
			{"another label added", with(a, label("example.com/team", "ml")), a, u, "may only change its own labels"},
			{"another label changed", with(a, label("kubernetes.io/hostname", "evil")), a, u, "may only change its own labels"},
			{"another label removed", with(a, label("nvidia.com/gpu.present", "")), a, u, "may only change its own labels"},
			{"the admin's MIG layout label", with(a, label(nl.MIGManagerConfig, "all-disabled")), a, u, "may only change its own labels"},
			{"a taint", with(a, func(n *corev1.Node) {
				n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: "x", Effect: corev1.TaintEffectNoSchedule})
			}), a, u, "may only change labels of its Node"},
			{"cordon", with(a, func(n *corev1.Node) { n.Spec.Unschedulable = true }), a, u, "may only change labels of its Node"},
			{"an annotation", with(a, func(n *corev1.Node) { n.Annotations["x"] = "y" }), a, u, "may only change labels of its Node"},
			{"the kubelet, anything", with(b, func(n *corev1.Node) { n.Spec.Unschedulable = true; n.Labels["x"] = "y" }), b, &user.DefaultInfo{Name: "system:node:node-b", Groups: []string{"system:nodes"}}, ""},
			{"an admin, anything", with(a, label("example.com/team", "ml")), a, &user.DefaultInfo{Name: "kubernetes-admin", Groups: []string{"system:masters"}}, ""},
		}
	}

	t.Run("device-plugin", func(t *testing.T) {
		p := r.policy(t, fullname+"-device-plugin-node")
		cases := common("device-plugin", "nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3-SHARED")
		u := saInfo("device-plugin", "node-a")
		// Every label the plugin owns (and removes when it no longer sets it) is allowed.
		for _, l := range nl.DevicePlugin {
			cases = append(cases,
				tc{"owned label " + l + " set", with(a, label(l, "v1")), a, u, ""},
				tc{"owned label " + l + " changed", with(with(a, label(l, "v1")), label(l, "v2")), with(a, label(l, "v1")), u, ""},
				tc{"owned label " + l + " removed", a, with(a, label(l, "v1")), u, ""},
			)
		}
		cases = append(cases,
			tc{"all owned labels at once", with(a, func(n *corev1.Node) {
				for _, l := range nl.DevicePlugin {
					n.Labels[l] = "1"
				}
			}), a, u, ""},
		)
		cases = append(cases,
			tc{"GPU feature discovery's nvidia.com/gpu.present", with(a, label("nvidia.com/gpu.present", "false")), a, u, "may only change its own labels"},
			tc{"the GPU operator's nvidia.com/gpu.deploy.driver", with(a, label("nvidia.com/gpu.deploy.driver", "false")), a, u, "may only change its own labels"},
		)
		for _, l := range nl.MIGManager {
			cases = append(cases, tc{"the MIG manager's label " + l, with(a, label(l, "success")), a, u, "may only change its own labels"})
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				checkDecision(t, p.admit(t, admission.Update, gvr, gvk, c.obj, c.old, c.user), c.deny)
			})
		}
	})

	// Each policy judges its own writer only: the MIG manager of node-b writing a GPU label on
	// node-a passes the device plugin's policy and is refused by its own.
	t.Run("each policy its own writer", func(t *testing.T) {
		obj, u := with(a, label(nl.DevicePlugin[0], "X")), saInfo("mig-manager", "node-b")
		checkDecision(t, r.policy(t, fullname+"-device-plugin-node").admit(t, admission.Update, gvr, gvk, obj, a, u), "")
		checkDecision(t, r.policy(t, fullname+"-mig-manager-node").admit(t, admission.Update, gvr, gvk, obj, a, u), "may only change its own Node, not node-a")
	})

	t.Run("mig-manager", func(t *testing.T) {
		p := r.policy(t, fullname+"-mig-manager-node")
		cases := common("mig-manager", migState, "success")
		u := saInfo("mig-manager", "node-a")
		for _, l := range nl.MIGManager {
			cases = append(cases,
				tc{"own label " + l + " set", with(a, label(l, "in-progress")), a, u, ""},
				tc{"own label " + l + " removed", with(a, label(l, "")), a, u, ""},
			)
		}
		for _, l := range nl.DevicePlugin {
			cases = append(cases, tc{"the device plugin's label " + l, with(a, label(l, "X")), a, u, "may only change its own labels"})
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				checkDecision(t, p.admit(t, admission.Update, gvr, gvk, c.obj, c.old, c.user), c.deny)
			})
		}
	})
}

// ---------------------------------------------------------------------------------------------
// Flags

var helpFlagRE = regexp.MustCompile(`(?m)^\s+(?:-[a-zA-Z], )?--?([a-zA-Z0-9][a-zA-Z0-9_.-]*)`)

// Every flag the chart passes is one its binary has: the binaries are built and asked for --help
// (a flag they lack would stop the container at start).
func TestContainerFlagsExist(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	t.Parallel() // the build takes a while; the other tests run meanwhile
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	bin := t.TempDir()
	build := exec.Command(goBin, "build", "-o", bin+string(filepath.Separator), "./cmd/tessera", "./cmd/tessera-device-plugin", "./cmd/tessera-kubelet-plugin", "./cmd/tessera-webhook")
	build.Dir = filepath.Join(helm.ChartDir(), "..", "..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	known := map[string]map[string]bool{} // command line before the flags -> its flags
	helpFlags := func(t *testing.T, argv []string) map[string]bool {
		t.Helper()
		k := strings.Join(argv, " ")
		if f, ok := known[k]; ok {
			return f
		}
		cmd := exec.Command(filepath.Join(bin, argv[0]), append(argv[1:], "--help")...)
		out, _ := cmd.CombinedOutput() // --help may exit non-zero; the usage is what counts
		f := map[string]bool{}
		for _, m := range helpFlagRE.FindAllStringSubmatch(string(out), -1) {
			f[m[1]] = true
		}
		if len(f) < 3 {
			t.Fatalf("%s --help lists no flags:\n%s", k, out)
		}
		known[k] = f
		return f
	}
	checked := 0
	for name, r := range map[string]*rendered{"real": render(t, nil, allOn), "sim": render(t, simFiles(), allOn)} {
		var specs []corev1.PodSpec
		for _, ds := range r.daemonSets(t) {
			specs = append(specs, ds.Spec.Template.Spec)
		}
		specs = append(specs, as[appsv1.Deployment](t, r.get(t, "Deployment", fullname+"-webhook")).Spec.Template.Spec)
		for _, spec := range specs {
			for _, c := range spec.Containers {
				if len(c.Command) != 1 || !strings.HasPrefix(c.Command[0], "/usr/bin/") {
					t.Errorf("%s: %s: command %v, want one /usr/bin binary", name, c.Name, c.Command)
					continue
				}
				argv := []string{path.Base(c.Command[0])}
				for _, a := range c.Args {
					if strings.HasPrefix(a, "-") {
						break
					}
					argv = append(argv, a)
				}
				have := helpFlags(t, argv)
				for f := range flags(c) {
					checked++
					if !have[f] {
						t.Errorf("%s: container %s passes --%s, which `%s` does not have", name, c.Name, f, strings.Join(argv, " "))
					}
				}
			}
		}
	}
	if checked < 40 {
		t.Errorf("checked only %d flags", checked)
	}
}
