// Package dra is Tessera's DRA driver (resource.k8s.io/v1, driver gpu.tessera.dev) for the GPUs the
// sharing profile gives to the `dra` owner. It publishes one ResourceSlice per GPU in the node's pool
// (whole GPUs, the MIG devices that exist on mig-static GPUs, and time-sliced GPUs that many claims
// share), prepares and unprepares claims for the kubelet through the kubeletplugin helper, and streams
// device health to the kubelet while tainting unhealthy devices in their slices — and untainting them
// when they recover.
//
// Prepare holds no node-wide lock: claims on different GPUs never wait for each other. Each GPU has a
// lock (an in-process mutex plus a file lock, so two driver instances overlapping in a rolling update
// exclude each other per GPU), each claim has its own checkpoint file, written in two phases (started,
// completed) with the boot ID and fsynced, and versioned so that a claim prepared by one driver release
// unprepares under the next. At start the driver reconciles: half-done prepares are rolled back,
// prepares of an earlier boot are dropped, and missing CDI specs of prepared claims are written again.
//
// See docs/dra.md.
package dra
