package kubeclient

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const kubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: abc}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`

func TestConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, []byte(kubeconfig), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Config(path, "tessera-test")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Host != "https://127.0.0.1:6443" || cfg.BearerToken != "abc" || cfg.UserAgent != "tessera-test" {
		t.Errorf("config: host %q token %q agent %q", cfg.Host, cfg.BearerToken, cfg.UserAgent)
	}
	if _, err := New(path, "tessera-test"); err != nil {
		t.Errorf("client: %v", err)
	}
	_, err = Config(filepath.Join(t.TempDir(), "missing"), "x")
	if err == nil || !strings.Contains(err.Error(), "--kubeconfig") {
		t.Errorf("a missing kubeconfig: %v, want an error naming --kubeconfig", err)
	}
}
