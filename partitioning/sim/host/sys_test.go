//go:build linux

package host

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// GPUs get a sysfs entry: their bus ID links into the devices tree under one root complex per NUMA
// node, with their NUMA node; a GPU no longer listed loses its link.
func TestSysPCIDevices(t *testing.T) {
	root := t.TempDir()
	spec := testSpec
	spec.PCI = []PCIDevice{{BusID: "00000000:18:00.0", NUMANode: 0}, {BusID: "0000:2A:00.0", NUMANode: 0}, {BusID: "00000000:9a:00.0", NUMANode: 1}}
	h, err := Ensure(root, spec)
	if err != nil {
		t.Fatal(err)
	}
	for bdf, want := range map[string]string{
		"0000:18:00.0": "../../../devices/pci0000:10/0000:10:00.0/0000:18:00.0",
		"0000:2a:00.0": "../../../devices/pci0000:10/0000:10:00.0/0000:2a:00.0",
		"0000:9a:00.0": "../../../devices/pci0000:90/0000:90:00.0/0000:9a:00.0",
	} {
		link := filepath.Join(h.SysRoot(), "bus", "pci", "devices", bdf)
		got, err := os.Readlink(link)
		if err != nil || got != want {
			t.Errorf("%s -> %q (%v), want %q", bdf, got, err, want)
		}
		numa, err := os.ReadFile(filepath.Join(filepath.Dir(link), got, "numa_node"))
		if err != nil || (strings.TrimSpace(string(numa)) != "0") != (bdf == "0000:9a:00.0") {
			t.Errorf("%s numa_node %q %v", bdf, numa, err)
		}
	}
	spec.PCI = spec.PCI[:1]
	if _, err := Ensure(root, spec); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(h.SysRoot(), "bus", "pci", "devices", "0000:2a:00.0")); !os.IsNotExist(err) {
		t.Errorf("stale link kept: %v", err)
	}
	spec.PCI = []PCIDevice{{BusID: "18:00.0"}}
	if _, err := Ensure(root, spec); err == nil {
		t.Error("a malformed bus ID was accepted")
	}
}
