// Package startup records where a daemon's start-up time goes: opening NVML, reading the sharing
// profile, restoring prepared claims, the first publish. Each Mark closes the phase that began at the
// previous one, so the phases add up to the time since New. The phases are logged once the daemon
// serves and exported as a gauge per phase, so an admin can see why one node took longer than
// another, and `make bench` can say which phase a slow start spent its time in.
package startup

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Phase is one step of start-up and how long it took.
type Phase struct {
	Name string
	Took time.Duration
}

// Phases is the start-up record of one process. Its methods are safe for concurrent use.
type Phases struct {
	now   func() time.Time
	start time.Time

	mu   sync.Mutex
	last time.Time
	list []Phase
}

// Option configures New.
type Option func(*Phases)

// WithClock sets the clock (tests).
func WithClock(now func() time.Time) Option { return func(p *Phases) { p.now = now } }

// New starts the record now.
func New(opts ...Option) *Phases {
	p := &Phases{now: time.Now}
	for _, o := range opts {
		o(p)
	}
	p.start = p.now()
	p.last = p.start
	return p
}

// Mark ends the current phase under name and starts the next one. A nil record ignores marks, so
// code that may run without one (tests) need not check. A name marked again adds to that phase.
func (p *Phases) Mark(name string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.now()
	took := t.Sub(p.last)
	p.last = t
	for i := range p.list {
		if p.list[i].Name == name {
			p.list[i].Took += took
			return
		}
	}
	p.list = append(p.list, Phase{Name: name, Took: took})
}

// Started is when the record began (the daemon's main, after flag parsing).
func (p *Phases) Started() time.Time { return p.start }

// List returns the phases in the order they were first marked.
func (p *Phases) List() []Phase {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Phase(nil), p.list...)
}

// Total is the time from New to the last mark.
func (p *Phases) Total() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last.Sub(p.start)
}

// String renders the phases as "name=1.2ms name=…", the form the start-up log line carries and
// Parse reads back.
func (p *Phases) String() string {
	var b strings.Builder
	for i, ph := range p.List() {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%.3fms", ph.Name, float64(ph.Took.Microseconds())/1e3)
	}
	return b.String()
}

// Parse reads String's form back (for tools that read the start-up log line).
func Parse(s string) ([]Phase, error) {
	var out []Phase
	for _, f := range strings.Fields(s) {
		name, val, ok := strings.Cut(f, "=")
		if !ok || name == "" || !strings.HasSuffix(val, "ms") {
			return nil, fmt.Errorf("start-up phase %q: want name=<milliseconds>ms", f)
		}
		var ms float64
		if _, err := fmt.Sscanf(strings.TrimSuffix(val, "ms"), "%g", &ms); err != nil {
			return nil, fmt.Errorf("start-up phase %q: %w", f, err)
		}
		out = append(out, Phase{Name: name, Took: time.Duration(ms * float64(time.Millisecond))})
	}
	return out, nil
}

// Collector exports the phases as the gauge tessera_<subsystem>_startup_phase_seconds{phase}.
func (p *Phases) Collector(subsystem string) prometheus.Collector {
	return &collector{p: p, desc: prometheus.NewDesc("tessera_"+subsystem+"_startup_phase_seconds",
		"How long each phase of the daemon's start-up took (the phases add up to start-up up to serving).", []string{"phase"}, nil)}
}

type collector struct {
	p    *Phases
	desc *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for _, ph := range c.p.List() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, ph.Took.Seconds(), ph.Name)
	}
}
