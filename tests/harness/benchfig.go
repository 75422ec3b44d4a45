package harness

// DRABenchFile is the file the DRA driver's cluster benchmark (tests/e2e TestDRADriverBenchmark)
// writes its figures to, in the directory named by $TESSERA_BENCH_OUT, for `make bench`.
const DRABenchFile = "dra-bench.json"

// Percentiles are a latency's median and 99th percentile, in milliseconds.
type Percentiles struct {
	P50ms float64 `json:"p50ms"`
	P99ms float64 `json:"p99ms"`
}

// DRABenchFigures are the DRA driver's figures on the local cluster: a kubelet-like gRPC client on
// its socket, the real API server's claim GET as the baseline, serially and with Callers parallel
// callers; claims per second of Prepare + Unprepare; start to first ResourceSlice over warm restarts.
type DRABenchFigures struct {
	Callers              int         `json:"callers"`
	GetSerial            Percentiles `json:"getSerial"`
	GetParallel          Percentiles `json:"getParallel"`
	PrepareSerial        Percentiles `json:"prepareSerial"`
	UnprepareSerial      Percentiles `json:"unprepareSerial"`
	PrepareParallel      Percentiles `json:"prepareParallel"`
	UnprepareParallel    Percentiles `json:"unprepareParallel"`
	ClaimsPerSecSerial   float64     `json:"claimsPerSecSerial"`
	ClaimsPerSecParallel float64     `json:"claimsPerSecParallel"`
	FirstSliceMs         float64     `json:"firstSliceMs"`
	// CPUPerClaim is each process's CPU milliseconds per claim in the parallel phase, in the order
	// of CPUOrder; BusyCores is how many of the machine's cores were busy then.
	CPUPerClaim map[string]float64 `json:"cpuPerClaimMs"`
	CPUOrder    []string           `json:"cpuOrder"`
	BusyCores   float64            `json:"busyCores"`
}

// BuildTags are the build tags the Makefile (GOTAGS) and the Dockerfile build the shipped binaries
// with; tests and benchmarks that build a daemon use them too, so they measure what ships.
const BuildTags = "grpcnotrace"
