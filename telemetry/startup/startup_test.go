package startup

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// fakeClock advances by the next step each time it is read.
type fakeClock struct {
	t     time.Time
	steps []time.Duration
}

func (c *fakeClock) now() time.Time {
	if len(c.steps) > 0 {
		c.t = c.t.Add(c.steps[0])
		c.steps = c.steps[1:]
	}
	return c.t
}

func TestPhasesAddUpAndRepeatAdds(t *testing.T) {
	c := &fakeClock{t: time.Unix(1000, 0), steps: []time.Duration{0, 12 * time.Millisecond, 3 * time.Millisecond, 5 * time.Millisecond}}
	p := New(WithClock(c.now))
	p.Mark("nvml")
	p.Mark("profile")
	p.Mark("nvml") // a name marked again adds to its phase
	got := p.List()
	want := []Phase{{"nvml", 17 * time.Millisecond}, {"profile", 3 * time.Millisecond}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("phases = %v, want %v", got, want)
	}
	if p.Total() != 20*time.Millisecond {
		t.Errorf("total = %s, want 20ms", p.Total())
	}
	if !p.Started().Equal(time.Unix(1000, 0)) {
		t.Errorf("started = %s", p.Started())
	}
}

func TestStringParsesBack(t *testing.T) {
	c := &fakeClock{t: time.Unix(0, 0), steps: []time.Duration{0, 1500 * time.Microsecond, 250 * time.Millisecond}}
	p := New(WithClock(c.now))
	p.Mark("nvml")
	p.Mark("first-publish")
	s := p.String()
	if s != "nvml=1.500ms first-publish=250.000ms" {
		t.Fatalf("String() = %q", s)
	}
	back, err := Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	if len(back) != 2 || back[0] != (Phase{"nvml", 1500 * time.Microsecond}) || back[1] != (Phase{"first-publish", 250 * time.Millisecond}) {
		t.Errorf("Parse(%q) = %v", s, back)
	}
	for _, bad := range []string{"nvml", "nvml=3", "=3ms", "nvml=xms"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestNilRecordIgnoresMarks(t *testing.T) {
	var p *Phases
	p.Mark("anything") // must not panic
}

func TestCollectorExportsEachPhase(t *testing.T) {
	c := &fakeClock{t: time.Unix(0, 0), steps: []time.Duration{0, 2 * time.Second, 500 * time.Millisecond}}
	p := New(WithClock(c.now))
	p.Mark("nvml")
	p.Mark("inventory")
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(p.Collector("dra"))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != "tessera_dra_startup_phase_seconds" {
		t.Fatalf("gathered %v", mfs)
	}
	got := map[string]float64{}
	for _, m := range mfs[0].GetMetric() {
		got[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
	}
	if len(got) != 2 || got["nvml"] != 2 || got["inventory"] != 0.5 {
		t.Errorf("gauges = %v, want nvml 2, inventory 0.5", got)
	}
}
