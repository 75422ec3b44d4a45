package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/tessera-gpu/tessera/api"
	"github.com/tessera-gpu/tessera/partitioning/backend"
	"github.com/tessera-gpu/tessera/partitioning/inventory"
	"github.com/tessera-gpu/tessera/profile"
)

// errInvalid makes the command exit 1 after it has printed the problems itself.
var errInvalid = errors.New("profile is not valid")

func newProfileCmd(opts *backend.Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "profile",
		Short: "Validate and convert GPU sharing profiles",
	}
	cmd.AddCommand(newProfileValidateCmd(opts), newProfileConvertCmd())
	return cmd
}

func newProfileValidateCmd(opts *backend.Options) *cobra.Command {
	var file, nodeInv, name, output string
	cmd := &cobra.Command{
		Use:   "validate -f FILE [--node-inventory sim:<node>|real|inventory.json]",
		Short: "Check a SharingProfile, an NVIDIA device-plugin config or a profile ConfigMap",
		Long: `Check a sharing profile the way the node and the admission webhook will: a SharingProfile
(apiVersion tessera.dev/v1alpha1), an NVIDIA device-plugin config (version: v1) or a ConfigMap of
named profiles. With --node-inventory it also resolves the profile against a node's GPUs and prints
each GPU's owner and mode. Exits 1 when anything is wrong; each error names the field and the fix.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return errors.New("-f FILE is required (use - for standard input)")
			}
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: use table or json", output)
			}
			data, err := readInput(cmd.InOrStdin(), file)
			if err != nil {
				return err
			}
			var gpus []api.GPUInfo
			if nodeInv != "" {
				if gpus, err = loadInventory(cmd.Context(), nodeInv, opts.SimStateDir); err != nil {
					return fmt.Errorf("--node-inventory: %w", err)
				}
			}
			return validate(cmd.OutOrStdout(), data, file, name, gpus, nodeInv != "", output)
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "profile file (SharingProfile, NVIDIA config v1 or ConfigMap); - for standard input")
	cmd.Flags().StringVar(&nodeInv, "node-inventory", "", "resolve against a node: sim:<node>, sim-file:<path>, real, or a JSON/YAML file from `tessera inspect -o json`")
	cmd.Flags().StringVar(&name, "profile", "", "with a ConfigMap: check only this key")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output: table or json")
	return cmd
}

func newProfileConvertCmd() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "convert -f FILE",
		Short: "Print an NVIDIA device-plugin config (or a profile) as a Tessera SharingProfile",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			data, err := readInput(cmd.InOrStdin(), file)
			if err != nil {
				return err
			}
			p, err := api.ParseProfile(data)
			if err != nil {
				printErrors(cmd.ErrOrStderr(), "", err)
				return errInvalid
			}
			for _, w := range p.Warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning:", w)
			}
			out, err := api.MarshalProfile(p.Profile)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "-", "input file; - for standard input")
	return cmd
}

func readInput(stdin io.Reader, file string) ([]byte, error) {
	if file == "-" {
		return io.ReadAll(io.LimitReader(stdin, api.MaxInputBytes+1))
	}
	return os.ReadFile(file)
}

// loadInventory reads GPUs from a backend spec or an inventory file.
func loadInventory(ctx context.Context, spec, simState string) ([]api.GPUInfo, error) {
	if spec == "real" || strings.HasPrefix(spec, "sim:") || strings.HasPrefix(spec, "sim-file:") {
		lib, _, err := backend.Options{NVML: spec, SimStateDir: simState}.Open()
		if err != nil {
			return nil, err
		}
		defer lib.Shutdown()
		return profile.GPUsFromNVML(ctx, lib)
	}
	data, err := os.ReadFile(spec)
	if err != nil {
		return nil, err
	}
	var snap inventory.Snapshot
	if err := yamlOrJSON(data, &snap); err != nil {
		return nil, fmt.Errorf("%s: not an inventory (tessera inspect -o json): %w", spec, err)
	}
	if len(snap.GPUs) == 0 {
		return nil, fmt.Errorf("%s: no GPUs in the inventory", spec)
	}
	return profile.GPUsFromSnapshot(&snap), nil
}

type validateResult struct {
	Profile     string           `json:"profile,omitempty"`
	Format      api.Format       `json:"format,omitempty"`
	Valid       bool             `json:"valid"`
	Errors      api.ErrorList    `json:"errors,omitempty"`
	Warnings    api.Warnings     `json:"warnings,omitempty"`
	Assignments []api.Assignment `json:"assignments,omitempty"`
}

func validate(out io.Writer, data []byte, file, only string, gpus []api.GPUInfo, resolve bool, output string) error {
	docs := map[string][]byte{"": data}
	if api.IsConfigMap(data) {
		cm, _, _, err := api.ParseConfigMap(data)
		if cm == nil {
			printErrors(out, file, err)
			return errInvalid
		}
		docs = map[string][]byte{}
		for k, v := range cm.Data {
			if only == "" || k == only {
				docs[k] = []byte(v)
			}
		}
		if len(docs) == 0 {
			return fmt.Errorf("%s: no profile %q in the ConfigMap", file, only)
		}
	}
	var results []validateResult
	for _, k := range sortedKeys(docs) {
		r := validateResult{Profile: k}
		p, err := api.ParseProfile(docs[k])
		if err == nil {
			r.Format, r.Warnings = p.Format, p.Warnings
			if resolve {
				res, rerr := api.Resolve(p.Profile, gpus)
				if rerr != nil {
					err = rerr
				} else {
					r.Assignments = res.Assignments
					r.Warnings = append(r.Warnings, res.Warnings...)
				}
			}
		}
		r.Errors = api.AsErrorList(err)
		r.Valid = err == nil
		results = append(results, r)
	}
	valid := true
	for _, r := range results {
		valid = valid && r.Valid
	}
	if output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(results); err != nil {
			return err
		}
	} else {
		for i, r := range results {
			if i > 0 {
				fmt.Fprintln(out)
			}
			printResult(out, file, r)
		}
	}
	if !valid {
		return errInvalid
	}
	return nil
}

func printResult(out io.Writer, file string, r validateResult) {
	where := file
	if r.Profile != "" {
		where = fmt.Sprintf("%s [%s]", file, r.Profile)
	}
	if !r.Valid {
		printErrors(out, where, r.Errors)
		return
	}
	fmt.Fprintf(out, "%s: valid %s\n", where, r.Format)
	for _, w := range r.Warnings {
		fmt.Fprintf(out, "  warning: %s\n", w)
	}
	if len(r.Assignments) == 0 {
		return
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tPRODUCT\tOWNER\tMODE\tSETTINGS\tFROM")
	for _, a := range r.Assignments {
		mode := string(a.Mode)
		if mode == "" {
			mode = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", a.GPU.Index, a.GPU.ProductName, a.Owner, mode, dash(a.String()), a.Source)
	}
	tw.Flush()
}

func printErrors(out io.Writer, where string, err error) {
	list := api.AsErrorList(err)
	fmt.Fprintf(out, "%s: %d error(s)\n", where, len(list))
	for _, e := range list {
		fmt.Fprintf(out, "  %s\n", e)
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func yamlOrJSON(data []byte, v any) error { return yaml.Unmarshal(data, v) }
