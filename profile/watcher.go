package profile

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
)

// LabelSource gives the node's labels. The client-go implementation watches the Node object;
// tests use StaticLabels or their own.
type LabelSource interface {
	// Labels returns the node's current labels.
	Labels() map[string]string
	// Changed is signalled when the labels may have changed; nil if they never change.
	Changed() <-chan struct{}
}

// StaticLabels is a LabelSource that never changes.
type StaticLabels map[string]string

// Labels returns the labels.
func (s StaticLabels) Labels() map[string]string { return s }

// Changed returns nil: static labels never change.
func (s StaticLabels) Changed() <-chan struct{} { return nil }

// EventRecorder reports refusals on the Node object. The client-go implementation is
// NewEventRecorder; nil means no Events.
type EventRecorder interface {
	Event(eventType, reason, message string)
}

// Event reasons.
const (
	ReasonProfileApplied  = "SharingProfileApplied"
	ReasonProfileRejected = "SharingProfileRejected"
)

// Options configure a Watcher.
type Options struct {
	// Dir is the mounted profile ConfigMap (one file per profile).
	Dir string
	// File, instead of Dir, is a single profile file (a SharingProfile or an NVIDIA config). Its
	// content is watched; labels select nothing.
	File string
	// Labels gives the node's labels; nil means none.
	Labels LabelSource
	// Events receives Events; nil means none.
	Events EventRecorder
	// GPUs reads the node's GPUs for Resolve. Required.
	GPUs func(ctx context.Context) ([]api.GPUInfo, error)
	// DefaultProfile is the key used without a label (default "default").
	DefaultProfile string
	// Interval is how often the directory is polled (default 1s). The kubelet updates a mounted
	// ConfigMap by swapping its ..data symlink, so polling the selected file's content catches
	// edits as well as label changes.
	Interval time.Duration
}

// Current is a validated profile resolved for this node.
type Current struct {
	Selection  Selection
	Parsed     *api.Parsed
	Resolution *api.Resolution
	// Digest identifies the profile content and selection.
	Digest string
}

// Watcher keeps a node's current profile.
type Watcher struct {
	opts Options
	// pinned: the caller named DefaultProfile, so a ConfigMap without that key is an error, not a
	// reason to take its only other key.
	pinned bool

	// accepted and refused count profile changes (the first load included) for metrics.
	accepted, refused atomic.Uint64

	mu       sync.Mutex
	current  *Current
	lastSeen string // digest of the last attempt, good or bad, so a bad change is reported once
	lastErr  error
}

// NewWatcher checks the options and returns a Watcher; Run or Reload loads the first profile.
func NewWatcher(opts Options) (*Watcher, error) {
	if opts.Dir == "" && opts.File == "" {
		return nil, errors.New("profile watcher: no directory or file")
	}
	if opts.GPUs == nil {
		return nil, errors.New("profile watcher: no GPU source")
	}
	if opts.Labels == nil {
		opts.Labels = StaticLabels(nil)
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	pinned := opts.DefaultProfile != ""
	if opts.DefaultProfile == "" {
		opts.DefaultProfile = DefaultProfileName
	}
	return &Watcher{opts: opts, pinned: pinned}, nil
}

// Current returns the last good profile, or nil before the first one.
func (w *Watcher) Current() *Current {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.current
}

// Reloads returns how many profile changes were accepted (the first load included) and refused.
func (w *Watcher) Reloads() (accepted, refused uint64) { return w.accepted.Load(), w.refused.Load() }

// LastError returns why the last change was refused (nil once a change is accepted).
func (w *Watcher) LastError() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastErr
}

// Run loads the profile and then watches for changes until ctx ends, calling handle with each
// newly accepted profile (the first one included). It returns nil when ctx ends.
func (w *Watcher) Run(ctx context.Context, handle func(*Current)) error {
	t := time.NewTicker(w.opts.Interval)
	defer t.Stop()
	for {
		if cur, changed, _ := w.Reload(ctx); changed && handle != nil {
			handle(cur)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-w.opts.Labels.Changed():
		}
	}
}

// Reload checks the labels and the directory once. It returns the current profile, whether it
// changed, and the error that refused a change (the current profile then stays). An unchanged
// input is not parsed again.
func (w *Watcher) Reload(ctx context.Context) (*Current, bool, error) {
	sel, data, err := w.read()
	digest := ""
	if err == nil {
		sum := sha256.Sum256(data)
		digest = sel.Name + "/" + hex.EncodeToString(sum[:8])
	} else {
		digest = "error/" + err.Error()
	}
	w.mu.Lock()
	if digest == w.lastSeen {
		cur, lastErr := w.current, w.lastErr
		w.mu.Unlock()
		return cur, false, lastErr
	}
	w.mu.Unlock()

	var cur *Current
	if err == nil {
		cur, err = w.load(ctx, sel, data, digest)
	}
	if err != nil && isTransient(err) {
		// The GPUs could not be read: try again next time rather than remembering the digest.
		klog.ErrorS(err, "Reading GPUs for the sharing profile failed; will retry", "profile", sel.Name)
		return w.Current(), false, err
	}

	w.mu.Lock()
	defer w.mu.Unlock()
	w.lastSeen = digest
	if err != nil {
		w.lastErr = err
		w.refused.Add(1)
		w.refuse(sel, err)
		return w.current, false, err
	}
	w.accepted.Add(1)
	w.lastErr = nil
	w.current = cur
	klog.InfoS("Sharing profile applied", "profile", sel.Name, "selectedBy", sel.By, "format", cur.Parsed.Format, "gpus", len(cur.Resolution.Assignments), "warnings", len(cur.Resolution.Warnings))
	for _, wn := range cur.Resolution.Warnings {
		klog.InfoS("Sharing profile warning", "profile", sel.Name, "field", wn.Path, "warning", wn.Message)
	}
	if w.opts.Events != nil {
		w.opts.Events.Event("Normal", ReasonProfileApplied, truncateEvent(fmt.Sprintf("sharing profile %q (%s) applied to %d GPUs: %s", sel.Name, sel.By, len(cur.Resolution.Assignments), summary(cur.Resolution))))
	}
	return cur, true, nil
}

type transientError struct{ error }

func (t transientError) Unwrap() error { return t.error }

func isTransient(err error) bool {
	var t transientError
	return errors.As(err, &t)
}

func (w *Watcher) read() (Selection, []byte, error) {
	if w.opts.File != "" {
		sel := Selection{Name: filepath.Base(w.opts.File), By: "file " + w.opts.File}
		data, err := os.ReadFile(w.opts.File)
		if err != nil {
			return sel, nil, fmt.Errorf("reading profile %q: %w", w.opts.File, err)
		}
		return sel, data, nil
	}
	names, err := ListProfiles(w.opts.Dir)
	if err != nil {
		return Selection{}, nil, fmt.Errorf("reading the profile directory: %w", err)
	}
	def := ""
	if w.pinned {
		def = w.opts.DefaultProfile
	}
	sel, err := Select(w.opts.Labels.Labels(), names, def)
	if err != nil {
		return sel, nil, err
	}
	data, err := os.ReadFile(filepath.Join(w.opts.Dir, sel.Name))
	if err != nil {
		return sel, nil, fmt.Errorf("reading profile %q: %w", sel.Name, err)
	}
	return sel, data, nil
}

func (w *Watcher) load(ctx context.Context, sel Selection, data []byte, digest string) (*Current, error) {
	parsed, err := api.ParseProfile(data)
	if err != nil {
		return nil, err
	}
	gpus, err := w.opts.GPUs(ctx)
	if err != nil {
		return nil, transientError{fmt.Errorf("reading the node's GPUs: %w", err)}
	}
	res, err := api.Resolve(parsed.Profile, gpus)
	if err != nil {
		return nil, err
	}
	res.Warnings = append(append(api.Warnings{}, parsed.Warnings...), res.Warnings...)
	return &Current{Selection: sel, Parsed: parsed, Resolution: res, Digest: digest}, nil
}

// refuse logs and records a refused change; w.mu is held.
func (w *Watcher) refuse(sel Selection, err error) {
	keeping := "no profile is in use yet"
	if w.current != nil {
		keeping = fmt.Sprintf("keeping profile %q (%s)", w.current.Selection.Name, w.current.Selection.By)
	}
	for _, fe := range api.AsErrorList(err) {
		klog.ErrorS(nil, "Sharing profile change refused", "profile", sel.Name, "field", fe.Path, "problem", fe.Message, "fix", fe.Fix, "keeping", keeping)
	}
	if w.opts.Events != nil {
		name := sel.Name
		if name == "" {
			name = "(none selected)"
		}
		w.opts.Events.Event("Warning", ReasonProfileRejected, truncateEvent(fmt.Sprintf("sharing profile %s refused, %s: %v", name, keeping, err)))
	}
}

func summary(r *api.Resolution) string {
	var b bytes.Buffer
	for i, a := range r.Assignments {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%d=%s", a.GPU.Index, a.Owner)
		if a.Mode != "" {
			fmt.Fprintf(&b, "/%s", a.Mode)
		}
	}
	return b.String()
}

// Events carry at most 1 KiB of message.
func truncateEvent(s string) string {
	const max = 1000
	if len(s) <= max {
		return s
	}
	return strings.ToValidUTF8(s[:max], "") + "…"
}
