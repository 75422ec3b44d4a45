// Package manifests checks the shipped monitoring manifests against the code: every metric the
// Grafana dashboard and the autoscaling example use must be one the daemons export.
package manifests

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

const (
	dashboardPath = "deployments/monitoring/grafana-dashboard.json"
	hpaPath       = "deployments/monitoring/hpa-example.yaml"
)

// metricDirs hold the code that defines the daemons' metrics.
var metricDirs = []string{"telemetry", "plugin", "dra"}

// metricRE finds metric names in PromQL.
var metricRE = regexp.MustCompile(`tessera_[a-z_]+`)

// histogramSuffixes are the series a histogram family exports besides its name.
var histogramSuffixes = []string{"_bucket", "_sum", "_count"}

// repoRoot walks up from the working directory to the directory holding go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the working directory")
		}
		dir = parent
	}
}

func readRepoFile(t *testing.T, rel string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// metricSource is the text of the non-test Go files that define metrics.
type metricSource struct {
	files map[string]string // repo-relative path -> content
}

func loadMetricSource(t *testing.T) metricSource {
	t.Helper()
	root := repoRoot(t)
	src := metricSource{files: map[string]string{}}
	for _, d := range metricDirs {
		err := filepath.WalkDir(filepath.Join(root, d), func(path string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if e.IsDir() && (e.Name() == "testdata" || strings.HasPrefix(e.Name(), ".")) {
				return filepath.SkipDir
			}
			if e.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, path)
			src.files[rel] = string(data)
			return nil
		})
		if err != nil {
			t.Fatalf("reading %s: %v", d, err)
		}
	}
	if len(src.files) == 0 {
		t.Fatalf("no Go files under %v", metricDirs)
	}
	return src
}

// defines reports whether a file names the metric quoted ("name"), or writes its TYPE line in the
// text exposition format (a hand-written family: "# TYPE name gauge").
func (s metricSource) defines(name string) bool {
	q, typeLine := `"`+name+`"`, "# TYPE "+name+" "
	for _, text := range s.files {
		if strings.Contains(text, q) || strings.Contains(text, typeLine) {
			return true
		}
	}
	return false
}

// definesHistogram reports whether a line that names the metric, quoted, also says it is a histogram
// (header(..., "histogram", ...), hist(...), prometheus.NewHistogram...).
func (s metricSource) definesHistogram(name string) bool {
	q := `"` + name + `"`
	for _, text := range s.files {
		for line := range strings.Lines(text) {
			if strings.Contains(line, q) && strings.Contains(strings.ToLower(line), "hist") {
				return true
			}
		}
	}
	return false
}

// undefined returns the names the source does not define: a name must be quoted in it, or be a
// histogram's _bucket, _sum or _count series of a name defined as a histogram.
func (s metricSource) undefined(names []string) []string {
	var out []string
	for _, n := range names {
		if s.defines(n) {
			continue
		}
		ok := false
		for _, suf := range histogramSuffixes {
			if base, cut := strings.CutSuffix(n, suf); cut && s.definesHistogram(base) {
				ok = true
				break
			}
		}
		if !ok {
			out = append(out, n)
		}
	}
	return out
}

// metricNames returns the tessera_ metric names in PromQL expressions, sorted, once each.
func metricNames(exprs []string) []string {
	var out []string
	for _, e := range exprs {
		out = append(out, metricRE.FindAllString(e, -1)...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// dashboard is the part of a Grafana dashboard the checks read.
type dashboard struct {
	SchemaVersion int     `json:"schemaVersion"`
	UID           string  `json:"uid"`
	Title         string  `json:"title"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *datasourceRef  `json:"datasource"`
	Targets    []target        `json:"targets"`
	Panels     []panel         `json:"panels"` // a collapsed row's panels
	GridPos    json.RawMessage `json:"gridPos"`
}

type target struct {
	RefID      string         `json:"refId"`
	Expr       string         `json:"expr"`
	Datasource *datasourceRef `json:"datasource"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type variable struct {
	Type       string          `json:"type"`
	Name       string          `json:"name"`
	Query      json.RawMessage `json:"query"` // a string, or {"query": "..."}
	Definition string          `json:"definition"`
	Datasource *datasourceRef  `json:"datasource"`
}

// queryText is a variable's query, whichever form it takes.
func (v variable) queryText() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var q struct {
		Query string `json:"query"`
	}
	if json.Unmarshal(v.Query, &q) == nil {
		return q.Query
	}
	return ""
}

func parseDashboard(data []byte) (dashboard, error) {
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&d); err != nil {
		return d, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return d, errors.New("trailing data after the dashboard object")
	}
	return d, nil
}

// allPanels flattens rows.
func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// exprs returns every PromQL expression of the dashboard: panel targets and query variables.
func (d dashboard) exprs() []string {
	var out []string
	for _, p := range allPanels(d.Panels) {
		for _, t := range p.Targets {
			out = append(out, t.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			out = append(out, v.queryText(), v.Definition)
		}
	}
	return out
}

// problems lists what is wrong with the dashboard's structure (not its metric names).
func (d dashboard) problems() []string {
	var out []string
	bad := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	if d.SchemaVersion < 36 {
		bad("schemaVersion %d: want 36 or newer (datasource references by uid)", d.SchemaVersion)
	}
	if d.UID == "" || d.Title == "" {
		bad("the dashboard needs a uid and a title")
	}
	vars := map[string]variable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
	}
	if v, ok := vars["datasource"]; !ok || v.Type != "datasource" || v.queryText() != "prometheus" {
		bad("no Prometheus datasource variable named datasource")
	}
	for _, name := range []string{"node", "instance"} {
		if v, ok := vars[name]; !ok || v.Type != "query" || v.queryText() == "" {
			bad("no query variable %q", name)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != "${datasource}") {
			bad("variable %q does not query ${datasource}", v.Name)
		}
	}
	ids := map[int]string{}
	for _, p := range allPanels(d.Panels) {
		if prev, dup := ids[p.ID]; dup || p.ID == 0 {
			bad("panel %q: id %d missing or also used by %q", p.Title, p.ID, prev)
		}
		ids[p.ID] = p.Title
		if len(p.GridPos) == 0 {
			bad("panel %q has no gridPos", p.Title)
		}
		if p.Type == "row" {
			continue
		}
		if p.Title == "" {
			bad("panel %d has no title", p.ID)
		}
		if len(p.Targets) == 0 {
			bad("panel %q has no query", p.Title)
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			bad("panel %q does not use ${datasource}", p.Title)
		}
		refs := map[string]bool{}
		for _, t := range p.Targets {
			if strings.TrimSpace(t.Expr) == "" {
				bad("panel %q: query %s is empty", p.Title, t.RefID)
			}
			if t.Datasource != nil && t.Datasource.UID != "${datasource}" {
				bad("panel %q: query %s does not use ${datasource}", p.Title, t.RefID)
			}
			if refs[t.RefID] {
				bad("panel %q: refId %q twice", p.Title, t.RefID)
			}
			refs[t.RefID] = true
		}
	}
	return out
}

func TestDashboardUsesOnlyMetricsTheCodeDefines(t *testing.T) {
	d, err := parseDashboard(readRepoFile(t, dashboardPath))
	if err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	for _, p := range d.problems() {
		t.Errorf("%s: %s", dashboardPath, p)
	}
	names := metricNames(d.exprs())
	if len(names) == 0 {
		t.Fatalf("%s: no tessera_ metric in any query", dashboardPath)
	}
	src := loadMetricSource(t)
	for _, n := range src.undefined(names) {
		t.Errorf("%s uses %s, which no non-test Go file under %v defines", dashboardPath, n, metricDirs)
	}
	// The panels the dashboard is for.
	for _, n := range []string{"tessera_gpu_utilization_percent", "tessera_device_allocated", "tessera_device_idle",
		"tessera_pod_gpu_memory_used_bytes", "tessera_device_memory_limit_bytes", "tessera_gpu_power_watts",
		"tessera_gpu_temperature_celsius", "tessera_dra_prepare_seconds_bucket", "tessera_device_plugin_allocations_total"} {
		if !slices.Contains(names, n) {
			t.Errorf("%s has no panel on %s", dashboardPath, n)
		}
	}
	t.Logf("%d metric names: %s", len(names), strings.Join(names, " "))
}

// The checks above must be able to fail.
func TestDashboardCheckCatchesWhatTheCodeLacks(t *testing.T) {
	src := loadMetricSource(t)
	d, err := parseDashboard([]byte(`{
	  "schemaVersion": 39, "uid": "x", "title": "x",
	  "templating": {"list": [{"type": "datasource", "name": "datasource", "query": "prometheus"}]},
	  "panels": [
	    {"id": 1, "type": "row", "title": "r", "gridPos": {}, "panels": [
	      {"id": 2, "type": "stat", "title": "a", "gridPos": {}, "datasource": {"uid": "${datasource}"},
	       "targets": [{"refId": "A", "expr": "avg(tessera_gpu_utilization_percent) + tessera_nonexistent"}]}]},
	    {"id": 2, "type": "timeseries", "title": "b", "gridPos": {}, "datasource": {"uid": "prom"},
	     "targets": [{"refId": "A", "expr": "histogram_quantile(0.9, rate(tessera_dra_prepare_seconds_bucket[5m])) + tessera_gpu_power_watts_bucket"},
	                 {"refId": "A", "expr": ""}]}
	  ]}`))
	if err != nil {
		t.Fatal(err)
	}
	got := src.undefined(metricNames(d.exprs()))
	if want := []string{"tessera_gpu_power_watts_bucket", "tessera_nonexistent"}; !slices.Equal(got, want) {
		t.Errorf("undefined %q, want %q", got, want)
	}
	probs := strings.Join(d.problems(), "\n")
	for _, want := range []string{"no query variable \"node\"", "also used by", "does not use ${datasource}", "query A is empty", "refId \"A\" twice"} {
		if !strings.Contains(probs, want) {
			t.Errorf("problems do not say %q:\n%s", want, probs)
		}
	}
}

// adapterConfig is the part of prometheus-adapter's configuration the example uses
// (github.com/kubernetes-sigs/prometheus-adapter, pkg/config).
type adapterConfig struct {
	Rules []adapterRule `json:"rules"`
}

type adapterRule struct {
	SeriesQuery   string `json:"seriesQuery"`
	SeriesFilters []struct {
		Is    string `json:"is,omitempty"`
		IsNot string `json:"isNot,omitempty"`
	} `json:"seriesFilters,omitempty"`
	Resources struct {
		Template  string `json:"template,omitempty"`
		Overrides map[string]struct {
			Group    string `json:"group,omitempty"`
			Resource string `json:"resource"`
		} `json:"overrides,omitempty"`
	} `json:"resources"`
	Name struct {
		Matches string `json:"matches"`
		As      string `json:"as"`
	} `json:"name"`
	MetricsQuery string `json:"metricsQuery"`
}

// seriesRE reads the metric name of a series selector such as `name{label!=""}`.
var seriesRE = regexp.MustCompile(`^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*$`)

// apiName is the name the adapter gives a series in the custom metrics API, as prometheus-adapter
// derives it (pkg/naming: `as` defaults to $0 without a capture group and $1 with one).
func (r adapterRule) apiName(series string) (string, error) {
	re := regexp.MustCompile(".*")
	if r.Name.Matches != "" {
		var err error
		if re, err = regexp.Compile(r.Name.Matches); err != nil {
			return "", fmt.Errorf("name.matches: %w", err)
		}
	}
	as := r.Name.As
	if as == "" {
		switch re.NumSubexp() {
		case 0:
			as = "$0"
		case 1:
			as = "$1"
		default:
			return "", fmt.Errorf("name.matches %q has several groups and no name.as", r.Name.Matches)
		}
	}
	m := re.FindStringSubmatchIndex(series)
	if m == nil {
		return "", fmt.Errorf("name.matches %q does not match the series %s", r.Name.Matches, series)
	}
	return string(re.ExpandString(nil, as, series, m)), nil
}

// hpaExample is the decoded example.
type hpaExample struct {
	adapter     []adapterConfig
	deployments []appsv1.Deployment
	hpas        []autoscalingv2.HorizontalPodAutoscaler
}

// decodeHPAExample decodes every document of the example strictly into its typed object.
func decodeHPAExample(data []byte) (hpaExample, error) {
	var ex hpaExample
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 1; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return ex, nil
		}
		if err != nil {
			return ex, fmt.Errorf("document %d: %w", i, err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			return ex, fmt.Errorf("document %d: %w", i, err)
		}
		switch {
		case tm.Kind == "" && tm.APIVersion == "":
			continue // comments only
		case tm.APIVersion == "v1" && tm.Kind == "ConfigMap":
			var cm corev1.ConfigMap
			if err := yaml.UnmarshalStrict(doc, &cm); err != nil {
				return ex, fmt.Errorf("document %d (ConfigMap): %w", i, err)
			}
			cfg, ok := cm.Data["config.yaml"]
			if !ok {
				return ex, fmt.Errorf("ConfigMap %s has no config.yaml", cm.Name)
			}
			var ac adapterConfig
			if err := yaml.UnmarshalStrict([]byte(cfg), &ac); err != nil {
				return ex, fmt.Errorf("ConfigMap %s config.yaml: %w", cm.Name, err)
			}
			ex.adapter = append(ex.adapter, ac)
		case tm.APIVersion == "apps/v1" && tm.Kind == "Deployment":
			var d appsv1.Deployment
			if err := yaml.UnmarshalStrict(doc, &d); err != nil {
				return ex, fmt.Errorf("document %d (Deployment): %w", i, err)
			}
			ex.deployments = append(ex.deployments, d)
		case tm.APIVersion == "autoscaling/v2" && tm.Kind == "HorizontalPodAutoscaler":
			var h autoscalingv2.HorizontalPodAutoscaler
			if err := yaml.UnmarshalStrict(doc, &h); err != nil {
				return ex, fmt.Errorf("document %d (HorizontalPodAutoscaler): %w", i, err)
			}
			ex.hpas = append(ex.hpas, h)
		default:
			return ex, fmt.Errorf("document %d: unexpected %s %s", i, tm.APIVersion, tm.Kind)
		}
	}
}

// problems checks the chain metric -> adapter rule -> HPA -> Deployment.
func (ex hpaExample) problems(src metricSource) []string {
	var out []string
	bad := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	if len(ex.adapter) != 1 || len(ex.deployments) != 1 || len(ex.hpas) != 1 {
		bad("want one adapter ConfigMap, one Deployment and one HPA; have %d, %d, %d", len(ex.adapter), len(ex.deployments), len(ex.hpas))
		return out
	}
	// API name -> Prometheus series.
	exposed := map[string]string{}
	for _, rule := range ex.adapter[0].Rules {
		m := seriesRE.FindStringSubmatch(rule.SeriesQuery)
		if m == nil {
			bad("seriesQuery %q: want metric_name{...}", rule.SeriesQuery)
			continue
		}
		series := m[1]
		if !src.defines(series) {
			bad("seriesQuery uses %s, which no non-test Go file under %v defines", series, metricDirs)
		}
		if !strings.HasPrefix(series, "tessera_") {
			bad("seriesQuery %s is not a Tessera metric", series)
		}
		for label, want := range map[string][]string{"namespace": {"namespace", "namespaces"}, "pod": {"pod", "pods"}} {
			o, ok := rule.Resources.Overrides[label]
			if !ok || o.Group != "" || !slices.Contains(want, o.Resource) {
				bad("rule for %s: label %s must map to resource %s", series, label, want[0])
			}
		}
		for _, part := range []string{"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} {
			if !strings.Contains(rule.MetricsQuery, part) {
				bad("rule for %s: metricsQuery lacks %s", series, part)
			}
		}
		name, err := rule.apiName(series)
		if err != nil {
			bad("rule for %s: %v", series, err)
			continue
		}
		exposed[name] = series
	}
	h, d := ex.hpas[0], ex.deployments[0]
	if h.Namespace != d.Namespace || h.Spec.ScaleTargetRef.Kind != "Deployment" || h.Spec.ScaleTargetRef.Name != d.Name ||
		h.Spec.ScaleTargetRef.APIVersion != "apps/v1" {
		bad("HPA %s/%s scales %s %s, not Deployment %s/%s", h.Namespace, h.Name, h.Spec.ScaleTargetRef.Kind, h.Spec.ScaleTargetRef.Name, d.Namespace, d.Name)
	}
	if h.Spec.MinReplicas != nil && *h.Spec.MinReplicas > h.Spec.MaxReplicas {
		bad("HPA minReplicas %d above maxReplicas %d", *h.Spec.MinReplicas, h.Spec.MaxReplicas)
	}
	pods := 0
	for _, m := range h.Spec.Metrics {
		if m.Type != autoscalingv2.PodsMetricSourceType || m.Pods == nil {
			continue
		}
		pods++
		series, ok := exposed[m.Pods.Metric.Name]
		if !ok {
			bad("HPA metric %q is not a name the adapter rule exposes (%v)", m.Pods.Metric.Name, slices.Sorted(maps.Keys(exposed)))
		} else if series != "tessera_pod_gpu_utilization_percent" {
			bad("HPA metric %q comes from %s, not the per-pod GPU utilization", m.Pods.Metric.Name, series)
		}
		if m.Pods.Target.Type != autoscalingv2.AverageValueMetricType || m.Pods.Target.AverageValue == nil || m.Pods.Target.AverageValue.Sign() <= 0 {
			bad("HPA metric %q: want a positive target averageValue", m.Pods.Metric.Name)
		}
	}
	if pods == 0 {
		bad("HPA has no metric of type Pods")
	}
	// Per-pod utilization is the GPU's own only for a pod holding a whole GPU.
	whole := false
	for _, c := range d.Spec.Template.Spec.Containers {
		if q, ok := c.Resources.Limits["nvidia.com/gpu"]; ok && q.Cmp(resource.MustParse("1")) == 0 {
			whole = true
		}
	}
	if !whole {
		bad("Deployment %s: no container requests nvidia.com/gpu: 1", d.Name)
	}
	return out
}

func TestHPAExampleScalesOnAMetricTheCodeDefines(t *testing.T) {
	ex, err := decodeHPAExample(readRepoFile(t, hpaPath))
	if err != nil {
		t.Fatalf("%s: %v", hpaPath, err)
	}
	for _, p := range ex.problems(loadMetricSource(t)) {
		t.Errorf("%s: %s", hpaPath, p)
	}
}

func TestHPAExampleCheckCatchesMismatches(t *testing.T) {
	src := loadMetricSource(t)
	good := string(readRepoFile(t, hpaPath))
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"HPA metric renamed", "name: gpu_utilization_percent", "name: gpu_util", `HPA metric "gpu_util" is not a name the adapter rule exposes`},
		{"series the code lacks", "seriesQuery: 'tessera_pod_gpu_utilization_percent{", "seriesQuery: 'tessera_nonexistent{", "tessera_nonexistent, which no non-test Go file"},
		{"a fraction of a GPU", "nvidia.com/gpu: 1", "nvidia.com/gpu.shared: 1", "no container requests nvidia.com/gpu: 1"},
		{"pod label unmapped", `pod: {resource: "pod"}`, `pod_name: {resource: "pod"}`, "label pod must map to resource pod"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(good, tc.old) {
				t.Fatalf("%s no longer contains %q; update this test", hpaPath, tc.old)
			}
			ex, err := decodeHPAExample([]byte(strings.Replace(good, tc.old, tc.new, 1)))
			if err != nil {
				t.Fatal(err)
			}
			probs := strings.Join(ex.problems(src), "\n")
			if !strings.Contains(probs, tc.want) {
				t.Errorf("problems do not say %q:\n%s", tc.want, probs)
			}
		})
	}
	// A field that does not exist is refused, not ignored.
	if _, err := decodeHPAExample([]byte(strings.Replace(good, "averageValue:", "averageValues:", 1))); err == nil {
		t.Error("an unknown HPA field was accepted")
	}
}
