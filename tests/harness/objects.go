package harness

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// BusyboxPod returns a pod running command in the local busybox image on the real node, never
// restarted, never pulled.
func BusyboxPod(namespace, name string, command ...string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			DNSPolicy:                     corev1.DNSDefault, // the cluster has no DNS service
			NodeSelector:                  map[string]string{corev1.LabelHostname: RealNodeName},
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name:            "main",
				Image:           BusyboxImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         command,
			}},
		},
	}
}

func nsOrDefault(ns string) string {
	if ns == "" {
		return metav1.NamespaceDefault
	}
	return ns
}

// CreateNamespace creates a namespace and waits for its default ServiceAccount (pods are refused
// before it exists).
func (c *Cluster) CreateNamespace(ctx context.Context, name string) error {
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return poll(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, err := c.client.CoreV1().ServiceAccounts(name).Get(ctx, "default", getOpts)
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	})
}

// DeleteNamespace deletes a namespace without waiting.
func (c *Cluster) DeleteNamespace(ctx context.Context, name string) error {
	err := c.client.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// CreatePod creates a pod (namespace "default" when unset).
func (c *Cluster) CreatePod(ctx context.Context, pod *corev1.Pod) (*corev1.Pod, error) {
	return c.client.CoreV1().Pods(nsOrDefault(pod.Namespace)).Create(ctx, pod, metav1.CreateOptions{})
}

// CreateResourceClaim creates a ResourceClaim (namespace "default" when unset).
func (c *Cluster) CreateResourceClaim(ctx context.Context, claim *resourcev1.ResourceClaim) (*resourcev1.ResourceClaim, error) {
	return c.client.ResourceV1().ResourceClaims(nsOrDefault(claim.Namespace)).Create(ctx, claim, metav1.CreateOptions{})
}

// CreateResourceClaimTemplate creates a ResourceClaimTemplate (namespace "default" when unset).
func (c *Cluster) CreateResourceClaimTemplate(ctx context.Context, t *resourcev1.ResourceClaimTemplate) (*resourcev1.ResourceClaimTemplate, error) {
	return c.client.ResourceV1().ResourceClaimTemplates(nsOrDefault(t.Namespace)).Create(ctx, t, metav1.CreateOptions{})
}

// CreateDeviceClass creates a DeviceClass, replacing one of the same name.
func (c *Cluster) CreateDeviceClass(ctx context.Context, dc *resourcev1.DeviceClass) (*resourcev1.DeviceClass, error) {
	out, err := c.client.ResourceV1().DeviceClasses().Create(ctx, dc, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		old, gerr := c.client.ResourceV1().DeviceClasses().Get(ctx, dc.Name, getOpts)
		if gerr != nil {
			return nil, gerr
		}
		dc = dc.DeepCopy()
		dc.ResourceVersion = old.ResourceVersion
		return c.client.ResourceV1().DeviceClasses().Update(ctx, dc, metav1.UpdateOptions{})
	}
	return out, err
}

// WaitForPodPhase waits until the pod reaches one of phases. It gives up early when the pod
// reaches a terminal phase that is not wanted, and returns the last pod seen.
func (c *Cluster) WaitForPodPhase(ctx context.Context, namespace, name string, phases ...corev1.PodPhase) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := poll(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		p, err := c.client.CoreV1().Pods(nsOrDefault(namespace)).Get(ctx, name, getOpts)
		if err != nil {
			if apierrors.IsNotFound(err) {
				return false, nil
			}
			return false, err
		}
		pod = p
		for _, ph := range phases {
			if p.Status.Phase == ph {
				return true, nil
			}
		}
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			return false, fmt.Errorf("pod %s/%s is %s, waiting for %v", p.Namespace, p.Name, p.Status.Phase, phases)
		}
		return false, nil
	})
	if err != nil && pod != nil {
		err = fmt.Errorf("%w (phase %s, %s)", err, pod.Status.Phase, podStatusSummary(pod))
	}
	return pod, err
}

// WaitForPodRunningOrDone is WaitForPodPhase for Running or Succeeded.
func (c *Cluster) WaitForPodRunningOrDone(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	return c.WaitForPodPhase(ctx, namespace, name, corev1.PodRunning, corev1.PodSucceeded)
}

func podStatusSummary(p *corev1.Pod) string {
	var parts []string
	for _, cond := range p.Status.Conditions {
		if cond.Status != corev1.ConditionTrue && cond.Message != "" {
			parts = append(parts, fmt.Sprintf("%s: %s", cond.Type, cond.Message))
		}
	}
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			parts = append(parts, fmt.Sprintf("container %s waiting: %s %s", cs.Name, w.Reason, w.Message))
		}
		if t := cs.State.Terminated; t != nil {
			parts = append(parts, fmt.Sprintf("container %s terminated: exit %d %s", cs.Name, t.ExitCode, t.Reason))
		}
	}
	if len(parts) == 0 {
		return "no details"
	}
	return strings.Join(parts, "; ")
}

// PodLogs reads a container's log through the apiserver and the kubelet.
func (c *Cluster) PodLogs(ctx context.Context, namespace, name, container string) (string, error) {
	data, err := c.client.CoreV1().Pods(nsOrDefault(namespace)).GetLogs(name, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
	return string(data), err
}

// ReadContainerOutput returns what a container on the real node wrote to stdout and stderr, read
// straight from the kubelet's pod log files (no exec, no apiserver round trip). It reads the
// latest restart's log.
func (c *Cluster) ReadContainerOutput(ctx context.Context, namespace, podName, container string) (string, error) {
	pod, err := c.client.CoreV1().Pods(nsOrDefault(namespace)).Get(ctx, podName, getOpts)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(c.PodLogsDir, fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("no log for container %s of pod %s/%s: %w", container, pod.Namespace, pod.Name, err)
	}
	latest, latestN := "", -1
	for _, e := range entries {
		n, err := strconv.Atoi(strings.TrimSuffix(e.Name(), ".log"))
		if err == nil && strings.HasSuffix(e.Name(), ".log") && n > latestN {
			latest, latestN = e.Name(), n
		}
	}
	if latest == "" {
		return "", fmt.Errorf("no log file in %s", dir)
	}
	f, err := os.Open(filepath.Join(dir, latest))
	if err != nil {
		return "", err
	}
	defer f.Close()
	return parseCRILog(f)
}

// parseCRILog turns the CRI log format ("<time> <stream> <F|P> <text>" per line) back into the
// container's output.
func parseCRILog(r io.Reader) (string, error) {
	var b strings.Builder
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) < 3 {
			continue
		}
		text := ""
		if len(parts) == 4 {
			text = parts[3]
		}
		b.WriteString(text)
		if parts[2] != "P" {
			b.WriteByte('\n')
		}
	}
	return b.String(), sc.Err()
}

// RunPod creates pod, waits for it to succeed and returns the output of its first container.
func (c *Cluster) RunPod(ctx context.Context, pod *corev1.Pod) (string, error) {
	created, err := c.CreatePod(ctx, pod)
	if err != nil {
		return "", err
	}
	if _, err := c.WaitForPodPhase(ctx, created.Namespace, created.Name, corev1.PodSucceeded); err != nil {
		return "", err
	}
	return c.ReadContainerOutput(ctx, created.Namespace, created.Name, created.Spec.Containers[0].Name)
}

// PodEvents returns the events of one object, oldest first, one per line.
func (c *Cluster) PodEvents(ctx context.Context, namespace, name string) (string, error) {
	list, err := c.client.CoreV1().Events(nsOrDefault(namespace)).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + name,
	})
	if err != nil {
		return "", err
	}
	items := list.Items
	sort.Slice(items, func(i, j int) bool { return eventTime(items[i]).Before(eventTime(items[j])) })
	var b strings.Builder
	for _, e := range items {
		fmt.Fprintf(&b, "%s  %-7s %-24s %-20s %s\n", eventTime(e).Format("15:04:05.000"), e.Type, e.Reason, e.Source.Component+e.ReportingController, strings.TrimSpace(e.Message))
	}
	return b.String(), nil
}

func eventTime(e corev1.Event) time.Time {
	switch {
	case !e.EventTime.IsZero():
		return e.EventTime.Time
	case !e.LastTimestamp.IsZero():
		return e.LastTimestamp.Time
	default:
		return e.CreationTimestamp.Time
	}
}

// poll calls fn every interval until it returns true or an error, or ctx ends.
func poll(ctx context.Context, interval time.Duration, fn func(context.Context) (bool, error)) error {
	for {
		done, err := fn(ctx)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// Poll is poll for tests: it calls fn every interval until it returns true or an error, or ctx
// ends. Use it instead of sleeping.
func Poll(ctx context.Context, interval time.Duration, fn func(context.Context) (bool, error)) error {
	return poll(ctx, interval, fn)
}

// GetURL returns the body of a plain HTTP GET (a daemon's /metrics page).
func GetURL(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
