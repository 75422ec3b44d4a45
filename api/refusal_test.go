package api

import (
	"strings"
	"testing"
)

const head = "apiVersion: tessera.dev/v1alpha1\nkind: SharingProfile\n"

// Every refusal names the field and carries a fix.
func TestRefusals(t *testing.T) {
	cases := []struct {
		name, doc, path, msg string
	}{
		// decoding
		{"empty", "", "", "document is empty"},
		{"not yaml", "a: [", "", "not valid YAML"},
		{"list document", "- a\n- b\n", "", "not a mapping"},
		{"two documents", head + "spec: {}\n---\n" + head + "spec: {}\n", "", "more than one YAML document"},
		{"duplicate key", head + "spec: {}\nspec: {}\n", "", "not valid YAML"},
		{"unknown field", head + "spec:\n  rules:\n  - selector: {indices: [0]}\n    owner: dra\n    mode: whole\n    replicas: 3\n", "spec.rules[0].replicas", "unknown field"},
		{"misspelt field", head + "spec:\n  defualts: {owner: dra, mode: whole}\n", "spec.defualts", `did you mean "defaults"`},
		{"case", head + "spec:\n  Defaults: {owner: dra, mode: whole}\n", "spec.Defaults", "case-sensitive"},
		{"wrong type", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: \"4\"}}\n", "spec.defaults.timeSlicing.replicas", "want a whole number"},
		{"fraction", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 2.5}}\n", "spec.defaults.timeSlicing.replicas", "not a whole number"},
		{"bad quantity", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 2, pinnedMemoryLimit: lots}}\n", "spec.defaults.mps.pinnedMemoryLimit", "quantities must match"},
		{"spec is a list", head + "spec: []\n", "spec", "want a mapping"},
		{"no apiVersion but spec", "kind: SharingProfile\nspec: {}\n", "apiVersion", "is \"\""},
		{"spec without apiVersion", "spec: {}\n", "apiVersion", "missing"},
		{"configmap", "apiVersion: v1\nkind: ConfigMap\ndata: {}\n", "kind", "ConfigMap"},
		// profile
		{"wrong apiVersion", "apiVersion: tessera.dev/v1\nkind: SharingProfile\nspec: {}\n", "apiVersion", "want \"tessera.dev/v1alpha1\""},
		{"wrong kind", "apiVersion: tessera.dev/v1alpha1\nkind: Profile\nspec: {}\n", "kind", "want \"SharingProfile\""},
		{"no owner", head + "spec:\n  defaults: {mode: whole}\n", "spec.defaults.owner", "owner is required"},
		{"bad owner", head + "spec:\n  defaults: {owner: kubelet, mode: whole}\n", "spec.defaults.owner", "unknown owner"},
		{"no mode", head + "spec:\n  defaults: {owner: dra}\n", "spec.defaults.mode", "mode is required"},
		{"bad mode", head + "spec:\n  defaults: {owner: dra, mode: vgpu}\n", "spec.defaults.mode", "unknown mode"},
		{"none with mode", head + "spec:\n  defaults: {owner: none, mode: whole}\n", "spec.defaults.mode", "served by no one"},
		{"none with settings", head + "spec:\n  defaults: {owner: none, mps: {replicas: 2}}\n", "spec.defaults.mps", "no sharing settings"},
		{"none with name", head + "spec:\n  defaults: {owner: none, resourceName: nvidia.com/x}\n", "spec.defaults.resourceName", "no resource name"},
		{"mps with time-slicing", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 2}, timeSlicing: {replicas: 2}}\n", "spec.defaults.timeSlicing", "EXCLUSIVE_PROCESS"},
		{"time-slicing with mps", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, mps: {replicas: 2}, timeSlicing: {replicas: 2}}\n", "spec.defaults.mps", "DEFAULT"},
		{"mig with time-slicing interval", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing}, timeSlicing: {interval: Long}}\n", "spec.defaults.timeSlicing", "no effect on MIG devices"},
		{"mig with mps", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing}, mps: {replicas: 2}}\n", "spec.defaults.mps", "MPS on MIG devices"},
		{"whole with settings", head + "spec:\n  defaults: {owner: device-plugin, mode: whole, shared: {}}\n", "spec.defaults.shared", "one container"},
		{"ts no replicas", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced}\n", "spec.defaults.timeSlicing.replicas", "needs a replica count"},
		{"ts one replica", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 1}}\n", "spec.defaults.timeSlicing.replicas", "at least 2"},
		{"ts negative dra", head + "spec:\n  defaults: {owner: dra, mode: time-sliced, timeSlicing: {replicas: -1}}\n", "spec.defaults.timeSlicing.replicas", "replicas is -1"},
		{"ts too many", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 1000}}\n", "spec.defaults.timeSlicing.replicas", "replicas is 1000"},
		{"ts bad interval", head + "spec:\n  defaults: {owner: device-plugin, mode: time-sliced, timeSlicing: {replicas: 2, interval: Huge}}\n", "spec.defaults.timeSlicing.interval", "unknown interval"},
		{"mps nothing", head + "spec:\n  defaults: {owner: device-plugin, mode: mps}\n", "spec.defaults.mps", "needs replicas or shares"},
		{"mps empty", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {}}\n", "spec.defaults.mps.replicas", "needs replicas or shares"},
		{"mps both", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 2, shares: [{activeThreadPercentage: 50}, {activeThreadPercentage: 50}]}}\n", "spec.defaults.mps", "both set"},
		{"mps too many", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 49}}\n", "spec.defaults.mps.replicas", "2 to 48 clients"},
		{"mps threads", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 2, activeThreadPercentage: 101}}\n", "spec.defaults.mps.activeThreadPercentage", "is 101"},
		{"mps zero memory", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 2, pinnedMemoryLimit: \"0\"}}\n", "spec.defaults.mps.pinnedMemoryLimit", "must be positive"},
		{"mps share threads", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {shares: [{activeThreadPercentage: 0}, {activeThreadPercentage: 50}]}}\n", "spec.defaults.mps.shares[0].activeThreadPercentage", "is 0"},
		{"mps share count", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {shares: [{count: -2, activeThreadPercentage: 10}]}}\n", "spec.defaults.mps.shares[0].count", "count is -2"},
		{"mps one share", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {shares: [{activeThreadPercentage: 10}]}}\n", "spec.defaults.mps.shares", "make 1 clients"},
		{"mps shares with top limits", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {activeThreadPercentage: 10, shares: [{count: 2, activeThreadPercentage: 10}]}}\n", "spec.defaults.mps.activeThreadPercentage", "per share"},
		{"mps shares with top memory", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {pinnedMemoryLimit: 1Gi, shares: [{count: 2, activeThreadPercentage: 10}]}}\n", "spec.defaults.mps.pinnedMemoryLimit", "per share"},
		{"mig no layout", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static}\n", "spec.defaults.mig.layout", "needs a MIG layout"},
		{"mig unknown layout", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: big}}\n", "spec.defaults.mig.layout", "not defined"},
		{"mig bad all", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: all-big}}\n", "spec.defaults.mig.layout", "does not name a MIG profile"},
		{"mig replicas for dra", head + "spec:\n  defaults: {owner: dra, mode: mig-static, mig: {layout: existing, timeSlicing: [{profile: 1g.10gb, replicas: 2}]}}\n", "spec.defaults.mig.timeSlicing", "device-plugin setting"},
		{"mig replicas profile", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing, timeSlicing: [{profile: big, replicas: 2}]}}\n", "spec.defaults.mig.timeSlicing[0].profile", "not a MIG profile"},
		{"mig replicas twice", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing, timeSlicing: [{profile: 1g.10gb, replicas: 2}, {profile: 1g.10gb, replicas: 3}]}}\n", "spec.defaults.mig.timeSlicing[1].profile", "listed twice"},
		{"mig replicas count", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing, timeSlicing: [{profile: 1g.10gb, replicas: 1}]}}\n", "spec.defaults.mig.timeSlicing[0].replicas", "replicas is 1"},
		{"mig replicas name", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing, timeSlicing: [{profile: 1g.10gb, replicas: 2, resourceName: shared}]}}\n", "spec.defaults.mig.timeSlicing[0].resourceName", "no domain prefix"},
		{"mig strategy none", head + "spec:\n  devicePlugin: {migStrategy: none}\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing}}\n", "spec.defaults.mode", "migStrategy none"},
		{"mig-dynamic for plugin", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-dynamic}\n", "spec.defaults.owner", "needs the DRA driver"},
		{"mig-dynamic profile", head + "spec:\n  defaults: {owner: dra, mode: mig-dynamic, migDynamic: {profiles: [huge]}}\n", "spec.defaults.migDynamic.profiles[0]", "not a MIG profile"},
		{"shared for plugin", head + "spec:\n  defaults: {owner: device-plugin, mode: shared}\n", "spec.defaults.owner", "only DRA"},
		{"shared isolation", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {isolation: whole}}\n", "spec.defaults.shared.isolation", "unknown isolation"},
		{"shared clients", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {maxClients: -1}}\n", "spec.defaults.shared.maxClients", "maxClients is -1"},
		{"shared mps clients", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {isolation: mps, maxClients: 60}}\n", "spec.defaults.shared.maxClients", "at most 48"},
		{"shared step", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {memoryStep: \"0\"}}\n", "spec.defaults.shared.memoryStep", "positive"},
		{"shared reserve", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {memoryReserve: \"-1Gi\"}}\n", "spec.defaults.shared.memoryReserve", "negative"},
		{"shared default memory zero", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {defaultMemory: \"0\"}}\n", "spec.defaults.shared.defaultMemory", "must be positive"},
		{"shared default memory step", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {memoryStep: 2Gi, defaultMemory: 3Gi}}\n", "spec.defaults.shared.defaultMemory", "not a multiple of memoryStep 2Gi"},
		{"shared default memory default step", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {defaultMemory: 1536Mi}}\n", "spec.defaults.shared.defaultMemory", "not a multiple of memoryStep 1Gi"},
		{"shared compute high", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {defaultComputePercent: 101}}\n", "spec.defaults.shared.defaultComputePercent", "is 101"},
		{"shared compute negative", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {defaultComputePercent: -5}}\n", "spec.defaults.shared.defaultComputePercent", "is -5"},
		{"resourceName for dra", head + "spec:\n  defaults: {owner: dra, mode: whole, resourceName: nvidia.com/x}\n", "spec.defaults.resourceName", "device-plugin setting"},
		{"resourceName for mig", head + "spec:\n  defaults: {owner: device-plugin, mode: mig-static, mig: {layout: existing}, resourceName: nvidia.com/x}\n", "spec.defaults.resourceName", "applies to modes"},
		{"resourceName reserved", head + "spec:\n  defaults: {owner: device-plugin, mode: whole, resourceName: kubernetes.io/gpu}\n", "spec.defaults.resourceName", "reserved"},
		{"resourceName invalid", head + "spec:\n  defaults: {owner: device-plugin, mode: whole, resourceName: \"nvidia.com/a b\"}\n", "spec.defaults.resourceName", "not a valid resource name"},
		{"empty selector", head + "spec:\n  rules:\n  - {selector: {}, owner: dra, mode: whole}\n", "spec.rules[0].selector", "selector is empty"},
		{"bad index", head + "spec:\n  rules:\n  - {selector: {indices: [-1]}, owner: dra, mode: whole}\n", "spec.rules[0].selector.indices[0]", "out of range"},
		{"bad uuid", head + "spec:\n  rules:\n  - {selector: {uuids: [MIG-123]}, owner: dra, mode: whole}\n", "spec.rules[0].selector.uuids[0]", "not a GPU UUID"},
		{"empty product", head + "spec:\n  rules:\n  - {selector: {productNames: [\" \"]}, owner: dra, mode: whole}\n", "spec.rules[0].selector.productNames[0]", "empty"},
		{"same index twice", head + "spec:\n  rules:\n  - {name: a, selector: {indices: [0, 1]}, owner: dra, mode: whole}\n  - {name: b, selector: {indices: [1]}, owner: none}\n", "spec.rules[1].selector.indices", "GPU 1 is also selected by spec.rules[0] (a)"},
		{"same uuid twice", head + "spec:\n  rules:\n  - {selector: {uuids: [GPU-1234abcd]}, owner: dra, mode: whole}\n  - {selector: {uuids: [GPU-1234abcd]}, owner: none}\n", "spec.rules[1].selector.uuids", "also selected"},
		{"same name twice", head + "spec:\n  rules:\n  - {name: a, selector: {indices: [0]}, owner: dra, mode: whole}\n  - {name: a, selector: {indices: [1]}, owner: none}\n", "spec.rules[1].name", "also used"},
		{"layout reserved", head + "spec:\n  migLayouts: {existing: {1g.10gb: 1}}\n", "spec.migLayouts[existing]", "reserved"},
		{"layout name", head + "spec:\n  migLayouts: {Big_One: {1g.10gb: 1}}\n", "spec.migLayouts[Big_One]", "layout name"},
		{"layout empty", head + "spec:\n  migLayouts: {big: {}}\n", "spec.migLayouts[big]", "layout is empty"},
		{"layout profile", head + "spec:\n  migLayouts: {big: {huge: 1}}\n", "spec.migLayouts[big][huge]", "not a MIG profile"},
		{"layout count", head + "spec:\n  migLayouts: {big: {1g.10gb: 8}}\n", "spec.migLayouts[big][1g.10gb]", "out of range"},
		{"layout too big", head + "spec:\n  migLayouts: {big: {4g.40gb: 1, 3g.40gb: 1, 1g.10gb: 1}}\n", "spec.migLayouts[big]", "8 compute slices"},
		{"mig strategy", head + "spec:\n  devicePlugin: {migStrategy: all}\n", "spec.devicePlugin.migStrategy", "unknown MIG strategy"},
		{"id strategy", head + "spec:\n  devicePlugin: {deviceIDStrategy: serial}\n", "spec.devicePlugin.deviceIDStrategy", "unknown device ID strategy"},
		{"list strategy", head + "spec:\n  devicePlugin: {deviceListStrategy: [envvar, mounts]}\n", "spec.devicePlugin.deviceListStrategy[1]", "unknown device list strategy"},
		{"list strategy twice", head + "spec:\n  devicePlugin: {deviceListStrategy: [envvar, envvar]}\n", "spec.devicePlugin.deviceListStrategy[1]", "listed twice"},
		{"cdi prefix", head + "spec:\n  devicePlugin: {cdiAnnotationPrefix: \"a b/\"}\n", "spec.devicePlugin.cdiAnnotationPrefix", "not an annotation prefix"},
		{"mps root", head + "spec:\n  devicePlugin: {mpsRoot: run/mps}\n", "spec.devicePlugin.mpsRoot", "not an absolute path"},
		{"pattern", head + "spec:\n  devicePlugin: {resources: {gpus: [{name: nvidia.com/a100}]}}\n", "spec.devicePlugin.resources.gpus[0].pattern", "pattern is empty"},
		{"pattern name", head + "spec:\n  devicePlugin: {resources: {mig: [{pattern: \"1g*\"}]}}\n", "spec.devicePlugin.resources.mig[0].name", "resource name is empty"},
		{"xids", head + "spec:\n  health: {ignoredXIDs: [94], criticalXIDs: [94]}\n", "spec.health.criticalXIDs[0]", "both ignored and critical"},
		{"reset-xid", head + "spec:\n  health: {ignoredXIDs: [13, 79]}\n", "spec.health.ignoredXIDs[1]", "XID 79 cannot be ignored"},
		// NVIDIA config
		{"nv version", "version: v2\n", "version", "unknown version"},
		{"nv unknown field", "version: v1\nflags: {migStrategy: none, migStratgy: mixed}\n", "flags.migStratgy", `did you mean "migStrategy"`},
		{"nv mig strategy", "version: v1\nflags: {migStrategy: all}\n", "flags.migStrategy", "unknown MIG strategy"},
		{"nv tegra", "version: v1\nflags: {deviceDiscoveryStrategy: tegra}\n", "flags.deviceDiscoveryStrategy", "tegra"},
		{"nv discovery", "version: v1\nflags: {deviceDiscoveryStrategy: pci}\n", "flags.deviceDiscoveryStrategy", "unknown strategy"},
		{"nv list strategy", "version: v1\nflags: {plugin: {deviceListStrategy: mounts}}\n", "flags.plugin.deviceListStrategy[0]", "unknown device list strategy"},
		{"nv list strategy type", "version: v1\nflags: {plugin: {deviceListStrategy: 3}}\n", "flags.plugin.deviceListStrategy", "string or a list"},
		{"nv id strategy", "version: v1\nflags: {plugin: {deviceIDStrategy: serial}}\n", "flags.plugin.deviceIDStrategy", "unknown device ID strategy"},
		{"nv no name", "version: v1\nsharing: {timeSlicing: {resources: [{replicas: 2}]}}\n", "sharing.timeSlicing.resources[0].name", "name is empty"},
		{"nv ts replicas", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1}]}}\n", "sharing.timeSlicing.resources[0].replicas", "replicas is 1"},
		{"nv mps replicas", "version: v1\nsharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 100}]}}\n", "sharing.mps.resources[0].replicas", "2 to 48 clients"},
		{"nv mps on mig", "version: v1\nflags: {migStrategy: mixed}\nsharing: {mps: {resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}]}}\n", "sharing.mps.resources[0].name", "MPS on MIG"},
		{"nv mig without mixed", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}]}}\n", "sharing.timeSlicing.resources[0].name", "only with migStrategy mixed"},
		{"nv mig devices", "version: v1\nflags: {migStrategy: mixed}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2, devices: [0]}]}}\n", "sharing.timeSlicing.resources[0].devices", "not supported"},
		{"nv mig twice", "version: v1\nflags: {migStrategy: mixed}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}, {name: mig-1g.10gb, replicas: 3}]}}\n", "sharing.timeSlicing.resources[1].name", "listed twice"},
		{"nv unknown resource", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/a100, replicas: 2}]}}\n", "sharing.timeSlicing.resources[0].name", "no GPU resource"},
		{"nv single gpu", "version: v1\nflags: {migStrategy: single}\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n", "sharing.timeSlicing.resources[0].name", "migStrategy single"},
		{"nv both all", "version: v1\nsharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n", "sharing.mps.resources[0].devices", "both apply to every GPU"},
		{"nv count", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: 2}]}}\n", "sharing.timeSlicing.resources[0].devices", "does not say which GPUs"},
		{"nv zero count", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: 0}]}}\n", "sharing.timeSlicing.resources[0].devices", "must be positive"},
		{"nv devices string", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: some}]}}\n", "sharing.timeSlicing.resources[0].devices", "only string allowed"},
		{"nv empty list", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: []}]}}\n", "sharing.timeSlicing.resources[0].devices", "list is empty"},
		{"nv mig device", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [\"0:1\"]}]}}\n", "sharing.timeSlicing.resources[0].devices[0]", "is a MIG device"},
		{"nv bad device", "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [\"first\"]}]}}\n", "sharing.timeSlicing.resources[0].devices[0]", "not a GPU index or UUID"},
		{"nv event type", "version: v1\nhealth: {eventTypes: [EventTypeBad]}\n", "health.eventTypes[0]", "unknown event type"},
		{"nv critical xids", "version: v1\nhealth: {criticalXIDs: some}\n", "health.criticalXIDs", "want \"all\""},
		{"nv xids both", "version: v1\nhealth: {ignoredXIDs: [74], criticalXIDs: [74]}\n", "health.criticalXIDs[0]", "both ignored and critical"},
		{"nv overlapping devices", "version: v1\nsharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [0, 1]}]}\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [1]}]}\n", "(converted profile).spec.rules[1].selector.indices", "GPU 1 is also selected"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseProfile([]byte(tc.doc))
			if err == nil {
				t.Fatalf("accepted")
			}
			list := AsErrorList(err)
			found := false
			for _, e := range list {
				if e.Path == tc.path && strings.Contains(e.Error(), tc.msg) {
					found = true
					if e.Fix == "" && !strings.Contains(e.Message, "want") && tc.path != "" {
						t.Errorf("no fix in %q", e.Error())
					}
				}
			}
			if !found {
				t.Errorf("want %s: …%s…, got %v", tc.path, tc.msg, err)
			}
		})
	}
}

// Refusals that need the node's GPUs.
func TestResolveRefusals(t *testing.T) {
	cases := []struct {
		name, doc, path, msg string
		gpus                 []GPUInfo
	}{
		{"mig on L4", head + "spec:\n  rules:\n  - {selector: {productNames: ['*L4']}, owner: dra, mode: mig-dynamic}\n  - {selector: {productNames: ['*A1*', '*A30']}, owner: none}\n", "spec.rules[0].mode", "cannot run MIG", mixedNode()},
		{"profile not offered", head + "spec:\n  defaults: {owner: dra, mode: mig-static, mig: {layout: all-1g.5gb}}\n", "spec.defaults.mig.layout", "offers no MIG profile \"1g.5gb\"", h100Node()},
		{"layout profile not offered", head + "spec:\n  migLayouts: {x: {2g.10gb: 2}}\n  defaults: {owner: dra, mode: mig-static, mig: {layout: x}}\n", "spec.migLayouts[x][2g.10gb]", "offers no MIG profile", h100Node()},
		{"dynamic profile not offered", head + "spec:\n  defaults: {owner: dra, mode: mig-dynamic, migDynamic: {profiles: [1c.2g.10gb]}}\n", "spec.defaults.migDynamic.profiles[0]", "offers no MIG profile", h100Node()},
		{"mps memory", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {replicas: 4, pinnedMemoryLimit: 30Gi}}\n", "spec.defaults.mps.pinnedMemoryLimit", "more than GPU 0", h100Node()},
		{"mps shares memory", head + "spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {shares: [{count: 3, activeThreadPercentage: 30, pinnedMemoryLimit: 30Gi}]}}\n", "spec.defaults.mps.shares", "more than GPU 0", h100Node()},
		{"shared reserve all", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {memoryReserve: 80Gi}}\n", "spec.defaults.shared.memoryReserve", "less than one memoryStep", h100Node()},
		{"shared default memory too big", head + "spec:\n  defaults: {owner: dra, mode: shared, shared: {memoryReserve: 10Gi, defaultMemory: 70Gi}}\n", "spec.defaults.shared.defaultMemory", "more than the 71319 MiB", h100Node()},
		{"duplicate inventory", head + "spec: {}\n", "", "listed twice", append(h100Node(), h100Node()[0])},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, tc.doc)
			_, err := Resolve(p.Profile, tc.gpus)
			if err == nil {
				t.Fatal("accepted")
			}
			found := false
			for _, e := range AsErrorList(err) {
				if e.Path == tc.path && strings.Contains(e.Message, tc.msg) {
					found = true
				}
			}
			if !found {
				t.Errorf("want %s: …%s…, got %v", tc.path, tc.msg, err)
			}
		})
	}
}

func TestWarnings(t *testing.T) {
	p := mustParse(t, head+"spec:\n  defaults: {owner: dra, mode: time-sliced, timeSlicing: {failRequestsGreaterThanOne: true}}\n")
	if len(p.Warnings) != 1 || p.Warnings[0].Path != "spec.defaults.timeSlicing.failRequestsGreaterThanOne" {
		t.Errorf("%v", p.Warnings)
	}
	p = mustParse(t, head+"spec:\n  defaults: {owner: device-plugin, mode: mps, mps: {shares: [{count: 2, activeThreadPercentage: 60}]}}\n")
	if len(p.Warnings) != 1 || !strings.Contains(p.Warnings[0].Message, "120%") {
		t.Errorf("%v", p.Warnings)
	}
	p = mustParse(t, "version: v1\nflags:\n  gdsEnabled: true\n  gdrcopyEnabled: true\n  mofedEnabled: true\n  useNodeFeatureAPI: true\n  restartOnDeviceUnhealthy: true\n  nvidiaDevRoot: /\n  plugin: {nvidiaCTKPath: /usr/bin/nvidia-ctk, containerDriverRoot: /driver-root, kubeletSocket: /k.sock, cdiFeatureFlags: [a], nvidiaCDIHookPath: /x}\nhealth: {eventTypes: [EventTypeXidCriticalError]}\n")
	if len(p.Warnings) != 12 {
		t.Errorf("want 12 warnings, got %d: %v", len(p.Warnings), p.Warnings)
	}
}

func TestConfigMapData(t *testing.T) {
	parsed, _, err := ParseConfigMapData(map[string]string{
		"good": head + "spec: {}\n",
		"bad":  head + "spec: {defaults: {owner: dra}}\n",
	})
	if err == nil || !strings.Contains(err.Error(), "data[bad].spec.defaults.mode") {
		t.Fatalf("got %v", err)
	}
	if parsed["good"] == nil {
		t.Error("good key not parsed")
	}
	if _, _, err := ParseConfigMapData(nil); err == nil {
		t.Error("empty data accepted")
	}
}
