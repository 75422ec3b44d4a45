package nvmlib

import (
	"errors"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// OpenReal loads libnvidia-ml with dlopen (as go-nvml does) and initialises it. Without the library
// or a driver the error is one line that says how to run a simulated node instead.
func OpenReal() (Interface, error) {
	lib, err := Wrap(nvml.New())
	if err == nil {
		return lib, nil
	}
	var ne *Error
	if errors.As(err, &ne) && (ne.Ret == nvml.ERROR_LIBRARY_NOT_FOUND || ne.Ret == nvml.ERROR_DRIVER_NOT_LOADED) {
		return nil, fmt.Errorf("NVML is not available here (%s): this machine has no NVIDIA driver; to run on a simulated GPU node use --nvml=sim:dgx-h100 or TESSERA_NVML=sim:dgx-h100 (`tessera sim list` shows the nodes)", ne.Code())
	}
	return nil, fmt.Errorf("initialising NVML: %w", err)
}
