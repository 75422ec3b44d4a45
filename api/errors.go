package api

import (
	"fmt"
	"sort"
	"strings"
)

// FieldError is one problem with an input, at a field path such as `spec.rules[2].mps.replicas`.
// Every error Tessera reports about a profile or a claim's parameters is a FieldError, so that an
// admin reading a log line, an Event or an admission denial knows where to look and what to do.
type FieldError struct {
	// Path is the field, in the input's own spelling (JSON names, list indices in brackets).
	Path string `json:"path"`
	// Message says what is wrong.
	Message string `json:"message"`
	// Fix says what to change. Empty when the message already says it.
	Fix string `json:"fix,omitempty"`
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Message)
	if e.Fix != "" {
		b.WriteString(" (fix: ")
		b.WriteString(e.Fix)
		b.WriteString(")")
	}
	return b.String()
}

// ErrorList is a list of field errors; it is an error when not empty.
type ErrorList []*FieldError

func (l ErrorList) Error() string {
	switch len(l) {
	case 0:
		return "no errors"
	case 1:
		return l[0].Error()
	}
	parts := make([]string, len(l))
	for i, e := range l {
		parts[i] = e.Error()
	}
	return fmt.Sprintf("%d errors: %s", len(l), strings.Join(parts, "; "))
}

// Err returns the list as an error, or nil when it is empty.
func (l ErrorList) Err() error {
	if len(l) == 0 {
		return nil
	}
	return l
}

// Prefixed returns a copy of the list with prefix added before each path.
func (l ErrorList) Prefixed(prefix string) ErrorList {
	out := make(ErrorList, len(l))
	for i, e := range l {
		c := *e
		c.Path = joinPath(prefix, c.Path)
		out[i] = &c
	}
	return out
}

// Warning is something accepted but worth telling: a field that has no effect, a rule that
// selects no GPU, a setting that the owner will have to act on.
type Warning struct {
	Path    string `json:"path"`
	Message string `json:"message"`
}

func (w Warning) String() string {
	if w.Path == "" {
		return w.Message
	}
	return w.Path + ": " + w.Message
}

// Warnings is a list of warnings.
type Warnings []Warning

// Strings renders each warning on its own.
func (w Warnings) Strings() []string {
	out := make([]string, len(w))
	for i, x := range w {
		out[i] = x.String()
	}
	return out
}

// Prefixed returns a copy of the list with prefix added before each path.
func (w Warnings) Prefixed(prefix string) Warnings {
	out := make(Warnings, len(w))
	for i, x := range w {
		x.Path = joinPath(prefix, x.Path)
		out[i] = x
	}
	return out
}

type collector struct {
	errs  ErrorList
	warns Warnings
}

func (c *collector) errf(path, fix, format string, args ...any) {
	c.errs = append(c.errs, &FieldError{Path: path, Message: fmt.Sprintf(format, args...), Fix: fix})
}

func (c *collector) warnf(path, format string, args ...any) {
	c.warns = append(c.warns, Warning{Path: path, Message: fmt.Sprintf(format, args...)})
}

func joinPath(prefix, path string) string {
	switch {
	case prefix == "":
		return path
	case path == "":
		return prefix
	case strings.HasPrefix(path, "["):
		return prefix + path
	}
	return prefix + "." + path
}

func idx(path string, i int) string { return fmt.Sprintf("%s[%d]", path, i) }

func key(path, k string) string { return fmt.Sprintf("%s[%s]", path, k) }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
