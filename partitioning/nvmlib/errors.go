package nvmlib

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Error is a failed NVML call: which operation, on which GPU, and NVML's return code.
type Error struct {
	Op  string
	GPU int // -1 when the call is not about one GPU
	Ret nvml.Return
}

func (e *Error) Error() string {
	if e.GPU >= 0 {
		return fmt.Sprintf("nvml %s on GPU %d: %s", e.Op, e.GPU, retName(e.Ret))
	}
	return fmt.Sprintf("nvml %s: %s", e.Op, retName(e.Ret))
}

// Code returns NVML's return code name, e.g. "ERROR_IN_USE".
func (e *Error) Code() string { return retName(e.Ret) }

// Is lets errors.Is match an *Error against the package's sentinels.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNotSupported:
		return e.Ret == nvml.ERROR_NOT_SUPPORTED
	case ErrInvalidArgument:
		return e.Ret == nvml.ERROR_INVALID_ARGUMENT
	case ErrNotFound:
		return e.Ret == nvml.ERROR_NOT_FOUND
	case ErrInUse:
		return e.Ret == nvml.ERROR_IN_USE
	case ErrInsufficientResources:
		return e.Ret == nvml.ERROR_INSUFFICIENT_RESOURCES
	case ErrGPULost:
		return e.Ret == nvml.ERROR_GPU_IS_LOST
	case ErrResetRequired:
		return e.Ret == nvml.ERROR_RESET_REQUIRED
	case ErrNoPermission:
		return e.Ret == nvml.ERROR_NO_PERMISSION
	}
	return false
}

func newErr(op string, gpu int, ret nvml.Return) error {
	if ret == nvml.SUCCESS {
		return nil
	}
	countErr(op, ret)
	return &Error{Op: op, GPU: gpu, Ret: ret}
}

// errCounts counts failed NVML calls in this process by call and return code (op + "\x00" + code
// → *atomic.Uint64), lock-free once a pair was seen.
var errCounts sync.Map

func countErr(op string, ret nvml.Return) {
	key := op + "\x00" + retName(ret)
	c, ok := errCounts.Load(key)
	if !ok {
		c, _ = errCounts.LoadOrStore(key, new(atomic.Uint64))
	}
	c.(*atomic.Uint64).Add(1)
}

// ErrorCount is how often one NVML call failed with one return code.
type ErrorCount struct {
	Call, Code string
	Count      uint64
}

// ErrorCounts returns the NVML calls that failed in this process, by call and return code, sorted.
func ErrorCounts() []ErrorCount {
	var out []ErrorCount
	errCounts.Range(func(k, v any) bool {
		call, code, _ := strings.Cut(k.(string), "\x00")
		out = append(out, ErrorCount{Call: call, Code: code, Count: v.(*atomic.Uint64).Load()})
		return true
	})
	sort.Slice(out, func(i, j int) bool {
		if out[i].Call != out[j].Call {
			return out[i].Call < out[j].Call
		}
		return out[i].Code < out[j].Code
	})
	return out
}

// retName names a return code without asking the library (safe when NVML is not loaded).
func retName(r nvml.Return) string {
	if s, ok := retNames[r]; ok {
		return s
	}
	return fmt.Sprintf("NVML return %d", int32(r))
}

var retNames = map[nvml.Return]string{
	nvml.SUCCESS:                       "SUCCESS",
	nvml.ERROR_UNINITIALIZED:           "ERROR_UNINITIALIZED",
	nvml.ERROR_INVALID_ARGUMENT:        "ERROR_INVALID_ARGUMENT",
	nvml.ERROR_NOT_SUPPORTED:           "ERROR_NOT_SUPPORTED",
	nvml.ERROR_NO_PERMISSION:           "ERROR_NO_PERMISSION",
	nvml.ERROR_ALREADY_INITIALIZED:     "ERROR_ALREADY_INITIALIZED",
	nvml.ERROR_NOT_FOUND:               "ERROR_NOT_FOUND",
	nvml.ERROR_INSUFFICIENT_SIZE:       "ERROR_INSUFFICIENT_SIZE",
	nvml.ERROR_INSUFFICIENT_POWER:      "ERROR_INSUFFICIENT_POWER",
	nvml.ERROR_DRIVER_NOT_LOADED:       "ERROR_DRIVER_NOT_LOADED",
	nvml.ERROR_TIMEOUT:                 "ERROR_TIMEOUT",
	nvml.ERROR_IRQ_ISSUE:               "ERROR_IRQ_ISSUE",
	nvml.ERROR_LIBRARY_NOT_FOUND:       "ERROR_LIBRARY_NOT_FOUND",
	nvml.ERROR_FUNCTION_NOT_FOUND:      "ERROR_FUNCTION_NOT_FOUND",
	nvml.ERROR_CORRUPTED_INFOROM:       "ERROR_CORRUPTED_INFOROM",
	nvml.ERROR_GPU_IS_LOST:             "ERROR_GPU_IS_LOST",
	nvml.ERROR_RESET_REQUIRED:          "ERROR_RESET_REQUIRED",
	nvml.ERROR_OPERATING_SYSTEM:        "ERROR_OPERATING_SYSTEM",
	nvml.ERROR_LIB_RM_VERSION_MISMATCH: "ERROR_LIB_RM_VERSION_MISMATCH",
	nvml.ERROR_IN_USE:                  "ERROR_IN_USE",
	nvml.ERROR_MEMORY:                  "ERROR_MEMORY",
	nvml.ERROR_NO_DATA:                 "ERROR_NO_DATA",
	nvml.ERROR_INSUFFICIENT_RESOURCES:  "ERROR_INSUFFICIENT_RESOURCES",
	nvml.ERROR_UNKNOWN:                 "ERROR_UNKNOWN",
}
