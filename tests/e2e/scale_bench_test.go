//go:build e2e

// Scale runs against the real kube-scheduler with simulated nodes. Benchmarks run only with
// -bench, so make e2e and CI skip them:
//
//	go test -tags e2e -run '^$' -bench SchedulePods -benchtime 1x -timeout 30m ./tests/e2e/ -nodes 100 -pods 1000
package e2e

import (
	"context"
	"flag"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

var (
	numNodes = flag.Int("nodes", 100, "simulated nodes")
	numPods  = flag.Int("pods", 1000, "pods to schedule")
	workers  = flag.Int("workers", 16, "concurrent pod creators")
)

// BenchmarkSchedulePods creates -pods pods against -nodes simulated nodes and measures how fast
// the real scheduler binds them: pods/s from the first create to the last bind, and the
// create-to-bind latency of each pod.
func BenchmarkSchedulePods(b *testing.B) {
	c := framework.Cluster(b)
	ctx := framework.Context(b, 25*time.Minute)
	for iter := 0; iter < b.N; iter++ {
		b.StopTimer()
		nodes := make([]string, *numNodes)
		for i := range nodes {
			nodes[i] = fmt.Sprintf("bench-node-%04d", i)
		}
		if err := addNodes(ctx, c, nodes); err != nil {
			b.Fatal(err)
		}
		ns := framework.Namespace(b)
		b.StartTimer()
		res, err := schedulePods(ctx, c, ns, *numPods, benchPod)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(res.podsPerSecond, "pods/s")
		b.ReportMetric(float64(res.p50.Milliseconds()), "p50-ms")
		b.ReportMetric(float64(res.p90.Milliseconds()), "p90-ms")
		b.ReportMetric(float64(res.p99.Milliseconds()), "p99-ms")
		b.Logf("%d pods on %d simulated nodes: %.1f pods/s (first create to last bind %s); create->bind p50 %s p90 %s p99 %s max %s",
			*numPods, *numNodes, res.podsPerSecond, res.total.Round(time.Millisecond), res.p50, res.p90, res.p99, res.max)
		zero := int64(0)
		_ = c.Client().CoreV1().Pods(ns).DeleteCollection(context.Background(), metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
		_ = c.DeleteNodes(context.Background(), nodes...)
	}
}

func addNodes(ctx context.Context, c *harness.Cluster, names []string) error {
	var wg sync.WaitGroup
	errs := make(chan error, len(names))
	sem := make(chan struct{}, 16)
	for _, n := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := c.AddSimulatedNodes(ctx, n); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

type result struct {
	podsPerSecond      float64
	total              time.Duration
	p50, p90, p99, max time.Duration
}

func schedulePods(ctx context.Context, c *harness.Cluster, ns string, n int, mk func(ns, name string) *corev1.Pod) (*result, error) {
	var mu sync.Mutex
	created := make(map[string]time.Time, n)
	bound := make(map[string]time.Time, n)
	done := make(chan struct{})
	record := func(obj any) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.NodeName == "" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if _, seen := bound[p.Name]; !seen {
			bound[p.Name] = time.Now()
			if len(bound) == n {
				close(done)
			}
		}
	}
	// An informer rather than a bare watch: it re-lists and re-watches if the apiserver closes
	// the watch under load.
	factory := informers.NewSharedInformerFactoryWithOptions(c.Client(), 0, informers.WithNamespace(ns))
	inf := factory.Core().V1().Pods().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    record,
		UpdateFunc: func(_, obj any) { record(obj) },
	}); err != nil {
		return nil, err
	}
	stop := make(chan struct{})
	defer close(stop)
	factory.Start(stop)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil, fmt.Errorf("pod informer did not sync")
	}

	start := time.Now()
	jobs := make(chan int)
	var wg sync.WaitGroup
	createErr := make(chan error, *workers)
	for i := 0; i < *workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				pod := mk(ns, fmt.Sprintf("pod-%05d", j))
				mu.Lock()
				created[pod.Name] = time.Now()
				mu.Unlock()
				if _, err := c.CreatePod(ctx, pod); err != nil {
					createErr <- err
					return
				}
			}
		}()
	}
	for j := 0; j < n; j++ {
		jobs <- j
	}
	close(jobs)
	wg.Wait()
	close(createErr)
	if err := <-createErr; err != nil {
		return nil, err
	}
	select {
	case <-done:
	case <-ctx.Done():
		mu.Lock()
		got := len(bound)
		mu.Unlock()
		return nil, fmt.Errorf("only %d of %d pods bound: %w", got, n, ctx.Err())
	}
	mu.Lock()
	defer mu.Unlock()
	var lat []time.Duration
	var last time.Time
	for name, t := range bound {
		lat = append(lat, t.Sub(created[name]))
		if t.After(last) {
			last = t
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(f float64) time.Duration { return lat[min(len(lat)-1, int(f*float64(len(lat))))] }
	total := last.Sub(start)
	return &result{
		podsPerSecond: float64(n) / total.Seconds(),
		total:         total,
		p50:           q(0.50), p90: q(0.90), p99: q(0.99), max: lat[len(lat)-1],
	}, nil
}

// benchPod asks for a little CPU so the scheduler's scoring has something to spread, and only
// fits on simulated nodes.
func benchPod(ns, name string) *corev1.Pod {
	pod := harness.BusyboxPod(ns, name, "true")
	pod.Spec.NodeSelector = map[string]string{harness.SimulatedNodeLabel: "true"}
	pod.Spec.Containers[0].Resources.Requests = corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("100m"),
		corev1.ResourceMemory: resource.MustParse("64Mi"),
	}
	return pod
}
