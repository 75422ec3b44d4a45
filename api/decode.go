package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

// MaxInputBytes bounds every document Tessera parses. A ConfigMap holds at most 1 MiB.
const MaxInputBytes = 1 << 20

// decodeStrict decodes YAML or JSON into out (a pointer to a struct) and refuses anything that does
// not fit: unknown fields, values of the wrong type, duplicate keys, trailing documents. Every
// error names the field path (with list indices), which encoding/json's own errors do not.
func decodeStrict(data []byte, out any) ErrorList {
	raw, errs := toGeneric(data)
	if errs != nil {
		return errs
	}
	return decodeGeneric(raw, out, "")
}

// toGeneric turns YAML or JSON into plain Go values (maps, slices, strings, float64/json.Number, bools).
func toGeneric(data []byte) (any, ErrorList) {
	if len(data) > MaxInputBytes {
		return nil, ErrorList{{Message: fmt.Sprintf("document is %d bytes, more than the %d a ConfigMap can hold", len(data), MaxInputBytes), Fix: "split it into several profiles"}}
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, ErrorList{{Message: "document is empty", Fix: "write a SharingProfile (apiVersion tessera.dev/v1alpha1) or an NVIDIA device-plugin config (version: v1)"}}
	}
	if multiDoc(data) {
		return nil, ErrorList{{Message: "more than one YAML document", Fix: "put one profile per file (or per ConfigMap key)"}}
	}
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, ErrorList{{Message: "not valid YAML or JSON: " + cleanYAMLError(err), Fix: "check the indentation and quoting near the line named"}}
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, ErrorList{{Message: "not valid YAML or JSON: " + err.Error()}}
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, ErrorList{{Message: fmt.Sprintf("document is %s, not a mapping of fields", kindOf(v)), Fix: "start the document with its fields, e.g. `apiVersion: tessera.dev/v1alpha1`"}}
	}
	return v, nil
}

func multiDoc(data []byte) bool {
	docs := 0
	for _, part := range bytes.Split(append([]byte("\n"), data...), []byte("\n---")) {
		rest := part
		if i := bytes.IndexByte(rest, '\n'); i >= 0 {
			// the remainder of the separator line (e.g. a comment) does not count as content
			if len(bytes.TrimSpace(rest[:i])) == 0 || bytes.HasPrefix(bytes.TrimSpace(rest[:i]), []byte("#")) {
				rest = rest[i:]
			}
		}
		if hasContent(rest) {
			docs++
		}
	}
	return docs > 1
}

func hasContent(b []byte) bool {
	for _, line := range bytes.Split(b, []byte("\n")) {
		t := bytes.TrimSpace(line)
		if len(t) > 0 && t[0] != '#' {
			return true
		}
	}
	return false
}

func cleanYAMLError(err error) string {
	s := err.Error()
	s = strings.TrimPrefix(s, "error converting YAML to JSON: ")
	return strings.TrimPrefix(s, "yaml: ")
}

var jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()

// fixHinter is implemented by field types that can say how to write them.
type fixHinter interface{ fixHint() string }

func leafFix(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == reflect.TypeFor[resource.Quantity]() {
		return "write a size such as 10Gi, 512Mi or 40G"
	}
	if h, ok := reflect.New(t).Interface().(fixHinter); ok {
		return h.fixHint()
	}
	return ""
}

// decodeGeneric checks a generic value against out's type, field by field, and decodes it.
func decodeGeneric(v any, out any, path string) ErrorList {
	rv := reflect.ValueOf(out)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		panic("decodeGeneric needs a non-nil pointer")
	}
	var errs ErrorList
	check(v, rv.Elem().Type(), path, &errs, 0)
	if len(errs) > 0 {
		return errs
	}
	js, err := json.Marshal(v)
	if err != nil {
		return ErrorList{{Path: path, Message: err.Error()}}
	}
	if err := json.Unmarshal(js, out); err != nil {
		return ErrorList{{Path: path, Message: err.Error()}}
	}
	return nil
}

const maxDepth = 64

// check walks v against t and records unknown fields and type mismatches with their paths.
func check(v any, t reflect.Type, path string, errs *ErrorList, depth int) {
	if depth > maxDepth {
		*errs = append(*errs, &FieldError{Path: path, Message: "nested too deeply"})
		return
	}
	if v == nil {
		return // null is the zero value, as encoding/json treats it
	}
	if t.Implements(jsonUnmarshaler) || reflect.PointerTo(t).Implements(jsonUnmarshaler) {
		js, err := json.Marshal(v)
		if err == nil {
			err = json.Unmarshal(js, reflect.New(t).Interface())
		}
		if err != nil {
			*errs = append(*errs, &FieldError{Path: path, Message: strings.TrimPrefix(err.Error(), "json: "), Fix: leafFix(t)})
		}
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		check(v, t.Elem(), path, errs, depth+1)
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a mapping of fields", kindOf(v))})
			return
		}
		fields := structFields(t)
		for _, k := range sortedKeys(m) {
			ft, ok := fields[k]
			if !ok {
				*errs = append(*errs, &FieldError{Path: joinPath(path, k), Message: "unknown field", Fix: suggest(k, fields)})
				continue
			}
			check(m[k], ft, joinPath(path, k), errs, depth+1)
		}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			if _, ok := v.(string); !ok {
				*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want base64 text", kindOf(v))})
			}
			return
		}
		l, ok := v.([]any)
		if !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a list", kindOf(v))})
			return
		}
		for i, e := range l {
			check(e, t.Elem(), idx(path, i), errs, depth+1)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a mapping", kindOf(v))})
			return
		}
		for _, k := range sortedKeys(m) {
			if t.Key().Kind() != reflect.String {
				if _, err := strconv.ParseInt(k, 10, 64); err != nil {
					*errs = append(*errs, &FieldError{Path: key(path, k), Message: "key is not a whole number"})
					continue
				}
			}
			check(m[k], t.Elem(), key(path, k), errs, depth+1)
		}
	case reflect.String:
		if _, ok := v.(string); !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a string", kindOf(v)), Fix: "quote the value"})
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want true or false", kindOf(v))})
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		checkInt(v, path, errs, math.MinInt32, math.MaxInt32, true)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		checkInt(v, path, errs, 0, math.MaxInt64, false)
	case reflect.Float32, reflect.Float64:
		if _, ok := v.(json.Number); !ok {
			*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a number", kindOf(v))})
		}
	case reflect.Interface:
		// anything goes
	default:
		*errs = append(*errs, &FieldError{Path: path, Message: "cannot be decoded"})
	}
}

func checkInt(v any, path string, errs *ErrorList, lo, hi int64, signed bool) {
	n, ok := v.(json.Number)
	if !ok {
		*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("is %s, want a whole number", kindOf(v)), Fix: "write the number without quotes"})
		return
	}
	i, err := strconv.ParseInt(n.String(), 10, 64)
	if err != nil {
		*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("%s is not a whole number in range", n), Fix: "write a whole number such as 4"})
		return
	}
	if i < lo || i > hi {
		what := "a whole number"
		if !signed {
			what = "a whole number, 0 or more"
		}
		*errs = append(*errs, &FieldError{Path: path, Message: fmt.Sprintf("%d is out of range, want %s", i, what)})
	}
}

func kindOf(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		return fmt.Sprintf("the string %q", truncate(x, 40))
	case bool:
		return fmt.Sprintf("the boolean %v", x)
	case json.Number:
		return "the number " + truncate(x.String(), 40)
	case []any:
		return "a list"
	case map[string]any:
		return "a mapping"
	}
	return fmt.Sprintf("%T", v)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// structFields maps JSON names to field types, following inline (embedded) structs.
func structFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("json")
		if tag == "-" {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		if f.Anonymous && (name == "" || strings.Contains(opts, "inline")) {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				for k, v := range structFields(ft) {
					out[k] = v
				}
				continue
			}
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

// suggest proposes a known field for a misspelt one.
func suggest(k string, fields map[string]reflect.Type) string {
	best, bestD := "", 3
	lk := strings.ToLower(k)
	for name := range fields {
		if strings.ToLower(name) == lk {
			return fmt.Sprintf("did you mean %q? field names are case-sensitive", name)
		}
		if d := editDistance(lk, strings.ToLower(name)); d < bestD || (d == bestD && name < best && best != "") {
			best, bestD = name, d
		}
	}
	if best != "" {
		return fmt.Sprintf("did you mean %q?", best)
	}
	names := sortedKeys(fields)
	return "known fields here: " + strings.Join(names, ", ")
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 99
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := prev[j-1]
			if a[i-1] != b[j-1] {
				c++
			}
			cur[j] = min(c, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
