package inventory

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"
)

// Formats Render accepts.
var Formats = []string{"table", "json", "yaml"}

// Render writes a snapshot as a table, JSON or YAML.
func Render(w io.Writer, s *Snapshot, format string) error {
	switch format {
	case "json":
		data, err := json.MarshalIndent(s, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", data)
		return err
	case "yaml":
		data, err := yaml.Marshal(s)
		if err != nil {
			return err
		}
		_, err = w.Write(data)
		return err
	case "table", "":
		return renderTable(w, s)
	}
	return fmt.Errorf("output format %q: use one of %s", format, strings.Join(Formats, ", "))
}

func renderTable(w io.Writer, s *Snapshot) error {
	fmt.Fprintf(w, "Driver %s  CUDA %s  NVML %s  %d GPUs\n\n", s.System.DriverVersion, s.System.CUDADriverVersion, s.System.NVMLVersion, len(s.GPUs))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tPRODUCT\tUUID\tMEMORY\tCC\tBUS ID\tNUMA\tMIG\tCOMPUTE MODE\tNVLINK PEERS\tSTATUS")
	for _, g := range s.GPUs {
		status := "ok"
		if g.Error != "" {
			status = g.Error
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d MiB\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", g.Index, g.ProductName, g.UUID, g.MemoryMiB,
			g.ComputeCapability, g.PCIBusID, numa(g.NUMANode), migMode(g), g.ComputeMode, ints(g.NVLinkPeers), status)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var migs int
	for _, g := range s.GPUs {
		migs += len(g.MigDevices)
	}
	if migs == 0 {
		return nil
	}
	fmt.Fprintf(w, "\nMIG devices (%d)\n", migs)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tGI\tCI\tPROFILE\tPLACEMENT\tMEMORY\tSMS\tUUID")
	for _, g := range s.GPUs {
		for _, m := range g.MigDevices {
			fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%d+%d\t%d MiB\t%d\t%s\n", m.ParentIndex, m.GI, m.CI, m.Profile,
				m.Placement.Start, m.Placement.Size, m.MemoryMiB, m.SMCount, m.UUID)
		}
	}
	return tw.Flush()
}

func migMode(g GPU) string {
	switch {
	case !g.MigCapable:
		return "n/a"
	case g.MigEnabled && !g.MigPending:
		return "enabled (pending disable)"
	case g.MigEnabled:
		return "enabled"
	case g.MigPending:
		return "disabled (pending enable)"
	}
	return "disabled"
}

func numa(n int) string {
	if n < 0 {
		return "-"
	}
	return strconv.Itoa(n)
}

func ints(xs []int) string {
	if len(xs) == 0 {
		return "-"
	}
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = strconv.Itoa(x)
	}
	return strings.Join(parts, ",")
}
