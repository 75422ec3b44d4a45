// Package mig makes a node's MIG layout match a declaration: it reads mig-parted's `version: v1`
// config files as they are, plans placements with a search over each model's placement table (never
// by trial and error against the driver), and applies the difference safely — GPUs already in the
// desired state are not touched, instances in use are kept unless forced, and a failure part-way
// rolls the GPU back to the layout it had.
package mig

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Config is a mig-parted `version: v1` file: named layouts, each a list of entries that select GPUs.
type Config struct {
	Version    string                  `yaml:"version"`
	MigConfigs map[string][]DeviceSpec `yaml:"mig-configs"`
}

// DeviceSpec is one entry of a layout.
type DeviceSpec struct {
	// Devices selects GPUs by index; nil means "all".
	Devices DeviceList `yaml:"devices"`
	// DeviceFilter narrows the selection to GPUs whose PCI device ID (e.g. 0x20B010DE) or product
	// name (e.g. "NVIDIA A100-SXM4-40GB") is listed.
	DeviceFilter StringList `yaml:"device-filter,omitempty"`
	MigEnabled   *bool      `yaml:"mig-enabled"`
	// MigDevices maps GPU-instance profiles to counts, e.g. {"1g.10gb": 7}.
	MigDevices map[string]int `yaml:"mig-devices,omitempty"`
	// Placements (a Tessera extension) pins instances to start positions; the planner places the rest.
	Placements []PinnedPlacement `yaml:"placements,omitempty"`

	line int
}

// PinnedPlacement pins one instance of a profile to a start position (in memory slices).
type PinnedPlacement struct {
	Profile string `yaml:"profile"`
	Start   int    `yaml:"start"`
}

// DeviceList is `all` or a list of GPU indices.
type DeviceList struct {
	All     bool
	Indices []int
}

// UnmarshalYAML accepts `all`, a list of indices, or a single index.
func (d *DeviceList) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		if n.Value == "all" {
			d.All = true
			return nil
		}
		i, err := strconv.Atoi(n.Value)
		if err != nil || i < 0 {
			return fmt.Errorf("line %d: devices: %q is neither `all` nor a GPU index", n.Line, n.Value)
		}
		d.Indices = []int{i}
		return nil
	case yaml.SequenceNode:
		for _, c := range n.Content {
			i, err := strconv.Atoi(c.Value)
			if c.Kind != yaml.ScalarNode || err != nil || i < 0 {
				return fmt.Errorf("line %d: devices: %q is not a GPU index (use `all` or a list such as [0, 1])", c.Line, c.Value)
			}
			d.Indices = append(d.Indices, i)
		}
		return nil
	}
	return fmt.Errorf("line %d: devices: use `all` or a list of GPU indices", n.Line)
}

// StringList is one string or a list of strings.
type StringList []string

// UnmarshalYAML accepts a string or a list of strings.
func (s *StringList) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		*s = StringList{n.Value}
		return nil
	case yaml.SequenceNode:
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: device-filter: list PCI device IDs or product names as strings", c.Line)
			}
			*s = append(*s, c.Value)
		}
		return nil
	}
	return fmt.Errorf("line %d: device-filter: use a string or a list of strings", n.Line)
}

// LoadConfig reads a config file.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading MIG config: %w", err)
	}
	return ParseConfig(data, path)
}

var (
	profileRE   = regexp.MustCompile(`^[1-8]g\.\d+gb(\+me|\+me\.all|-me|\+gfx)?$`)
	ciProfileRE = regexp.MustCompile(`^[1-8]c\.[1-8]g\.\d+gb`)
	pciIDRE     = regexp.MustCompile(`^0x[0-9a-fA-F]{8}$`)
)

// ParseConfig decodes and checks a config strictly: an unknown field, a wrong type or an impossible
// value is an error that names the source, line and field.
func ParseConfig(data []byte, source string) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("%s: %w (fields: version, mig-configs.<name>[].devices, device-filter, mig-enabled, mig-devices, placements)", source, err)
	}
	var root yaml.Node
	_ = yaml.Unmarshal(data, &root)
	lines := entryLines(&root)
	if cfg.Version != "v1" {
		return nil, fmt.Errorf("%s: version: %q is not supported: use `version: v1`", source, cfg.Version)
	}
	if len(cfg.MigConfigs) == 0 {
		return nil, fmt.Errorf("%s: mig-configs: no layouts defined; add e.g. `all-disabled: [{devices: all, mig-enabled: false}]`", source)
	}
	for _, name := range cfg.Names() {
		entries := cfg.MigConfigs[name]
		if len(entries) == 0 {
			return nil, fmt.Errorf("%s: mig-configs.%s: the layout has no entries", source, name)
		}
		for i := range entries {
			e := &entries[i]
			if l := lines[name]; i < len(l) {
				e.line = l[i]
			}
			field := fmt.Sprintf("%s: line %d: mig-configs.%s[%d]", source, e.line, name, i)
			if e.MigEnabled == nil {
				return nil, fmt.Errorf("%s.mig-enabled: required: say true or false", field)
			}
			if !e.Devices.All && len(e.Devices.Indices) == 0 {
				return nil, fmt.Errorf("%s.devices: required: `all` or a list of GPU indices", field)
			}
			for _, f := range e.DeviceFilter {
				if strings.HasPrefix(f, "0x") && !pciIDRE.MatchString(f) {
					return nil, fmt.Errorf("%s.device-filter: %q is not a PCI device ID like 0x20B010DE", field, f)
				}
			}
			if !*e.MigEnabled && (len(e.MigDevices) > 0 || len(e.Placements) > 0) {
				return nil, fmt.Errorf("%s.mig-devices: MIG devices need `mig-enabled: true`", field)
			}
			for _, p := range sortedKeys(e.MigDevices) {
				n := e.MigDevices[p]
				switch {
				case ciProfileRE.MatchString(p):
					return nil, fmt.Errorf("%s.mig-devices.%s: compute-instance profiles are not supported; name GPU-instance profiles such as %s", field, p, p[strings.IndexByte(p, '.')+1:])
				case !profileRE.MatchString(p):
					return nil, fmt.Errorf("%s.mig-devices.%s: not a MIG profile name like 1g.10gb or 3g.40gb", field, p)
				case n < 0:
					return nil, fmt.Errorf("%s.mig-devices.%s: count %d is negative", field, p, n)
				}
			}
			pinned := map[string]int{}
			for j, pp := range e.Placements {
				pinned[pp.Profile]++
				if pinned[pp.Profile] > e.MigDevices[pp.Profile] {
					return nil, fmt.Errorf("%s.placements[%d]: pins %d x %s but mig-devices asks for %d", field, j, pinned[pp.Profile], pp.Profile, e.MigDevices[pp.Profile])
				}
				if pp.Start < 0 {
					return nil, fmt.Errorf("%s.placements[%d].start: %d is negative", field, j, pp.Start)
				}
			}
		}
	}
	return &cfg, nil
}

// entryLines finds the line of every entry of every layout.
func entryLines(root *yaml.Node) map[string][]int {
	out := map[string][]int{}
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	if n.Kind != yaml.MappingNode {
		return out
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value != "mig-configs" || n.Content[i+1].Kind != yaml.MappingNode {
			continue
		}
		m := n.Content[i+1]
		for j := 0; j+1 < len(m.Content); j += 2 {
			for _, e := range m.Content[j+1].Content {
				out[m.Content[j].Value] = append(out[m.Content[j].Value], e.Line)
			}
		}
	}
	return out
}

// Names lists the layouts, sorted.
func (c *Config) Names() []string { return sortedKeys(c.MigConfigs) }

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
