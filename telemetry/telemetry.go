// Package telemetry says who uses which slice of which GPU, how hard, and which GPUs sit idle.
//
// A Sampler reads, on an interval, the readings of the GPUs its front end owns (utilization, memory,
// power, temperature, SM clock) and their compute processes from NVML, attributes each process to
// its pod through the process's cgroup, and combines that with the front end's own record of which
// device is allocated to which pod or claim. It exports the result as Prometheus metrics (every name
// starts with tessera_) and detects holders that stay idle: a device held while its GPU's utilization
// (and, when a threshold is set, power) stays near idle for a whole window is reported with a metric
// and an Event on the pod, unless the pod opts out with the annotation tessera.dev/idle-check: "off".
//
// NVML gives no utilization per MIG device (nor per process in MIG mode): a MIG device counts as
// idle while no compute process runs on it, and its holder's utilization is not exported. On a GPU
// outside MIG mode, NVML's per-process SM samples split a shared GPU's utilization by pod, and a
// holder of a replica or share is idle while its own processes are. Memory and processes are
// attributed exactly, by cgroup.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
)

// AnnotationIdleCheck on a pod set to "off" (or "false") turns idle detection off for it.
const AnnotationIdleCheck = "tessera.dev/idle-check"

// ReasonIdle is the reason of the Event posted on a pod that holds an idle GPU.
const ReasonIdle = "GPUIdle"

// Clock is the time source (fake in tests).
type Clock interface{ Now() time.Time }

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// Device kinds.
const (
	KindGPU     = "gpu"
	KindMIG     = "mig"
	KindReplica = "replica"
	KindMPS     = "mps"
	KindShare   = "share"
)

// Holding is one device a front end serves and, if it is allocated, to whom.
type Holding struct {
	GPU int
	// Device is the device's ID (device plugin) or name (DRA); Resource its extended resource or
	// DRA driver.
	Device   string
	Resource string
	Kind     string
	// GI is the MIG device's GPU instance (-1 for anything else): processes on it are its own.
	GI int
	// Exclusive is set when the device is the whole GPU and not shared with other holders.
	Exclusive bool
	Healthy   bool
	// MemoryLimitBytes is the memory the holder may use (MIG device, MPS or share limit; 0: the GPU's).
	MemoryLimitBytes int64
	// Namespace and Pod name the pod holding the device ("" when free or unknown); Claim is
	// "namespace/name" of a DRA claim.
	Namespace, Pod, Claim string
}

// Allocated reports whether someone holds the device.
func (h Holding) Allocated() bool { return h.Pod != "" || h.Claim != "" }

// Source is a front end's view: the GPUs it owns and its devices with their holders.
type Source interface {
	Owned() []int
	Holdings(ctx context.Context) ([]Holding, error)
}

// PodInfo is what the telemetry needs of a pod.
type PodInfo struct {
	UID, Namespace, Name string
	Annotations          map[string]string
}

// Pods finds pods: by UID (for processes) and by name (for holders). Implementations cache.
type Pods interface {
	ByUID(uid string) (PodInfo, bool)
	Get(namespace, name string) (PodInfo, bool)
}

// ClaimPods finds the pod using a DRA claim; Pods implementations may offer it.
type ClaimPods interface {
	ByClaim(namespace, claim string) (PodInfo, bool)
}

// EventRecorder posts Events on pods.
type EventRecorder interface {
	PodEvent(pod PodInfo, eventType, reason, message string)
}

// Options configure a Sampler.
type Options struct {
	Lib nvmlib.Interface
	// Component labels every metric: device-plugin or dra.
	Component string
	Source    Source
	// Pods resolves pods; nil: processes are attributed by pod UID only, and no opt-out is read.
	Pods Pods
	// Events receives idle Events; nil: none.
	Events EventRecorder
	// ProcRoot is the host's procfs (default /proc), for the processes' cgroups.
	ProcRoot string
	// Interval between samples (default 15s).
	Interval time.Duration
	// IdleWindow is how long a holder must stay idle to be reported (default 30m; negative: off).
	IdleWindow time.Duration
	// IdleUtilizationPercent is the GPU utilization at or below which a GPU counts as idle (the
	// daemons' flag defaults to 5).
	IdleUtilizationPercent int
	// IdlePowerWatts, when positive, must also not be exceeded for a GPU to count as idle (idle
	// power differs by model, so there is no default).
	IdlePowerWatts float64
	Clock          Clock
	// LastXIDs gives the last XID seen per GPU (health.Monitor.LastXIDs); nil: not exported.
	LastXIDs func() map[int]uint64
	// OnIdleChange, when set, is told when a holder crosses the idle window (idle true, with the
	// message of its Event) and when a holder reported idle is busy again (idle false). The DRA
	// driver writes it into the claim's device status. Called outside the sampler's lock.
	OnIdleChange func(h Holding, idle bool, message string)
}

// gpuSample is one GPU's readings.
type gpuSample struct {
	index int
	uuid  string
	model string
	t     nvmlib.Telemetry
	procs []nvmlib.Process
	// sm is each process's SM utilization, when NVML gives process samples (smOK).
	sm   map[int]int
	smOK bool
	// err: the readings could not be read; procErr: the processes could not be.
	err     error
	procErr error
}

// podUse is one pod's use of one GPU.
type podUse struct {
	gpu       int
	namespace string
	pod       string
	uid       string
	memMiB    uint64
	processes int
	// smPercent sums the pod's processes' SM utilization (smOK: NVML gave process samples).
	smPercent int
	smOK      bool
}

type idleKey struct {
	device, namespace, pod, claim string
}

// keyOf keys a holder: a claim by itself (its pod may become known later), a pod by its name.
func keyOf(device, namespace, pod, claim string) idleKey {
	if claim != "" {
		return idleKey{device: device, claim: claim}
	}
	return idleKey{device: device, namespace: namespace, pod: pod}
}

type idleState struct {
	since    time.Time
	reported bool
	// h is the holding as last seen, to clear a report when the holding goes away.
	h Holding
}

// Sampler samples the GPUs and holders of one front end and exports them.
type Sampler struct {
	o Options

	mu       sync.Mutex
	gpus     []gpuSample
	holdings []Holding
	uses     []podUse
	idle     map[idleKey]*idleState
	idleFor  map[idleKey]time.Duration

	samples   prometheus.Counter
	idleEvent *prometheus.CounterVec
}

// New checks the options and returns a Sampler that has sampled nothing yet.
func New(o Options) (*Sampler, error) {
	switch {
	case o.Lib == nil:
		return nil, errors.New("telemetry: no NVML")
	case o.Source == nil:
		return nil, errors.New("telemetry: no source of devices")
	case o.Component == "":
		return nil, errors.New("telemetry: no component")
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.Interval <= 0 {
		o.Interval = 15 * time.Second
	}
	if o.IdleWindow == 0 {
		o.IdleWindow = 30 * time.Minute
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	cl := prometheus.Labels{"component": o.Component}
	return &Sampler{
		o: o, idle: map[idleKey]*idleState{}, idleFor: map[idleKey]time.Duration{},
		samples: prometheus.NewCounter(prometheus.CounterOpts{Name: "tessera_telemetry_samples_total",
			Help: "Samples of the GPUs' readings and processes taken.", ConstLabels: cl}),
		idleEvent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tessera_idle_reports_total",
			Help: "Holders reported idle (an Event on the pod each time); which ones: tessera_device_idle.", ConstLabels: cl}, nil),
	}, nil
}

// Run samples every Interval until ctx ends.
func (s *Sampler) Run(ctx context.Context) {
	t := time.NewTicker(s.o.Interval)
	defer t.Stop()
	for {
		s.Sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sample takes one sample: the owned GPUs' readings and processes, the holders, pod attribution and
// idle tracking.
func (s *Sampler) Sample(ctx context.Context) {
	owned := slices.Sorted(slices.Values(s.o.Source.Owned()))
	gpus := make([]gpuSample, 0, len(owned))
	for _, i := range owned {
		g := gpuSample{index: i}
		// Failed NVML calls are counted by nvmlib (tessera_nvml_errors_total); a GPU that cannot be
		// read is reported unreadable, never idle.
		info, err := s.o.Lib.GPU(i)
		if err != nil {
			g.err = err
			gpus = append(gpus, g)
			continue
		}
		g.uuid, g.model = info.UUID, info.ProductName
		if g.t, err = s.o.Lib.Telemetry(i); err != nil {
			g.err = err
		}
		if g.procs, err = s.o.Lib.Processes(i); err != nil {
			g.procs, g.procErr = nil, err
		}
		if !info.MigEnabled && len(g.procs) > 0 {
			// NVML keeps per-process samples only outside MIG mode.
			if pu, err := s.o.Lib.ProcessUtilization(i); err == nil {
				g.sm, g.smOK = map[int]int{}, true
				for _, u := range pu {
					g.sm[u.PID] = u.SMPercent
				}
			}
		}
		gpus = append(gpus, g)
	}
	holdings, err := s.o.Source.Holdings(ctx)
	if err != nil {
		klog.ErrorS(err, "Telemetry: the devices' holders could not be read; keeping the last ones")
		s.mu.Lock()
		holdings = s.holdings
		s.mu.Unlock()
	}
	// A claim's holder is the pod that uses the claim.
	if cp, ok := s.o.Pods.(ClaimPods); ok {
		for i := range holdings {
			h := &holdings[i]
			if h.Claim == "" || h.Pod != "" {
				continue
			}
			ns, name, _ := strings.Cut(h.Claim, "/")
			if pi, ok := cp.ByClaim(ns, name); ok {
				h.Namespace, h.Pod = pi.Namespace, pi.Name
			}
		}
	}
	uses := s.attribute(gpus)
	s.mu.Lock()
	s.gpus, s.holdings, s.uses = gpus, holdings, uses
	reports := s.trackIdleLocked(gpus, holdings, uses)
	s.mu.Unlock()
	for _, r := range reports {
		s.report(r)
	}
	s.samples.Inc()
}

// attribute maps every process to its pod through its cgroup.
func (s *Sampler) attribute(gpus []gpuSample) []podUse {
	type key struct {
		gpu int
		uid string
	}
	byPod := map[key]*podUse{}
	for _, g := range gpus {
		for _, p := range g.procs {
			uid, err := PodUIDOfPID(s.o.ProcRoot, p.PID)
			if err != nil || uid == "" {
				continue // not a pod's process (or gone already)
			}
			k := key{g.index, uid}
			u := byPod[k]
			if u == nil {
				u = &podUse{gpu: g.index, uid: uid, smOK: g.smOK}
				if s.o.Pods != nil {
					if pi, ok := s.o.Pods.ByUID(uid); ok {
						u.namespace, u.pod = pi.Namespace, pi.Name
					}
				}
				byPod[k] = u
			}
			u.memMiB += p.UsedMemoryMiB
			u.processes++
			u.smPercent += g.sm[p.PID]
		}
	}
	out := make([]podUse, 0, len(byPod))
	for _, u := range byPod {
		out = append(out, *u)
	}
	slices.SortFunc(out, func(a, b podUse) int {
		if a.gpu != b.gpu {
			return a.gpu - b.gpu
		}
		if a.namespace+"/"+a.pod != b.namespace+"/"+b.pod {
			if a.namespace+"/"+a.pod < b.namespace+"/"+b.pod {
				return -1
			}
			return 1
		}
		if a.uid < b.uid {
			return -1
		}
		return 1
	})
	return out
}

type idleReport struct {
	h   Holding
	dur time.Duration
	gpu gpuSample
	// busyAgain: a holder reported idle is busy again (or gone).
	busyAgain bool
}

// busy reports whether a holding's device is in use in this sample.
// Whatever cannot be read counts as busy: a false idle report is worse than a late one.
func (s *Sampler) busy(h Holding, g gpuSample, uses []podUse) bool {
	if h.GI >= 0 {
		// NVML reports no utilization per MIG device (nor for a GPU in MIG mode): a MIG device is
		// busy while a process runs on it, whatever the GPU's other readings.
		if g.procErr != nil {
			return true
		}
		for _, p := range g.procs {
			if p.GI == h.GI {
				return true
			}
		}
		return false
	}
	if g.err != nil || g.t.NoUtilization {
		return true // unknown is not idle
	}
	if !h.Exclusive && g.smOK && h.Pod != "" {
		// A shared GPU with process samples: the holder is busy while its own processes are. A
		// process whose pod cannot be named might be the holder's: then the whole GPU decides.
		sm, unnamed := 0, false
		for _, u := range uses {
			if u.gpu != h.GPU {
				continue
			}
			if u.pod == "" && u.smPercent > 0 {
				unnamed = true
			}
			if u.namespace == h.Namespace && u.pod == h.Pod {
				sm += u.smPercent
			}
		}
		if sm > s.o.IdleUtilizationPercent {
			return true
		}
		if !unnamed {
			return false
		}
	}
	if g.t.UtilizationGPU > s.o.IdleUtilizationPercent {
		return true
	}
	if s.o.IdlePowerWatts > 0 && float64(g.t.PowerMilliwatts)/1000 > s.o.IdlePowerWatts {
		return true
	}
	return false
}

// trackIdleLocked updates how long each holder has been idle and returns those that just crossed the
// window.
func (s *Sampler) trackIdleLocked(gpus []gpuSample, holdings []Holding, uses []podUse) []idleReport {
	now := s.o.Clock.Now()
	byGPU := map[int]gpuSample{}
	for _, g := range gpus {
		byGPU[g.index] = g
	}
	seen := map[idleKey]bool{}
	var reports []idleReport
	clear(s.idleFor)
	for _, h := range holdings {
		if !h.Allocated() {
			continue
		}
		k := keyOf(h.Device, h.Namespace, h.Pod, h.Claim)
		seen[k] = true
		g, ok := byGPU[h.GPU]
		if !ok || s.busy(h, g, uses) || s.optedOut(h) {
			if st := s.idle[k]; st != nil && st.reported {
				reports = append(reports, idleReport{h: h, busyAgain: true})
			}
			delete(s.idle, k)
			s.idleFor[k] = 0
			continue
		}
		st := s.idle[k]
		if st == nil {
			st = &idleState{since: now}
			s.idle[k] = st
		}
		st.h = h
		d := now.Sub(st.since)
		s.idleFor[k] = d
		if s.o.IdleWindow > 0 && d >= s.o.IdleWindow && !st.reported {
			st.reported = true
			reports = append(reports, idleReport{h: h, dur: d, gpu: g})
		}
	}
	// A holder reported idle that is gone (released, or now known under its pod's name) is told
	// it is no longer idle, so a claim's Idle condition does not outlive it.
	for _, k := range slices.SortedFunc(maps.Keys(s.idle), func(a, b idleKey) int {
		return strings.Compare(a.device+"\x00"+a.namespace+"\x00"+a.pod+"\x00"+a.claim, b.device+"\x00"+b.namespace+"\x00"+b.pod+"\x00"+b.claim)
	}) {
		if seen[k] {
			continue
		}
		if st := s.idle[k]; st.reported {
			reports = append(reports, idleReport{h: st.h, busyAgain: true})
		}
		delete(s.idle, k)
	}
	return reports
}

func (s *Sampler) optedOut(h Holding) bool {
	if s.o.Pods == nil || h.Pod == "" {
		return false
	}
	pi, ok := s.o.Pods.Get(h.Namespace, h.Pod)
	if !ok {
		return false
	}
	v := pi.Annotations[AnnotationIdleCheck]
	return v == "off" || v == "false"
}

func (s *Sampler) report(r idleReport) {
	if r.busyAgain {
		klog.V(2).InfoS("GPU holder busy again", "pod", r.h.Namespace+"/"+r.h.Pod, "claim", r.h.Claim, "device", r.h.Device)
		if s.o.OnIdleChange != nil {
			s.o.OnIdleChange(r.h, false, "")
		}
		return
	}
	who := r.h.Namespace + "/" + r.h.Pod
	if r.h.Pod == "" {
		who = "claim " + r.h.Claim
	}
	what := fmt.Sprintf("GPU %d utilization at most %d%%", r.h.GPU, s.o.IdleUtilizationPercent)
	if r.h.GI >= 0 {
		what = "no process on it"
	} else if s.o.IdlePowerWatts > 0 {
		what += fmt.Sprintf(" and power at most %.0f W", s.o.IdlePowerWatts)
	}
	msg := fmt.Sprintf("%s has held %s %s (GPU %d, %s) for %s with %s; release it if it is not needed, or annotate the pod %s: \"off\"",
		who, r.h.Resource, r.h.Device, r.h.GPU, r.gpu.model, r.dur.Round(time.Second), what, AnnotationIdleCheck)
	klog.InfoS("Idle GPU holder", "pod", who, "device", r.h.Device, "gpu", r.h.GPU, "idleFor", r.dur.Round(time.Second))
	s.idleEvent.WithLabelValues().Inc()
	if s.o.Events != nil && r.h.Pod != "" {
		pi := PodInfo{Namespace: r.h.Namespace, Name: r.h.Pod}
		if s.o.Pods != nil {
			if p, ok := s.o.Pods.Get(r.h.Namespace, r.h.Pod); ok {
				pi = p
			}
		}
		s.o.Events.PodEvent(pi, "Warning", ReasonIdle, msg)
	}
	if s.o.OnIdleChange != nil {
		s.o.OnIdleChange(r.h, true, msg)
	}
}

// IdleFor returns how long the holder of a device has been idle (0: busy or not held).
func (s *Sampler) IdleFor(device, namespace, pod, claim string) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idleFor[keyOf(device, namespace, pod, claim)]
}

var (
	gpuLabels    = []string{"component", "gpu", "uuid", "model"}
	devLabels    = []string{"component", "gpu", "device", "resource", "kind", "namespace", "pod", "claim"}
	podLabels    = []string{"component", "gpu", "uuid", "namespace", "pod", "pod_uid"}
	descNVMLErrs = prometheus.NewDesc("tessera_nvml_errors_total", "NVML calls of this daemon that failed, by call and return code (some codes are expected: NOT_SUPPORTED for MIG queries on GPUs without MIG).", []string{"component", "call", "code"}, nil)
	descGPUUtil  = prometheus.NewDesc("tessera_gpu_utilization_percent", "GPU utilization (NVML), percent of the last sample period.", gpuLabels, nil)
	descGPUMem   = prometheus.NewDesc("tessera_gpu_memory_used_bytes", "GPU memory in use (NVML).", gpuLabels, nil)
	descGPUTotal = prometheus.NewDesc("tessera_gpu_memory_total_bytes", "GPU memory (NVML).", gpuLabels, nil)
	descGPUPower = prometheus.NewDesc("tessera_gpu_power_watts", "GPU power draw (NVML).", gpuLabels, nil)
	descGPUTemp  = prometheus.NewDesc("tessera_gpu_temperature_celsius", "GPU temperature (NVML).", gpuLabels, nil)
	descGPUClock = prometheus.NewDesc("tessera_gpu_sm_clock_hertz", "GPU SM clock (NVML).", gpuLabels, nil)
	descGPUXID   = prometheus.NewDesc("tessera_gpu_last_xid", "The last XID error the GPU reported (0: none since the daemon started), critical or not.", gpuLabels, nil)
	descGPUUp    = prometheus.NewDesc("tessera_gpu_readable", "1 when the GPU's readings could be read in the last sample, else 0.", gpuLabels, nil)
	descDevAlloc = prometheus.NewDesc("tessera_device_allocated", "1 when the device (GPU, MIG device, replica, MPS client or share) is allocated to a pod or claim, 0 when free.", devLabels, nil)
	descDevOK    = prometheus.NewDesc("tessera_device_healthy", "1 when the device is healthy, 0 when not.", devLabels, nil)
	descDevMem   = prometheus.NewDesc("tessera_device_memory_limit_bytes", "Memory the device's holder may use: the MIG device's, the MPS client's or share's limit, else the whole GPU's.", devLabels, nil)
	descDevIdle  = prometheus.NewDesc("tessera_device_idle_seconds", "How long the device's holder has been idle (0 while busy).", devLabels, nil)
	descDevIdleW = prometheus.NewDesc("tessera_device_idle", "1 when the device's holder has been idle for the whole idle window.", devLabels, nil)
	descPodMem   = prometheus.NewDesc("tessera_pod_gpu_memory_used_bytes", "GPU memory a pod's processes use (NVML processes, attributed by cgroup).", podLabels, nil)
	descPodProcs = prometheus.NewDesc("tessera_pod_gpu_processes", "Compute processes of a pod on the GPU.", podLabels, nil)
	descPodUtil  = prometheus.NewDesc("tessera_pod_gpu_utilization_percent", "GPU utilization of a pod: the GPU's own for a pod holding it alone, else the sum of its processes' SM utilization samples (NVML gives none in MIG mode).", podLabels, nil)
)

// Describe implements prometheus.Collector.
func (s *Sampler) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descGPUUtil, descGPUMem, descGPUTotal, descGPUPower, descGPUTemp, descGPUClock, descGPUUp, descGPUXID,
		descDevAlloc, descDevOK, descDevMem, descDevIdle, descDevIdleW, descPodMem, descPodProcs, descPodUtil} {
		ch <- d
	}
	s.samples.Describe(ch)
	ch <- descNVMLErrs
	s.idleEvent.Describe(ch)
}

// Collect implements prometheus.Collector: the last sample, without calling NVML.
func (s *Sampler) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	gpus, holdings, uses := s.gpus, s.holdings, s.uses
	idleFor := maps.Clone(s.idleFor)
	s.mu.Unlock()
	const mib = 1 << 20
	var xids map[int]uint64
	if s.o.LastXIDs != nil {
		xids = s.o.LastXIDs()
	}
	byGPU := map[int]gpuSample{}
	for _, g := range gpus {
		byGPU[g.index] = g
		lv := []string{s.o.Component, strconv.Itoa(g.index), g.uuid, g.model}
		if s.o.LastXIDs != nil {
			ch <- prometheus.MustNewConstMetric(descGPUXID, prometheus.GaugeValue, float64(xids[g.index]), lv...)
		}
		if g.err != nil {
			ch <- prometheus.MustNewConstMetric(descGPUUp, prometheus.GaugeValue, 0, lv...)
			continue
		}
		ch <- prometheus.MustNewConstMetric(descGPUUp, prometheus.GaugeValue, 1, lv...)
		if !g.t.NoUtilization {
			ch <- prometheus.MustNewConstMetric(descGPUUtil, prometheus.GaugeValue, float64(g.t.UtilizationGPU), lv...)
		}
		ch <- prometheus.MustNewConstMetric(descGPUMem, prometheus.GaugeValue, float64(g.t.MemoryUsedMiB)*mib, lv...)
		ch <- prometheus.MustNewConstMetric(descGPUTotal, prometheus.GaugeValue, float64(g.t.MemoryTotalMiB)*mib, lv...)
		ch <- prometheus.MustNewConstMetric(descGPUPower, prometheus.GaugeValue, float64(g.t.PowerMilliwatts)/1000, lv...)
		ch <- prometheus.MustNewConstMetric(descGPUTemp, prometheus.GaugeValue, float64(g.t.TemperatureC), lv...)
		ch <- prometheus.MustNewConstMetric(descGPUClock, prometheus.GaugeValue, float64(g.t.SMClockMHz)*1e6, lv...)
	}
	seen := map[string]bool{}
	exclusive := map[int]Holding{}
	for _, h := range holdings {
		lv := []string{s.o.Component, strconv.Itoa(h.GPU), h.Device, h.Resource, h.Kind, h.Namespace, h.Pod, h.Claim}
		key := fmt.Sprint(lv)
		if seen[key] {
			continue // one series per device and holder
		}
		seen[key] = true
		alloc, ok := 0.0, 0.0
		if h.Allocated() {
			alloc = 1
		}
		if h.Healthy {
			ok = 1
		}
		ch <- prometheus.MustNewConstMetric(descDevAlloc, prometheus.GaugeValue, alloc, lv...)
		ch <- prometheus.MustNewConstMetric(descDevOK, prometheus.GaugeValue, ok, lv...)
		limit := h.MemoryLimitBytes
		if g, ok := byGPU[h.GPU]; ok && limit == 0 && h.GI < 0 && g.err == nil {
			limit = int64(g.t.MemoryTotalMiB) << 20 // a whole GPU or replica may use all of it
		}
		if limit > 0 {
			ch <- prometheus.MustNewConstMetric(descDevMem, prometheus.GaugeValue, float64(limit), lv...)
		}
		if h.Allocated() {
			d := idleFor[keyOf(h.Device, h.Namespace, h.Pod, h.Claim)]
			ch <- prometheus.MustNewConstMetric(descDevIdle, prometheus.GaugeValue, d.Seconds(), lv...)
			w := 0.0
			if s.o.IdleWindow > 0 && d >= s.o.IdleWindow {
				w = 1
			}
			ch <- prometheus.MustNewConstMetric(descDevIdleW, prometheus.GaugeValue, w, lv...)
			if h.Exclusive && h.Pod != "" {
				exclusive[h.GPU] = h
			}
		}
	}
	for _, u := range uses {
		g := byGPU[u.gpu]
		lv := []string{s.o.Component, strconv.Itoa(u.gpu), g.uuid, u.namespace, u.pod, u.uid}
		ch <- prometheus.MustNewConstMetric(descPodMem, prometheus.GaugeValue, float64(u.memMiB)*mib, lv...)
		ch <- prometheus.MustNewConstMetric(descPodProcs, prometheus.GaugeValue, float64(u.processes), lv...)
		if ex, ok := exclusive[u.gpu]; ok && ex.Namespace == u.namespace && ex.Pod == u.pod {
			continue // the whole GPU's own figure follows
		}
		if u.smOK {
			ch <- prometheus.MustNewConstMetric(descPodUtil, prometheus.GaugeValue, float64(min(u.smPercent, 100)), lv...)
		}
	}
	// A pod that holds a whole GPU alone owns all of its utilization, processes or not.
	for _, i := range slices.Sorted(maps.Keys(exclusive)) {
		h, g := exclusive[i], byGPU[i]
		if g.err != nil || g.t.NoUtilization {
			continue
		}
		uid := ""
		for _, u := range uses {
			if u.gpu == i && u.namespace == h.Namespace && u.pod == h.Pod {
				uid = u.uid
			}
		}
		if uid == "" && s.o.Pods != nil {
			if pi, ok := s.o.Pods.Get(h.Namespace, h.Pod); ok {
				uid = pi.UID
			}
		}
		lv := []string{s.o.Component, strconv.Itoa(i), g.uuid, h.Namespace, h.Pod, uid}
		ch <- prometheus.MustNewConstMetric(descPodUtil, prometheus.GaugeValue, float64(g.t.UtilizationGPU), lv...)
	}
	s.samples.Collect(ch)
	for _, e := range nvmlib.ErrorCounts() {
		ch <- prometheus.MustNewConstMetric(descNVMLErrs, prometheus.CounterValue, float64(e.Count), s.o.Component, e.Call, e.Code)
	}
	s.idleEvent.Collect(ch)
}
