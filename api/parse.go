package api

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Format is the kind of document a profile was read from.
type Format string

// Formats.
const (
	FormatSharingProfile Format = "SharingProfile"
	FormatNVIDIA         Format = "NVIDIA device-plugin config v1"
)

// Parsed is a validated profile and where it came from.
type Parsed struct {
	Profile  *SharingProfile
	Format   Format
	Warnings Warnings
}

// ParseProfile reads a SharingProfile (apiVersion tessera.dev/v1alpha1) or an NVIDIA device-plugin
// config (version: v1), converts the latter, and validates the result. Errors are an ErrorList.
func ParseProfile(data []byte) (*Parsed, error) {
	raw, errs := toGeneric(data)
	if errs != nil {
		return nil, errs
	}
	m := raw.(map[string]any)
	_, hasAPIVersion := m["apiVersion"]
	_, hasKind := m["kind"]
	if !hasAPIVersion && !hasKind {
		nc := &NVIDIAConfig{}
		if errs := decodeGeneric(raw, nc, ""); errs != nil {
			return nil, hintNative(errs, m)
		}
		p, warns, errs := ConvertNVIDIAConfig(nc)
		if errs != nil {
			return nil, errs
		}
		more, errs := Validate(p)
		if errs != nil {
			return nil, errs.Prefixed("(converted profile)")
		}
		return &Parsed{Profile: p, Format: FormatNVIDIA, Warnings: append(warns, more...)}, nil
	}
	if av, _ := m["apiVersion"].(string); av == "v1" {
		if k, _ := m["kind"].(string); k == "ConfigMap" {
			return nil, ErrorList{{Path: "kind", Message: "this is a ConfigMap, not a profile", Fix: "validate each key of its data (tessera profile validate reads ConfigMaps)"}}
		}
	}
	p := &SharingProfile{}
	if errs := decodeGeneric(raw, p, ""); errs != nil {
		return nil, errs
	}
	warns, errs := Validate(p)
	if errs != nil {
		return nil, errs
	}
	return &Parsed{Profile: p, Format: FormatSharingProfile, Warnings: warns}, nil
}

// hintNative adds a hint when an NVIDIA-config decode fails on a document that looks like a
// SharingProfile written without apiVersion.
func hintNative(errs ErrorList, m map[string]any) ErrorList {
	if _, ok := m["spec"]; ok {
		return ErrorList{{Path: "apiVersion", Message: "missing; without it the document is read as an NVIDIA config, which has no spec", Fix: "add apiVersion: " + APIVersion + " and kind: " + KindSharingProfile}}
	}
	return errs
}

// ParseConfigMapData validates every key of a profile ConfigMap's data. The result maps each key
// to its parsed profile; errors are an ErrorList with paths prefixed by data[key].
func ParseConfigMapData(data map[string]string) (map[string]*Parsed, Warnings, error) {
	out := map[string]*Parsed{}
	var warns Warnings
	var errs ErrorList
	if len(data) == 0 {
		return nil, nil, ErrorList{{Path: "data", Message: "no profiles", Fix: "add one key per profile, e.g. data: {default: |- ...}"}}
	}
	for _, k := range sortedKeys(data) {
		prefix := key("data", k)
		p, err := ParseProfile([]byte(data[k]))
		if err != nil {
			errs = append(errs, asList(err).Prefixed(prefix)...)
			continue
		}
		warns = append(warns, p.Warnings.Prefixed(prefix)...)
		out[k] = p
	}
	if len(errs) > 0 {
		return out, warns, errs
	}
	return out, warns, nil
}

// ParseConfigMap reads a ConfigMap manifest (YAML or JSON) and validates its keys.
func ParseConfigMap(data []byte) (*corev1.ConfigMap, map[string]*Parsed, Warnings, error) {
	cm := &corev1.ConfigMap{}
	if errs := decodeStrict(data, cm); errs != nil {
		return nil, nil, nil, errs
	}
	if cm.Kind != "ConfigMap" {
		return nil, nil, nil, ErrorList{{Path: "kind", Message: fmt.Sprintf("is %q, want ConfigMap", cm.Kind)}}
	}
	parsed, warns, err := ParseConfigMapData(cm.Data)
	return cm, parsed, warns, err
}

// IsConfigMap reports whether a document is a ConfigMap manifest.
func IsConfigMap(data []byte) bool {
	raw, errs := toGeneric(data)
	if errs != nil {
		return false
	}
	m := raw.(map[string]any)
	k, _ := m["kind"].(string)
	av, _ := m["apiVersion"].(string)
	return k == "ConfigMap" && av == "v1"
}

func asList(err error) ErrorList {
	if l, ok := err.(ErrorList); ok {
		return l
	}
	return ErrorList{{Message: err.Error()}}
}

// AsErrorList returns err's field errors (or one error without a path).
func AsErrorList(err error) ErrorList {
	if err == nil {
		return nil
	}
	return asList(err)
}

// MarshalProfile renders a profile as YAML.
func MarshalProfile(p *SharingProfile) ([]byte, error) {
	out, err := yaml.Marshal(p)
	if err != nil {
		return nil, err
	}
	// An empty metadata block says nothing; drop it.
	s := strings.Replace(string(out), "metadata: {}\n", "", 1)
	return []byte(s), nil
}
