package main

import (
	"context"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestFlagsAndRequiredNodeName(t *testing.T) {
	var o options
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse([]string{"--nvml=sim:dgx-h100", "--kubelet-registry-dir=/r", "--kubelet-plugins-dir=/p", "--cdi-dir=/c",
		"--state-dir=/s", "--config-file=/f", "--metrics-address=:1", "--kubeconfig=/k", "--node-name="}); err != nil {
		t.Fatal(err)
	}
	if o.mpsRoot != "/run/tessera/mps" {
		t.Errorf("--mps-root defaults to %q, want the device plugin's /run/tessera/mps", o.mpsRoot)
	}
	if o.qps < 100 || o.burst < 2*int(o.qps)-1 {
		t.Errorf("client QPS %v / burst %d: the helper GETs every claim; keep them high", o.qps, o.burst)
	}
	err := run(context.Background(), o, nil)
	if err == nil || !strings.Contains(err.Error(), "--node-name") {
		t.Errorf("run without a node name: %v", err)
	}
}

func TestMIGManagerFlags(t *testing.T) {
	var o options
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if !o.migManager || o.migManagerDir != "" {
		t.Errorf("defaults: --mig-manager=%v --mig-manager-dir=%q, want true and \"\" (the node's default directory)", o.migManager, o.migManagerDir)
	}
	if err := fs.Parse([]string{"--mig-manager=false", "--mig-manager-dir=/x"}); err != nil {
		t.Fatal(err)
	}
	if o.migManager || o.migManagerDir != "/x" {
		t.Errorf("parsed: --mig-manager=%v --mig-manager-dir=%q", o.migManager, o.migManagerDir)
	}
}
