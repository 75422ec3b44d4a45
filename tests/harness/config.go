package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Ports are the loopback ports the cluster listens on. The defaults stay clear of the usual
// Kubernetes ports (6443, 2379, 10250, ...) so a real cluster on the same machine is not disturbed.
type Ports struct {
	Etcd              int `json:"etcd"`
	EtcdPeer          int `json:"etcdPeer"`
	APIServer         int `json:"apiServer"`
	Scheduler         int `json:"scheduler"`
	ControllerManager int `json:"controllerManager"`
	Kubelet           int `json:"kubelet"`
	KubeletHealthz    int `json:"kubeletHealthz"`
}

// DefaultPorts are used for every zero field of Options.Ports.
var DefaultPorts = Ports{
	Etcd:              23790,
	EtcdPeer:          23800,
	APIServer:         26443,
	Scheduler:         20259,
	ControllerManager: 20257,
	Kubelet:           20250,
	KubeletHealthz:    20248,
}

func (p Ports) withDefaults() Ports {
	d := DefaultPorts
	if p.Etcd == 0 {
		p.Etcd = d.Etcd
	}
	if p.EtcdPeer == 0 {
		p.EtcdPeer = d.EtcdPeer
	}
	if p.APIServer == 0 {
		p.APIServer = d.APIServer
	}
	if p.Scheduler == 0 {
		p.Scheduler = d.Scheduler
	}
	if p.ControllerManager == 0 {
		p.ControllerManager = d.ControllerManager
	}
	if p.Kubelet == 0 {
		p.Kubelet = d.Kubelet
	}
	if p.KubeletHealthz == 0 {
		p.KubeletHealthz = d.KubeletHealthz
	}
	return p
}

func (p Ports) list() map[string]int {
	return map[string]int{
		"etcd": p.Etcd, "etcd peer": p.EtcdPeer, "kube-apiserver": p.APIServer, "kube-scheduler": p.Scheduler,
		"kube-controller-manager": p.ControllerManager, "kubelet": p.Kubelet, "kubelet healthz": p.KubeletHealthz,
	}
}

// DefaultFeatureGates are passed to every component. DRA itself, device taints and extended
// resources are GA in 1.37; partitionable devices and consumable capacity are beta (on by default);
// they are spelled out so a test never depends on a default changing.
var DefaultFeatureGates = map[string]bool{
	"DRAPartitionableDevices": true,
	"DRAConsumableCapacity":   true,
}

func featureGateFlag(g map[string]bool) string {
	keys := make([]string, 0, len(g))
	for k := range g {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%t", k, g[k]))
	}
	return strings.Join(parts, ",")
}

func writeFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(content), 0o644)
}

// containerdConfig renders containerd's config: everything under the state dir, CDI specs read
// from the cluster's CDI dir, the locally built pause image pinned as the sandbox image, and
// restrict_oom_score_adj because the machine lacks CAP_SYS_RESOURCE.
func (c *Cluster) containerdConfig() string {
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
temp = %[3]q
oom_score = 0
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = %[4]q

[ttrpc]
  address = %[5]q

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = %[6]q

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = %[7]q

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = [%[8]q]
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = %[9]q
          Root = %[10]q
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [%[11]q]
      conf_dir = %[12]q
      max_conf_num = 1
`,
		filepath.Join(c.StateDir, "containerd", "root"),
		filepath.Join(c.StateDir, "containerd", "state"),
		filepath.Join(c.StateDir, "containerd", "tmp"),
		c.ContainerdSocket,
		c.ContainerdSocket+".ttrpc",
		filepath.Join(c.StateDir, "containerd", "opt"),
		PauseImage,
		c.CDIDir,
		c.runcPath,
		filepath.Join(c.StateDir, "containerd", "runc"),
		c.cniBinDir,
		filepath.Join(c.StateDir, "cni", "net.d"),
	)
}

// cniConfig is a bridge with neither masquerade nor a route out: pods reach each other and the
// host on the bridge's address, and the host reaches them (the kubelet's HTTP probes, the API
// server's webhook calls), but nothing beyond the machine. isGateway gives the bridge its address;
// the pods get no default route (no isDefaultGateway, no IPAM routes).
func (c *Cluster) cniConfig() string {
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "tessera",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": %q}]],
        "dataDir": %q
      }
    }
  ]
}
`, c.opts.Bridge, c.opts.PodSubnet, filepath.Join(c.StateDir, "cni", "ipam"))
}

func (c *Cluster) kubeletConfig() string {
	var gates strings.Builder
	keys := make([]string, 0, len(c.FeatureGates))
	for k := range c.FeatureGates {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&gates, "  %s: %t\n", k, c.FeatureGates[k])
	}
	if gates.Len() == 0 {
		gates.WriteString("  {}\n")
	}
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
containerRuntimeEndpoint: unix://%s
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
podLogsDir: %s
volumePluginDir: %s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
syncFrequency: 10s
fileCheckFrequency: 10s
registerNode: true
serializeImagePulls: false
featureGates:
%s`,
		c.Ports.Kubelet, c.Ports.KubeletHealthz, c.ContainerdSocket, c.PodLogsDir,
		filepath.Join(c.StateDir, "kubelet-volume-plugins"), gates.String())
}
