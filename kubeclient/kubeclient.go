// Package kubeclient makes the API client every Tessera daemon uses from its --kubeconfig flag.
package kubeclient

import (
	"fmt"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Config reads a kubeconfig file, or the pod's service account for "in-cluster", and names the
// client userAgent.
func Config(kubeconfig, userAgent string) (*rest.Config, error) {
	var rules clientcmd.ClientConfigLoadingRules
	if kubeconfig != "in-cluster" {
		rules.ExplicitPath = kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(&rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig: %w", err)
	}
	cfg.UserAgent = userAgent
	return cfg, nil
}

// New returns a client for Config(kubeconfig, userAgent).
func New(kubeconfig, userAgent string) (kubernetes.Interface, error) {
	cfg, err := Config(kubeconfig, userAgent)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}
