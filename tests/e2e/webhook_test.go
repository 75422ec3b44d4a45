//go:build e2e

package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"

	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// The admission webhook, registered with the real kube-apiserver, refuses a ResourceClaim whose
// GPUConfig is invalid (naming the field and the fix) and a profile ConfigMap that does not
// validate; valid ones are admitted. The webhook runs as a host process on 127.0.0.1.
func TestWebhookRejectsBadClaimAtAdmission(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 3*time.Minute)
	dir := t.TempDir()

	bin := filepath.Join(dir, "tessera-webhook")
	build := exec.CommandContext(ctx, "go", "build", "-tags", harness.BuildTags, "-o", bin, "./cmd/tessera-webhook")
	build.Dir = filepath.Join("..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build tessera-webhook: %v\n%s", err, out)
	}
	certFile, keyFile, caPEM := webhookCert(t, dir)
	port := freePort(t)
	hp, err := c.StartHostProcess(ctx, harness.HostProcessSpec{
		Name: "e2e-tessera-webhook",
		Path: bin,
		Args: []string{"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--address", "127.0.0.1", "--port", fmt.Sprint(port)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hp.Stop(5 * time.Second) })
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	base := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := harness.Poll(ctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		resp, err := hc.Get(base + "/healthz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	}); err != nil {
		t.Fatalf("webhook not serving: %v; log:\n%s", err, hp.Logs())
	}

	// Register it for this test's namespace only, so other tests are not affected.
	name := "tessera-" + ns
	sel := &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": ns}}
	hook := func(hookName string, rules []admissionregistrationv1.RuleWithOperations, objSel *metav1.LabelSelector) admissionregistrationv1.ValidatingWebhook {
		return admissionregistrationv1.ValidatingWebhook{
			Name:                    hookName,
			ClientConfig:            admissionregistrationv1.WebhookClientConfig{URL: ptr.To(base + "/validate"), CABundle: caPEM},
			Rules:                   rules,
			NamespaceSelector:       sel,
			ObjectSelector:          objSel,
			FailurePolicy:           ptr.To(admissionregistrationv1.Fail),
			SideEffects:             ptr.To(admissionregistrationv1.SideEffectClassNone),
			AdmissionReviewVersions: []string{"v1"},
			TimeoutSeconds:          ptr.To[int32](5),
		}
	}
	ops := []admissionregistrationv1.OperationType{admissionregistrationv1.Create, admissionregistrationv1.Update}
	cfg := &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{
			hook("claims.gpu.tessera.dev", []admissionregistrationv1.RuleWithOperations{{
				Operations: ops,
				Rule: admissionregistrationv1.Rule{APIGroups: []string{"resource.k8s.io"}, APIVersions: []string{"v1"},
					Resources: []string{"resourceclaims", "resourceclaimtemplates"}, Scope: ptr.To(admissionregistrationv1.NamespacedScope)},
			}}, nil),
			hook("profiles.tessera.dev", []admissionregistrationv1.RuleWithOperations{{
				Operations: ops,
				Rule:       admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"}},
			}}, &metav1.LabelSelector{MatchLabels: map[string]string{"tessera.dev/sharing-profiles": "true"}}),
		},
	}
	arc := c.Client().AdmissionregistrationV1().ValidatingWebhookConfigurations()
	if _, err := arc.Create(ctx, cfg, metav1.CreateOptions{}); err != nil {
		t.Fatalf("register webhook: %v", err)
	}
	t.Cleanup(func() { _ = arc.Delete(context.Background(), name, metav1.DeleteOptions{}) })

	claim := func(claimName, params string) *resourcev1.ResourceClaim {
		return &resourcev1.ResourceClaim{
			ObjectMeta: metav1.ObjectMeta{Name: claimName, Namespace: ns},
			Spec: resourcev1.ResourceClaimSpec{Devices: resourcev1.DeviceClaim{
				Requests: []resourcev1.DeviceRequest{{Name: "gpu", Exactly: &resourcev1.ExactDeviceRequest{DeviceClassName: "gpu.tessera.dev"}}},
				Config: []resourcev1.DeviceClaimConfiguration{{
					Requests: []string{"gpu"},
					DeviceConfiguration: resourcev1.DeviceConfiguration{Opaque: &resourcev1.OpaqueDeviceConfiguration{
						Driver: "gpu.tessera.dev", Parameters: runtime.RawExtension{Raw: []byte(params)},
					}},
				}},
			}},
		}
	}
	const bad = `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":150}}}`
	const good = `{"apiVersion":"gpu.tessera.dev/v1alpha1","kind":"GPUConfig","sharing":{"strategy":"MPS","mps":{"defaultActiveThreadPercentage":50,"defaultPinnedDeviceMemoryLimit":"10Gi"}}}`

	// The API server picks up a new webhook configuration within a moment: retry until it denies.
	var denial error
	err = harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, err := c.CreateResourceClaim(ctx, claim("bad", bad))
		if err == nil {
			_ = c.Client().ResourceV1().ResourceClaims(ns).Delete(ctx, "bad", metav1.DeleteOptions{})
			return false, nil
		}
		denial = err
		return true, nil
	})
	if err != nil {
		t.Fatalf("bad claim was never refused: %v; webhook log:\n%s", err, hp.Logs())
	}
	for _, want := range []string{"admission webhook", "spec.devices.config[0].opaque.parameters.sharing.mps.defaultActiveThreadPercentage", "fix: use 1 to 100"} {
		if !strings.Contains(denial.Error(), want) {
			t.Errorf("denial %q lacks %q", denial, want)
		}
	}
	if _, err := c.CreateResourceClaim(ctx, claim("good", good)); err != nil {
		t.Errorf("good claim refused: %v", err)
	}

	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "profiles", Namespace: ns, Labels: map[string]string{"tessera.dev/sharing-profiles": "true"}},
		Data:       map[string]string{"default": "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1}]}}\n"},
	}
	_, err = c.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{})
	if err == nil || !strings.Contains(err.Error(), "data[default].sharing.timeSlicing.resources[0].replicas") {
		t.Errorf("bad profile ConfigMap: %v", err)
	}
	cm.Data["default"] = "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4}]}}\n"
	if _, err := c.Client().CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		t.Errorf("good profile ConfigMap refused: %v", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// webhookCert writes a self-signed serving certificate for 127.0.0.1 and returns its PEM as the
// CA bundle.
func webhookCert(t *testing.T, dir string) (string, string, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "tessera-webhook"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, certPEM
}
