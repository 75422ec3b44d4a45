package cdi

import (
	"fmt"
	"slices"
	"strings"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
)

// ListedDevice is a CDI device as a container runtime resolves it.
type ListedDevice struct {
	// Name is the qualified device name (kind=name).
	Name string `json:"name"`
	// Spec is the file defining it.
	Spec string `json:"spec"`
}

// Listing is what a container runtime would make of a spec directory.
type Listing struct {
	Devices []ListedDevice `json:"devices"`
	// Errors are the problems with spec files, by file: unparseable or invalid specs, and devices two
	// specs define (the runtime then drops the device from both).
	Errors map[string][]string `json:"errors,omitempty"`
}

// List loads specDir with the CDI library, as containerd and CRI-O do, and returns the devices of
// kind (all kinds if kind is "") and the errors of every spec file.
func List(specDir, kind string) (Listing, error) {
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(specDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return Listing{}, fmt.Errorf("cdi: %w", err)
	}
	var l Listing
	for _, name := range cache.ListDevices() {
		if kind != "" && !strings.HasPrefix(name, kind+"=") {
			continue
		}
		d := cache.GetDevice(name)
		if d == nil {
			continue
		}
		l.Devices = append(l.Devices, ListedDevice{Name: name, Spec: d.GetSpec().GetPath()})
	}
	for path, errs := range cache.GetErrors() {
		if len(errs) == 0 {
			continue
		}
		if l.Errors == nil {
			l.Errors = map[string][]string{}
		}
		for _, e := range errs {
			l.Errors[path] = append(l.Errors[path], e.Error())
		}
		slices.Sort(l.Errors[path])
	}
	return l, nil
}
