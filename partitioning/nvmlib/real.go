package nvmlib

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// nvmlLibrary is the soname go-nvml loads.
const nvmlLibrary = "libnvidia-ml.so.1"

// LibraryUnder finds libnvidia-ml under a driver root mounted somewhere else than / (a container
// that mounts the host's driver root, e.g. at /driver-root): its library directories, as the
// driver's installers use them. "" for the root "/" (the loader's own search finds it) or when it
// is not there.
func LibraryUnder(driverRoot string) string {
	if driverRoot == "" || filepath.Clean(driverRoot) == "/" {
		return ""
	}
	triplet := "x86_64-linux-gnu"
	if runtime.GOARCH == "arm64" {
		triplet = "aarch64-linux-gnu"
	}
	for _, dir := range []string{"usr/lib/" + triplet, "usr/lib/" + triplet + "/nvidia/current", "lib/" + triplet, "usr/lib64", "lib64", "usr/lib", "lib"} {
		p := filepath.Join(driverRoot, dir, nvmlLibrary)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// OpenReal loads libnvidia-ml with dlopen (as go-nvml does) and initialises it: from the driver
// root when it is not / and holds the library, else wherever the loader finds it. Without the
// library or a driver the error is one line that says how to run a simulated node instead.
func OpenReal(driverRoot string) (Interface, error) {
	var opts []nvml.LibraryOption
	if p := LibraryUnder(driverRoot); p != "" {
		opts = append(opts, nvml.WithLibraryPath(p))
	}
	lib, err := Wrap(nvml.New(opts...))
	if err == nil {
		return lib, nil
	}
	var ne *Error
	if errors.As(err, &ne) && (ne.Ret == nvml.ERROR_LIBRARY_NOT_FOUND || ne.Ret == nvml.ERROR_DRIVER_NOT_LOADED) {
		where := ""
		if driverRoot != "" && filepath.Clean(driverRoot) != "/" {
			where = fmt.Sprintf(" (looked under the driver root %s too)", driverRoot)
		}
		return nil, fmt.Errorf("NVML is not available here (%s)%s: this machine has no NVIDIA driver; to run on a simulated GPU node use --nvml=sim:dgx-h100 or TESSERA_NVML=sim:dgx-h100 (`tessera sim list` shows the nodes)", ne.Code(), where)
	}
	return nil, fmt.Errorf("initialising NVML: %w", err)
}
