package host

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// PCIDevice is a GPU's place on the PCI bus, laid out under sys/ so that tools resolving a PCI device
// through sysfs (its PCIe root complex, its NUMA node) work on a simulated host.
type PCIDevice struct {
	// BusID in extended BDF form, e.g. "0000:18:00.0" (NVML's "00000000:18:00.0" is accepted).
	BusID    string
	NUMANode int
}

var bdfRE = regexp.MustCompile(`^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$`)

// normalizeBDF turns NVML's 8-digit domain into sysfs's 4-digit one and lower-cases the ID.
func normalizeBDF(id string) (string, error) {
	s := strings.ToLower(id)
	if dom, rest, ok := strings.Cut(s, ":"); ok && len(dom) == 8 && strings.HasPrefix(dom, "0000") {
		s = dom[4:] + ":" + rest
	}
	if !bdfRE.MatchString(s) {
		return "", fmt.Errorf("PCI bus ID %q is not of the form 0000:18:00.0", id)
	}
	return s, nil
}

// SysRoot is <root>/sys, a sysfs holding the GPUs given in Spec.PCI:
//
//	sys/bus/pci/devices/<bdf> -> ../../../devices/pci<domain>:<rb>/<domain>:<rb>:00.0/<bdf>
//	sys/devices/pci<domain>:<rb>/<domain>:<rb>:00.0/<bdf>/numa_node
//
// The GPUs of one NUMA node share one PCIe root complex, as the simulator's topology has them share a
// host bridge; <rb> is the lowest bus of that node's GPUs rounded down to a multiple of 0x10.
func (h *Host) SysRoot() string { return filepath.Join(h.root, "sys") }

func (h *Host) ensureSys() error {
	if len(h.spec.PCI) == 0 {
		return nil
	}
	rootBus := map[int]int{} // NUMA node → root bus
	for _, d := range h.spec.PCI {
		bus, _ := strconv.ParseUint(d.BusID[5:7], 16, 8)
		b := int(bus) &^ 0xf
		if cur, ok := rootBus[d.NUMANode]; !ok || b < cur {
			rootBus[d.NUMANode] = b
		}
	}
	links := filepath.Join(h.SysRoot(), "bus", "pci", "devices")
	want := map[string]bool{}
	for _, d := range h.spec.PCI {
		dom := d.BusID[:4]
		rb := fmt.Sprintf("%02x", rootBus[d.NUMANode])
		rel := filepath.Join("pci"+dom+":"+rb, dom+":"+rb+":00.0", d.BusID)
		if err := h.writeFile(filepath.Join(h.SysRoot(), "devices", rel, "numa_node"), fmt.Appendf(nil, "%d\n", d.NUMANode), 0o444); err != nil {
			return err
		}
		if err := h.symlink(filepath.Join("..", "..", "..", "devices", rel), filepath.Join(links, d.BusID)); err != nil {
			return err
		}
		want[d.BusID] = true
	}
	entries, err := os.ReadDir(links)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if bdfRE.MatchString(e.Name()) && !want[e.Name()] {
			if err := os.Remove(filepath.Join(links, e.Name())); err != nil && !os.IsNotExist(err) {
				return err
			}
		}
	}
	return nil
}
