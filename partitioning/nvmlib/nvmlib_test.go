package nvmlib

import (
	"errors"
	"fmt"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

func TestGIProfileName(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		id, slices int
		mem, total uint64
		want       string
	}{
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE, 1, 4864, 40960 * mib, "1g.5gb"},
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1, 1, 4864, 40960 * mib, "1g.5gb+me"},
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2, 1, 9856, 40960 * mib, "1g.10gb"},
		{nvml.GPU_INSTANCE_PROFILE_3_SLICE, 3, 19968, 40960 * mib, "3g.20gb"},
		{nvml.GPU_INSTANCE_PROFILE_7_SLICE, 7, 40192, 40960 * mib, "7g.40gb"},
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE, 1, 9984, 81559 * mib, "1g.10gb"},
		{nvml.GPU_INSTANCE_PROFILE_7_SLICE, 7, 81152, 81559 * mib, "7g.80gb"},
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, 1, 9984, 81559 * mib, "1g.10gb-me"},
		{nvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, 1, 9984, 81559 * mib, "1g.10gb+me.all"},
		{nvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX, 2, 20096, 81559 * mib, "2g.20gb+gfx"},
	}
	for _, tc := range cases {
		if got := GIProfileName(tc.id, tc.slices, tc.mem, tc.total); got != tc.want {
			t.Errorf("profile %d, %d MiB of %d MiB: %q, want %q", tc.id, tc.mem, tc.total/mib, got, tc.want)
		}
	}
}

func TestErrorsMatchSentinels(t *testing.T) {
	cases := map[nvml.Return]error{
		nvml.ERROR_IN_USE:                 ErrInUse,
		nvml.ERROR_INSUFFICIENT_RESOURCES: ErrInsufficientResources,
		nvml.ERROR_NOT_SUPPORTED:          ErrNotSupported,
		nvml.ERROR_GPU_IS_LOST:            ErrGPULost,
		nvml.ERROR_INVALID_ARGUMENT:       ErrInvalidArgument,
		nvml.ERROR_NOT_FOUND:              ErrNotFound,
		nvml.ERROR_RESET_REQUIRED:         ErrResetRequired,
		nvml.ERROR_NO_PERMISSION:          ErrNoPermission,
	}
	for ret, want := range cases {
		err := fmt.Errorf("wrapped: %w", newErr("Op", 3, ret))
		if !errors.Is(err, want) {
			t.Errorf("%s does not match %v", retName(ret), want)
		}
		if errors.Is(err, ErrInUse) && want != ErrInUse {
			t.Errorf("%s matches ErrInUse", retName(ret))
		}
	}
	if newErr("Op", 0, nvml.SUCCESS) != nil {
		t.Error("SUCCESS is an error")
	}
	if got := newErr("SetMigMode", 2, nvml.ERROR_IN_USE).Error(); got != "nvml SetMigMode on GPU 2: ERROR_IN_USE" {
		t.Errorf("message %q", got)
	}
}
