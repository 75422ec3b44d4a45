package profile

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/tessera-gpu/tessera/api"
)

// DefaultProfileName is the key used when no node label names a profile.
const DefaultProfileName = "default"

// ListProfiles lists the profile names in a mounted ConfigMap directory: its regular files (or
// symlinks to them), without the kubelet's ..data bookkeeping entries and hidden files.
func ListProfiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		st, err := os.Stat(filepath.Join(dir, e.Name()))
		if err != nil || !st.Mode().IsRegular() {
			continue
		}
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names, nil
}

// Selection is which profile a node uses and why.
type Selection struct {
	Name string `json:"name"`
	// By says what chose it: a label "key=value", "default" or "only profile".
	By string `json:"by"`
}

// Select picks a node's profile name from its labels: tessera.dev/sharing-profile, else
// nvidia.com/device-plugin.config, else def when it exists, else the only profile there is.
func Select(labels map[string]string, names []string, def string) (Selection, error) {
	for _, l := range []string{api.NodeLabelProfile, api.NodeLabelNVIDIAConfig} {
		if v, ok := labels[l]; ok && v != "" {
			if !contains(names, v) {
				return Selection{}, &api.FieldError{Path: "metadata.labels[" + l + "]",
					Message: fmt.Sprintf("names profile %q, which the profile ConfigMap does not have (it has: %s)", v, list(names)),
					Fix:     "add the profile to the ConfigMap or correct the label"}
			}
			return Selection{Name: v, By: l + "=" + v}, nil
		}
	}
	// A key named by the caller (a pinned profile) is that key or an error, never another one.
	pinned := def != ""
	if def == "" {
		def = DefaultProfileName
	}
	if contains(names, def) {
		return Selection{Name: def, By: "default"}, nil
	}
	if len(names) == 1 && !pinned {
		return Selection{Name: names[0], By: "only profile"}, nil
	}
	return Selection{}, &api.FieldError{Path: "metadata.labels[" + api.NodeLabelProfile + "]",
		Message: fmt.Sprintf("no label selects a profile and there is no %q profile (the ConfigMap has: %s)", def, list(names)),
		Fix:     fmt.Sprintf("label the node %s=<name> or add a %q key to the ConfigMap", api.NodeLabelProfile, def)}
}

func contains(names []string, n string) bool {
	for _, x := range names {
		if x == n {
			return true
		}
	}
	return false
}

func list(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
