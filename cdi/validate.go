package cdi

import (
	"errors"
	"fmt"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"
)

// validate checks a spec in memory with the CDI library's own rules, the ones cdi.ReadSpec applies
// to a spec it has parsed from a file: the version, the kind's vendor and class, the container edits
// of the spec and of each device, the device names, no device twice and at least one. The library
// runs them only on a file it reads; reading our own JSON back through its YAML decoder cost every
// Prepare more CPU than everything else the driver does for a claim. TestValidateAgreesWithReadSpec
// holds the two to the same verdicts. Annotations are refused outright: the generator writes none,
// and the library keeps their check internal.
func validate(spec *specs.Spec) error {
	if spec == nil {
		return errors.New("no spec")
	}
	if err := specs.ValidateVersion(spec); err != nil {
		return err
	}
	vendor, class := parser.ParseQualifier(spec.Kind)
	if err := parser.ValidateVendorName(vendor); err != nil {
		return err
	}
	if err := parser.ValidateClassName(class); err != nil {
		return err
	}
	if len(spec.Annotations) > 0 {
		return errors.New("the spec has annotations; the generator writes none")
	}
	if err := (&cdiapi.ContainerEdits{ContainerEdits: &spec.ContainerEdits}).Validate(); err != nil {
		return err
	}
	if len(spec.Devices) == 0 {
		return errors.New("invalid spec, no devices")
	}
	seen := make(map[string]bool, len(spec.Devices))
	for i := range spec.Devices {
		d := &spec.Devices[i]
		if err := parser.ValidateDeviceName(d.Name); err != nil {
			return fmt.Errorf("device %q: %w", d.Name, err)
		}
		if len(d.Annotations) > 0 {
			return fmt.Errorf("device %q has annotations; the generator writes none", d.Name)
		}
		e := d.ContainerEdits
		if len(e.Env) == 0 && len(e.DeviceNodes) == 0 && len(e.Hooks) == 0 && len(e.Mounts) == 0 &&
			len(e.AdditionalGIDs) == 0 && e.IntelRdt == nil && len(e.NetDevices) == 0 {
			return fmt.Errorf("invalid device %q, empty device edits", d.Name)
		}
		if err := (&cdiapi.ContainerEdits{ContainerEdits: &e}).Validate(); err != nil {
			return fmt.Errorf("invalid device %q: %w", d.Name, err)
		}
		if seen[d.Name] {
			return fmt.Errorf("invalid spec, multiple device %q", d.Name)
		}
		seen[d.Name] = true
	}
	return nil
}
