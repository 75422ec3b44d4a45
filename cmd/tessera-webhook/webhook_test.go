package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"
)

func admit(t *testing.T, url string, client *http.Client, kind string, op admissionv1.Operation, obj []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	review := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       types.UID("uid-1"),
			Kind:      metav1.GroupVersionKind{Kind: kind},
			Operation: op,
			Namespace: "default",
		},
	}
	review.Request.Object.Raw = obj
	body, _ := json.Marshal(review)
	resp, err := client.Post(url+PathValidate, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	var out admissionv1.AdmissionReview
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	if out.Response == nil || out.Response.UID != "uid-1" {
		t.Fatalf("response %+v", out.Response)
	}
	return out.Response
}

func toJSON(t *testing.T, y string) []byte {
	t.Helper()
	j, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return j
}

const claimTmpl = `
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {name: c1}
spec:
  devices:
    requests: [{name: gpu, exactly: {deviceClassName: gpu.tessera.dev}}]
    config:
    - opaque:
        driver: other.example.com
        parameters: {anything: goes}
    - requests: [gpu]
      opaque:
        driver: gpu.tessera.dev
        parameters: PARAMS
`

func claim(t *testing.T, params string) []byte {
	return toJSON(t, strings.Replace(claimTmpl, "PARAMS", params, 1))
}

func TestAdmission(t *testing.T) {
	srv := httptest.NewServer(newMux())
	defer srv.Close()
	c := srv.Client()

	good := `{apiVersion: gpu.tessera.dev/v1alpha1, kind: GPUConfig, sharing: {strategy: MPS, mps: {defaultActiveThreadPercentage: 50}}}`
	if r := admit(t, srv.URL, c, "ResourceClaim", admissionv1.Create, claim(t, good)); !r.Allowed {
		t.Errorf("good claim denied: %+v", r.Result)
	}
	badParams := `{apiVersion: gpu.tessera.dev/v1alpha1, kind: GPUConfig, sharing: {strategy: MPS, mps: {defaultActiveThreadPercentage: 150}}}`
	r := admit(t, srv.URL, c, "ResourceClaim", admissionv1.Create, claim(t, badParams))
	if r.Allowed || r.Result.Code != 422 || !strings.Contains(r.Result.Message, "spec.devices.config[1].opaque.parameters.sharing.mps.defaultActiveThreadPercentage: is 150 (fix: use 1 to 100)") || !strings.Contains(r.Result.Message, "ResourceClaim c1") {
		t.Errorf("bad claim: %+v", r.Result)
	}
	unknown := `{apiVersion: gpu.tessera.dev/v1alpha1, kind: GPUConfig, sharing: {strategy: TimeSlicing, timeSlicing: {intervall: Long}}}`
	r = admit(t, srv.URL, c, "ResourceClaim", admissionv1.Update, claim(t, unknown))
	if r.Allowed || !strings.Contains(r.Result.Message, `sharing.timeSlicing.intervall: unknown field (fix: did you mean "interval"?)`) {
		t.Errorf("unknown field: %+v", r.Result)
	}
	// Deleting is always allowed.
	if r := admit(t, srv.URL, c, "ResourceClaim", admissionv1.Delete, nil); !r.Allowed {
		t.Error("delete denied")
	}

	tmpl := toJSON(t, `
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: t1}
spec:
  spec:
    devices:
      requests: [{name: gpu, exactly: {deviceClassName: gpu.tessera.dev}}]
      config:
      - opaque: {driver: gpu.tessera.dev, parameters: {apiVersion: gpu.tessera.dev/v1alpha1, kind: GPUConfig, sharing: {strategy: Exclusive}}}
`)
	r = admit(t, srv.URL, c, "ResourceClaimTemplate", admissionv1.Create, tmpl)
	if r.Allowed || !strings.Contains(r.Result.Message, "spec.spec.devices.config[0].opaque.parameters.sharing.strategy: unknown strategy") {
		t.Errorf("template: %+v", r.Result)
	}
	example, err := os.ReadFile("../../deployments/examples/sharing-profiles/gpuconfig-mps.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if r := admit(t, srv.URL, c, "ResourceClaimTemplate", admissionv1.Create, toJSON(t, string(example))); !r.Allowed {
		t.Errorf("example template denied: %+v", r.Result)
	}

	dc := toJSON(t, `
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata: {name: gpu.tessera.dev}
spec:
  config:
  - opaque: {driver: gpu.tessera.dev, parameters: {kind: GPUConfig}}
`)
	if r := admit(t, srv.URL, c, "DeviceClass", admissionv1.Create, dc); r.Allowed || !strings.Contains(r.Result.Message, "spec.config[0].opaque.parameters.apiVersion") {
		t.Errorf("device class: %+v", r.Result)
	}

	cmGood, err := os.ReadFile("../../deployments/examples/sharing-profiles/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if r := admit(t, srv.URL, c, "ConfigMap", admissionv1.Create, toJSON(t, string(cmGood))); !r.Allowed {
		t.Errorf("example ConfigMap denied: %+v", r.Result)
	}
	cmBad := toJSON(t, `
apiVersion: v1
kind: ConfigMap
metadata: {name: profiles, labels: {tessera.dev/sharing-profiles: "true"}}
data:
  default: |
    version: v1
    flags: {gdsEnabled: true}
    sharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4, devices: 2}]}}
`)
	r = admit(t, srv.URL, c, "ConfigMap", admissionv1.Update, cmBad)
	if r.Allowed || !strings.Contains(r.Result.Message, "data[default].sharing.timeSlicing.resources[0].devices") {
		t.Errorf("bad ConfigMap: %+v", r.Result)
	}
	cmWarn := toJSON(t, `
apiVersion: v1
kind: ConfigMap
metadata: {name: profiles, labels: {tessera.dev/sharing-profiles: "true"}}
data:
  default: "version: v1\nflags: {gdsEnabled: true}\n"
`)
	r = admit(t, srv.URL, c, "ConfigMap", admissionv1.Create, cmWarn)
	if !r.Allowed || len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "data[default].flags.gdsEnabled") {
		t.Errorf("warning ConfigMap: %+v %v", r.Result, r.Warnings)
	}
	// A ConfigMap without the label is not ours.
	other := toJSON(t, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {default: 'not a profile'}\n")
	if r := admit(t, srv.URL, c, "ConfigMap", admissionv1.Create, other); !r.Allowed {
		t.Error("unlabelled ConfigMap denied")
	}
	// Kinds the webhook does not know are allowed.
	if r := admit(t, srv.URL, c, "Pod", admissionv1.Create, []byte(`{"metadata":{"name":"p"}}`)); !r.Allowed {
		t.Error("pod denied")
	}
}

func TestAdmissionBadRequests(t *testing.T) {
	srv := httptest.NewServer(newMux())
	defer srv.Close()
	for _, tc := range []struct {
		method, ctype, body string
		code                int
	}{
		{"GET", "", "", http.StatusMethodNotAllowed},
		{"POST", "text/plain", "x", http.StatusUnsupportedMediaType},
		{"POST", "application/json", "{", http.StatusBadRequest},
		{"POST", "application/json", `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`, http.StatusBadRequest},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+PathValidate, strings.NewReader(tc.body))
		if tc.ctype != "" {
			req.Header.Set("Content-Type", tc.ctype)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%s %s %q: %d, want %d", tc.method, tc.ctype, tc.body, resp.StatusCode, tc.code)
		}
	}
	// Malformed objects are denied with a reason, not a crash.
	r := admit(t, srv.URL, srv.Client(), "ResourceClaim", admissionv1.Create, []byte(`{"spec": 3}`))
	if r.Allowed {
		t.Error("malformed claim allowed")
	}
}

func selfSigned(t *testing.T, dir string) (string, string, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tessera-webhook"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	cert, keyf := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyf, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	pool := x509.NewCertPool()
	c, _ := x509.ParseCertificate(der)
	pool.AddCert(c)
	return cert, keyf, pool
}

func TestServeTLS(t *testing.T) {
	cert, key, pool := selfSigned(t, t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() { done <- run(ctx, options{certFile: cert, keyFile: key, address: "127.0.0.1", port: 0}, ready) }()
	var addr string
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 10 * time.Second}
	r := admit(t, "https://"+addr, client, "ResourceClaim", admissionv1.Create, claim(t, `{apiVersion: gpu.tessera.dev/v1alpha1, kind: GPUConfig}`))
	if !r.Allowed {
		t.Errorf("%+v", r.Result)
	}
	cancel()
	if err := <-done; err != nil {
		t.Error(err)
	}
	if err := run(context.Background(), options{}, nil); err == nil {
		t.Error("missing certificate flags accepted")
	}
}
