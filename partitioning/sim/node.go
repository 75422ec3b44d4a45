package sim

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/google/uuid"
	"go.yaml.in/yaml/v3"

	"github.com/tessera-gpu/tessera/partitioning/sim/models"
)

//go:embed nodes/*.yaml
var builtinFS embed.FS

// NodeSpec describes a simulated node: its GPUs, their links and the driver. Built-in nodes and
// user node files (`--nvml=sim-file:<path>`) share this format.
type NodeSpec struct {
	Name          string     `yaml:"name" json:"name"`
	Description   string     `yaml:"description,omitempty" json:"description,omitempty"`
	DriverVersion string     `yaml:"driverVersion,omitempty" json:"driverVersion"`
	CUDAVersion   string     `yaml:"cudaVersion,omitempty" json:"cudaVersion"`
	GPUs          []GPUGroup `yaml:"gpus" json:"gpus"`
	NVLink        NVLinkSpec `yaml:"nvlink,omitempty" json:"nvlink"`
	NUMANodes     int        `yaml:"numaNodes,omitempty" json:"numaNodes"`
	PCIBusIDs     []string   `yaml:"pciBusIDs,omitempty" json:"pciBusIDs,omitempty"`
}

// GPUGroup is Count GPUs of one model, indexed in file order.
type GPUGroup struct {
	Model string `yaml:"model" json:"model"`
	Count int    `yaml:"count" json:"count"`
}

// NVLinkSpec says which GPUs are NVLink peers: all of them (an NVSwitch system) or listed pairs.
type NVLinkSpec struct {
	AllToAll bool     `yaml:"allToAll,omitempty" json:"allToAll,omitempty"`
	Pairs    [][2]int `yaml:"pairs,omitempty" json:"pairs,omitempty"`
}

// Defaults for fields a node file may leave out.
const (
	DefaultDriverVersion = "570.133.20"
	DefaultCUDAVersion   = "12.8"
)

// GPUSpec is one resolved GPU of a node.
type GPUSpec struct {
	Index    int    `json:"index"`
	Minor    int    `json:"minor"`
	Model    string `json:"model"`
	UUID     string `json:"uuid"`
	PCIBusID string `json:"pciBusID"`
	NUMANode int    `json:"numaNode"`
}

// Resolved is a node with every GPU laid out: what the simulator serves.
type Resolved struct {
	Spec  NodeSpec       `json:"spec"`
	GPUs  []GPUSpec      `json:"gpus"`
	Links map[int][]int  `json:"links"`
	model []models.Model // by GPU index
}

// BuiltinNodes returns the names of the built-in nodes, sorted.
func BuiltinNodes() []string {
	ents, _ := builtinFS.ReadDir("nodes")
	var out []string
	for _, e := range ents {
		out = append(out, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	sort.Strings(out)
	return out
}

// BuiltinNode returns a built-in node's spec. An unknown name is an error listing the names that exist.
func BuiltinNode(name string) (NodeSpec, error) {
	data, err := builtinFS.ReadFile(path.Join("nodes", name+".yaml"))
	if err != nil {
		return NodeSpec{}, fmt.Errorf("unknown simulated node %q: the built-in nodes are %s (or describe your own with --nvml=sim-file:<path>)",
			name, strings.Join(BuiltinNodes(), ", "))
	}
	return ParseNodeSpec(data, "built-in node "+name)
}

// LoadNodeFile reads and checks a node file.
func LoadNodeFile(file string) (NodeSpec, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return NodeSpec{}, fmt.Errorf("reading simulated node file: %w", err)
	}
	return ParseNodeSpec(data, file)
}

var nodeNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)

// ParseNodeSpec decodes a node description strictly and checks it. Errors name the source, the line
// and the field, and say how to fix it.
func ParseNodeSpec(data []byte, source string) (NodeSpec, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return NodeSpec{}, fmt.Errorf("%s: %w", source, err)
	}
	var spec NodeSpec
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&spec); err != nil {
		return NodeSpec{}, fmt.Errorf("%s: %w (fields: name, description, driverVersion, cudaVersion, gpus[].model, gpus[].count, nvlink.allToAll, nvlink.pairs, numaNodes, pciBusIDs)", source, err)
	}
	fail := func(field string, format string, args ...any) error {
		return fmt.Errorf("%s: line %d: field %s: %s", source, lineOf(&root, field), field, fmt.Sprintf(format, args...))
	}
	if !nodeNameRE.MatchString(spec.Name) {
		return NodeSpec{}, fail("name", "%q is not a valid node name: use lower-case letters, digits, '-' and '.'", spec.Name)
	}
	if spec.DriverVersion == "" {
		spec.DriverVersion = DefaultDriverVersion
	}
	if !regexp.MustCompile(`^\d+\.\d+(\.\d+)?$`).MatchString(spec.DriverVersion) {
		return NodeSpec{}, fail("driverVersion", "%q is not a driver version like %s", spec.DriverVersion, DefaultDriverVersion)
	}
	if spec.CUDAVersion == "" {
		spec.CUDAVersion = DefaultCUDAVersion
	}
	if !regexp.MustCompile(`^\d+\.\d$`).MatchString(spec.CUDAVersion) {
		return NodeSpec{}, fail("cudaVersion", "%q is not a CUDA version like %s", spec.CUDAVersion, DefaultCUDAVersion)
	}
	if len(spec.GPUs) == 0 {
		return NodeSpec{}, fail("gpus", "a node needs at least one GPU group, e.g. gpus: [{model: h100-sxm5-80gb, count: 8}]")
	}
	total := 0
	for i, g := range spec.GPUs {
		if _, err := models.Get(g.Model); err != nil {
			return NodeSpec{}, fail(fmt.Sprintf("gpus[%d].model", i), "%v", err)
		}
		if g.Count < 1 || g.Count > 64 {
			return NodeSpec{}, fail(fmt.Sprintf("gpus[%d].count", i), "%d is out of range: use 1 to 64", g.Count)
		}
		total += g.Count
	}
	if total > 64 {
		return NodeSpec{}, fail("gpus", "%d GPUs in all; a simulated node holds at most 64", total)
	}
	if spec.NVLink.AllToAll && len(spec.NVLink.Pairs) > 0 {
		return NodeSpec{}, fail("nvlink", "set either allToAll or pairs, not both")
	}
	for i, p := range spec.NVLink.Pairs {
		if p[0] == p[1] || p[0] < 0 || p[1] < 0 || p[0] >= total || p[1] >= total {
			return NodeSpec{}, fail(fmt.Sprintf("nvlink.pairs[%d]", i), "%v must name two different GPU indices below %d", p, total)
		}
	}
	if spec.NUMANodes == 0 {
		spec.NUMANodes = 1
	}
	if spec.NUMANodes < 0 || spec.NUMANodes > total {
		return NodeSpec{}, fail("numaNodes", "%d is out of range: use 1 to %d", spec.NUMANodes, total)
	}
	if len(spec.PCIBusIDs) > 0 && len(spec.PCIBusIDs) != total {
		return NodeSpec{}, fail("pciBusIDs", "lists %d bus IDs for %d GPUs: give one per GPU or none", len(spec.PCIBusIDs), total)
	}
	busRE := regexp.MustCompile(`^[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.[0-7]$`)
	for i, b := range spec.PCIBusIDs {
		if !busRE.MatchString(b) {
			return NodeSpec{}, fail(fmt.Sprintf("pciBusIDs[%d]", i), "%q is not an NVML bus ID like 00000000:18:00.0 (upper-case hex)", b)
		}
	}
	return spec, nil
}

// lineOf finds the line of a dotted field path (with [i] indices) in a YAML document; 0 if unknown.
func lineOf(doc *yaml.Node, field string) int {
	n := doc
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, part := range strings.Split(field, ".") {
		key, idx := part, -1
		if i := strings.IndexByte(part, '['); i >= 0 {
			key = part[:i]
			fmt.Sscanf(part[i:], "[%d]", &idx)
		}
		found := false
		if n.Kind == yaml.MappingNode {
			for j := 0; j+1 < len(n.Content); j += 2 {
				if n.Content[j].Value == key {
					line, n, found = n.Content[j].Line, n.Content[j+1], true
					break
				}
			}
		}
		if !found {
			return line
		}
		if idx >= 0 && n.Kind == yaml.SequenceNode && idx < len(n.Content) {
			n = n.Content[idx]
			line = n.Line
		}
	}
	return line
}

// uuidSpace namespaces the simulator's name-based UUIDs.
var uuidSpace = uuid.MustParse("6f1d3c2e-7a41-4b8e-9c5d-2b7e8f0a1c34")

// Resolve lays out the node's GPUs: indices, minors, stable UUIDs, bus IDs, NUMA nodes and links.
func Resolve(spec NodeSpec) (*Resolved, error) {
	r := &Resolved{Spec: spec, Links: map[int][]int{}}
	for _, g := range spec.GPUs {
		m, err := models.Get(g.Model)
		if err != nil {
			return nil, err
		}
		for range g.Count {
			i := len(r.GPUs)
			bus := fmt.Sprintf("00000000:%02X:00.0", 0x10+i*0x10)
			if len(spec.PCIBusIDs) > 0 {
				bus = spec.PCIBusIDs[i]
			}
			r.GPUs = append(r.GPUs, GPUSpec{
				Index:    i,
				Minor:    i,
				Model:    m.ID,
				UUID:     "GPU-" + uuid.NewSHA1(uuidSpace, fmt.Appendf(nil, "%s/%d/%s", spec.Name, i, m.ID)).String(),
				PCIBusID: bus,
			})
			r.model = append(r.model, m)
		}
	}
	n := len(r.GPUs)
	for i := range r.GPUs {
		r.GPUs[i].NUMANode = i * spec.NUMANodes / n
	}
	if spec.NVLink.AllToAll {
		for i := range n {
			for j := range n {
				if i != j && r.model[i].NVLinks > 0 && r.model[j].NVLinks > 0 {
					r.Links[i] = append(r.Links[i], j)
				}
			}
		}
	}
	for _, p := range spec.NVLink.Pairs {
		r.Links[p[0]] = append(r.Links[p[0]], p[1])
		r.Links[p[1]] = append(r.Links[p[1]], p[0])
	}
	for i := range r.Links {
		sort.Ints(r.Links[i])
	}
	return r, nil
}

// Model returns the model of GPU i.
func (r *Resolved) Model(i int) models.Model { return r.model[i] }

// rehydrate restores the models of a node read back from disk.
func (r *Resolved) rehydrate() error {
	r.model = r.model[:0]
	for _, g := range r.GPUs {
		m, err := models.Get(g.Model)
		if err != nil {
			return fmt.Errorf("simulated node state names GPU model %q: %w", g.Model, err)
		}
		r.model = append(r.model, m)
	}
	if len(r.model) == 0 {
		return errors.New("simulated node state lists no GPUs")
	}
	return nil
}
