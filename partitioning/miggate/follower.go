package miggate

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Change tells a front end what to do after the plan moved.
type Change struct {
	// Holds are the devices not to advertise from now on (nil: none).
	Holds map[int]Hold
	// Rescan are GPUs whose MIG devices may have changed: the front end reads them again.
	Rescan []int
	// Plan is the plan as read (nil: none).
	Plan *Plan
}

// Reporter tells the follower what its front end owns and which held devices are still in use.
// It is called from the follower's goroutine, after the front end has applied the holds.
type Reporter func(holds map[int]Hold) (gpus map[int]GPUOwnership, busy []Busy)

// FollowerOption configures a Follower.
type FollowerOption func(*Follower)

// WithInterval sets how often the plan is read while nothing is pending (default 1s) and how often
// the ack's heartbeat is renewed (default 10s).
func WithInterval(poll, heartbeat time.Duration) FollowerOption {
	return func(f *Follower) { f.poll, f.heartbeat = poll, heartbeat }
}

// Follower is a front end's side of the handshake: it reads the plan, hands holds to the front end
// and writes the front end's ack.
type Follower struct {
	dir       Dir
	frontEnd  string
	bootID    string
	poll      time.Duration
	heartbeat time.Duration

	holds atomic.Pointer[map[int]Hold]

	poked atomic.Bool

	mu       sync.Mutex
	lastKey  string
	applied  int64
	lastAck  time.Time
	lastBusy []Busy
}

// NewFollower follows the handshake in dir for frontEnd (FrontEndDevicePlugin or FrontEndDRA) in
// boot bootID. It reads the plan once, so Holds is right before Run starts.
func NewFollower(dir, frontEnd, bootID string, opts ...FollowerOption) *Follower {
	f := &Follower{dir: Dir{Path: dir}, frontEnd: frontEnd, bootID: bootID, poll: time.Second, heartbeat: 10 * time.Second}
	for _, o := range opts {
		o(f)
	}
	p, err := f.dir.ReadPlan()
	if err != nil {
		klog.ErrorS(err, "MIG manager plan unreadable; nothing is held")
	}
	h := HoldsFor(p, bootID)
	f.holds.Store(&h)
	f.lastKey = planKey(p, bootID)
	if p != nil && p.Active() && p.BootID == bootID {
		f.applied = p.Generation
	}
	if len(h) > 0 {
		klog.InfoS("MIG manager holds devices", "frontEnd", frontEnd, "holds", FormatHolds(h), "plan", p.Generation, "state", p.State, "planBoot", p.BootID, "boot", bootID)
	}
	return f
}

// Dir is the handshake directory.
func (f *Follower) Dir() string { return f.dir.Path }

// Holds returns the holds in force (read without a lock).
func (f *Follower) Holds() map[int]Hold { return *f.holds.Load() }

// Poke makes the next step acknowledge at once (the front end's GPUs or modes changed), so the
// manager never decides from ownership older than one poll.
func (f *Follower) Poke() { f.poked.Store(true) }

// Held reports whether a device is held: the GPU (isMIG false) or the MIG device whose instance
// starts at placement start.
func (f *Follower) Held(gpu int, isMIG bool, start int) bool {
	h, ok := f.Holds()[gpu]
	return ok && h.Covers(isMIG, start)
}

func planKey(p *Plan, bootID string) string {
	if p == nil {
		return "none"
	}
	cur := "earlier-boot"
	if p.BootID == bootID {
		cur = "this-boot"
	}
	return cur + "/" + string(p.State) + "/" + strconv.FormatInt(p.Generation, 10)
}

// Run follows the plan until ctx ends. apply is called with every change of holds (and with the GPUs
// to read again when a change finished) and must not return before the front end stops advertising
// the held devices; report then says what is still in use, and the follower acknowledges.
func (f *Follower) Run(ctx context.Context, apply func(context.Context, Change), report Reporter) {
	t := time.NewTicker(f.poll)
	defer t.Stop()
	f.Step(ctx, apply, report)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f.Step(ctx, apply, report)
		}
	}
}

// Step reads the plan once, applies a change and acknowledges when due. Run calls it; tests call it
// directly.
func (f *Follower) Step(ctx context.Context, apply func(context.Context, Change), report Reporter) {
	p, err := f.dir.ReadPlan()
	if err != nil {
		klog.ErrorS(err, "MIG manager plan unreadable; holds stay as they are")
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	key := planKey(p, f.bootID)
	if key != f.lastKey {
		prev := f.Holds()
		holds := HoldsFor(p, f.bootID)
		f.holds.Store(&holds)
		ch := Change{Holds: holds, Plan: p}
		if p == nil || !p.Active() || p.BootID != f.bootID {
			rescan := map[int]bool{}
			for i := range prev {
				rescan[i] = true
			}
			if p != nil && p.BootID == f.bootID {
				for _, i := range p.Changed {
					rescan[i] = true
				}
			}
			ch.Rescan = slices.Sorted(maps.Keys(rescan))
		}
		klog.InfoS("MIG manager plan changed", "frontEnd", f.frontEnd, "plan", key, "holds", FormatHolds(holds), "rescan", ch.Rescan)
		apply(ctx, ch)
		f.lastKey = key
		if p != nil && p.Active() && p.BootID == f.bootID {
			f.applied = p.Generation
		}
		f.lastAck = time.Time{} // acknowledge at once
	}
	if f.poked.Swap(false) {
		f.lastAck = time.Time{}
	}
	active := p != nil && p.Active() && p.BootID == f.bootID
	now := time.Now()
	if !active && now.Sub(f.lastAck) < f.heartbeat {
		return
	}
	gpus, busy := report(f.Holds())
	if active && now.Sub(f.lastAck) < f.heartbeat && slices.Equal(busy, f.lastBusy) && !f.lastAck.IsZero() {
		return
	}
	a := &Ack{FrontEnd: f.frontEnd, BootID: f.bootID, Generation: f.applied, GPUs: gpus, Busy: busy, Heartbeat: now}
	if err := f.dir.WriteAck(a); err != nil {
		klog.ErrorS(err, "Cannot acknowledge the MIG manager's plan", "frontEnd", f.frontEnd)
		return
	}
	f.lastAck, f.lastBusy = now, busy
}
