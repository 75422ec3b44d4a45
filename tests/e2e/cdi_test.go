//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/tessera-gpu/tessera/cdi"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/partitioning/mig"
	"github.com/tessera-gpu/tessera/partitioning/nvmlib"
	"github.com/tessera-gpu/tessera/partitioning/sim"
	"github.com/tessera-gpu/tessera/partitioning/sim/host"
	"github.com/tessera-gpu/tessera/tests/e2e/framework"
	"github.com/tessera-gpu/tessera/tests/harness"
)

// Pods on the real node get devices of a simulated dgx-a100 through our CDI specs: the node spec and
// a claim spec are written into the cluster's CDI directory, a minimal device plugin (standing in for
// Tessera's) answers Allocate with the CDI device names (tessera.dev/gpu=0, and the claim's MIG
// device), the kubelet passes them to containerd in the CRI CDIDevices field, containerd resolves them
// with the CDI library and runc creates the device nodes. One container lists /dev/nvidia0 with the
// spec's major and minor, sees NVIDIA_VISIBLE_DEVICES=void and reads the simulated driver's libcuda;
// the other lists its GPU's node and the two nvidia-caps nodes of its MIG device. The specs'
// createContainer hooks ran for both (a stand-in nvidia-cdi-hook records its arguments).
//
// CDI pod annotations (cdi.k8s.io/…) cannot serve here: the kubelet does not copy pod annotations
// into the container config that containerd reads them from.
func TestCDIPodGetsGPU(t *testing.T) {
	c := framework.Cluster(t)
	ns := framework.Namespace(t)
	ctx := framework.Context(t, 3*time.Minute)

	// The simulated node and a stand-in hook binary that records what it is asked.
	state := t.TempDir()
	if err := os.Chmod(state, 0o755); err != nil {
		t.Fatal(err)
	}
	spec, err := sim.BuiltinNode("dgx-a100")
	if err != nil {
		t.Fatal(err)
	}
	node, err := sim.Open(spec, filepath.Join(state, "sim"))
	if err != nil {
		t.Fatal(err)
	}
	lib, err := nvmlib.Wrap(node.NVML())
	if err != nil {
		t.Fatal(err)
	}
	defer lib.Shutdown()
	snap, err := inventory.New(lib).Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hookLog := filepath.Join(state, "hook.log")
	hook := filepath.Join(state, "toolkit", "nvidia-cdi-hook")
	if err := os.MkdirAll(filepath.Dir(hook), 0o755); err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\nprintf '%s\\n' \"$*\" >>'" + hookLog + "'\n"
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	h := node.Host()
	g, err := cdi.New(cdi.WithDriverRoot(h.DriverRoot()), cdi.WithDevRoot(h.DevRoot()), cdi.WithProcRoot(h.ProcRoot()),
		cdi.WithSpecDir(c.CDIDir), cdi.WithHookPath(hook))
	if err != nil {
		t.Fatal(err)
	}
	path, err := g.WriteNodeSpec(cdi.FromSnapshot(snap))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.RemoveNodeSpec() })
	t.Logf("wrote %s", path)

	// GPU 1 cut into seven 1g.5gb instances; its first MIG device goes into a claim spec.
	cfg, err := mig.ParseConfig([]byte("version: v1\nmig-configs:\n  gpu1:\n    - devices: [1]\n      mig-enabled: true\n"+
		"      mig-devices: {\"1g.5gb\": 7}\n"), "e2e")
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := mig.Apply(ctx, lib, cfg, "gpu1", mig.Options{}); err != nil || !rep.OK() {
		t.Fatalf("mig apply: %v %+v", err, rep)
	}
	snap, err = inventory.New(lib).Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	gpu1 := snap.GPUs[1]
	m := gpu1.MigDevices[0]
	claimUID := "e2e-" + randomSuffix(t)
	claimNames, err := g.WriteClaimSpec(claimUID, []cdi.Device{cdi.MIGDevice(gpu1.GPU, m)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.RemoveClaimSpec(claimUID) })

	const gpuRes, migRes = "e2e.tessera.dev/gpu", "e2e.tessera.dev/mig"
	startTestDevicePlugin(t, c, gpuRes, map[string]string{"gpu0": g.QualifiedName("0")})
	startTestDevicePlugin(t, c, migRes, map[string]string{"mig0": claimNames[0]})
	if err := harness.Poll(ctx, 200*time.Millisecond, func(ctx context.Context) (bool, error) {
		n, err := c.Client().CoreV1().Nodes().Get(ctx, harness.RealNodeName, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		a, b := n.Status.Allocatable[corev1.ResourceName(gpuRes)], n.Status.Allocatable[corev1.ResourceName(migRes)]
		return a.Value() == 1 && b.Value() == 1, nil
	}); err != nil {
		t.Fatalf("the kubelet did not advertise %s and %s: %v", gpuRes, migRes, err)
	}

	run := func(name, res, script string, want ...string) {
		t.Helper()
		pod := harness.BusyboxPod(ns, name, "sh", "-c", script)
		pod.Spec.Containers[0].Resources.Limits = corev1.ResourceList{corev1.ResourceName(res): resource.MustParse("1")}
		out, err := c.RunPod(ctx, pod)
		if err != nil {
			t.Fatalf("pod %s: %v\n%s", name, err, out)
		}
		t.Logf("pod %s output:\n%s", name, out)
		for _, re := range want {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("pod %s: output does not match %s", name, re)
			}
		}
	}

	libcuda := "/usr/lib/x86_64-linux-gnu/libcuda.so." + g.DriverVersion()
	run("cdi-gpu", gpuRes,
		`ls -l /dev/nvidia0 /dev/nvidiactl && echo "NVIDIA_VISIBLE_DEVICES=$NVIDIA_VISIBLE_DEVICES" && head -n 1 `+libcuda,
		`(?m)^crw-rw-rw- .* 195, +0 .*/dev/nvidia0$`,
		`(?m)^crw-rw-rw- .* 195, +255 .*/dev/nvidiactl$`,
		`(?m)^NVIDIA_VISIBLE_DEVICES=void$`,
		`(?m)^tessera simulated driver library libcuda\.so\.`+regexp.QuoteMeta(g.DriverVersion())+` `,
	)
	giMinor, ciMinor := host.GIMinor(gpu1.Minor, m.GI), host.CIMinor(gpu1.Minor, m.GI, m.CI)
	run("cdi-mig", migRes, fmt.Sprintf("ls -l /dev/nvidia%d /dev/nvidia-caps", gpu1.Minor),
		fmt.Sprintf(`(?m)^crw-rw-rw- .* 195, +%d .*/dev/nvidia%d$`, gpu1.Minor, gpu1.Minor),
		fmt.Sprintf(`(?m)^cr--r--r-- .* 508, +%d .*nvidia-cap%d$`, giMinor, giMinor),
		fmt.Sprintf(`(?m)^cr--r--r-- .* 508, +%d .*nvidia-cap%d$`, ciMinor, ciMinor),
	)
	logged, err := os.ReadFile(hookLog)
	if err != nil {
		t.Fatalf("the hooks did not run: %v", err)
	}
	var subcommands []string
	for _, line := range strings.Split(strings.TrimSpace(string(logged)), "\n") {
		subcommands = append(subcommands, strings.Fields(line)[0])
	}
	want := []string{"create-symlinks", "enable-cuda-compat", "update-ldcache"}
	if want = append(want, want...); !slices.Equal(subcommands, want) {
		t.Errorf("hooks ran %v, want %v:\n%s", subcommands, want, logged)
	}
	if !strings.Contains(string(logged), "update-ldcache --folder /usr/lib/x86_64-linux-gnu") {
		t.Errorf("update-ldcache arguments: %s", logged)
	}
}

// testDevicePlugin advertises fixed devices and answers Allocate with their CDI device names.
type testDevicePlugin struct {
	pluginapi.UnimplementedDevicePluginServer
	cdiNames map[string]string // device ID -> qualified CDI device name
}

func (p *testDevicePlugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *testDevicePlugin) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	var devs []*pluginapi.Device
	for id := range p.cdiNames {
		devs = append(devs, &pluginapi.Device{ID: id, Health: pluginapi.Healthy})
	}
	if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
		return err
	}
	<-s.Context().Done()
	return nil
}

func (p *testDevicePlugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, cr := range req.ContainerRequests {
		car := &pluginapi.ContainerAllocateResponse{}
		for _, id := range cr.DevicesIds {
			name, ok := p.cdiNames[id]
			if !ok {
				return nil, errors.New("unknown device " + id)
			}
			car.CdiDevices = append(car.CdiDevices, &pluginapi.CDIDevice{Name: name})
		}
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	return resp, nil
}

// startTestDevicePlugin serves a testDevicePlugin in the cluster's device plugin directory and
// registers it with the kubelet; it is stopped when the test ends.
func startTestDevicePlugin(t *testing.T, c *harness.Cluster, resourceName string, cdiNames map[string]string) {
	t.Helper()
	sock := filepath.Join(c.DevicePluginDir, "e2e-cdi-"+randomSuffix(t)+".sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, &testDevicePlugin{cdiNames: cdiNames})
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		_ = os.Remove(sock)
	})
	conn, err := grpc.NewClient("unix://"+filepath.Join(c.DevicePluginDir, "kubelet.sock"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     filepath.Base(sock),
		ResourceName: resourceName,
	}); err != nil {
		t.Fatalf("register the test device plugin: %v", err)
	}
}
