# Tessera — build, test, demo. Every target works on a fresh machine after .ci/run's installs
# (or with the Debian packages docs/testing.md lists).
GO        ?= go
BIN       ?= $(CURDIR)/bin
PKGS      := ./...
E2E_FLAGS ?=
# go-nvml's cgo prolog references NVML calls the header marks deprecated; the warnings are noise.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations
# Build tags of the shipped binaries. grpcnotrace keeps gRPC's golang.org/x/net/trace out of the
# daemons: its /debug/requests pages (never served: nothing uses http.DefaultServeMux) link
# html/template, which calls methods by name, and a binary that can do that keeps every exported
# method of every type. Without the tag the DRA kubelet plugin is 78 MB instead of 50 and touches
# about 10 MB more of it (RSS). cmd/tessera-kubelet-plugin's TestDaemonDependencies checks this.
GOTAGS    ?= grpcnotrace

.PHONY: all build test unit e2e demo demo-down bench bench-raw lint clean image

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -tags '$(GOTAGS)' -o $(BIN)/ ./cmd/...

# make test: unit tests, then the end-to-end tests against a real local cluster.
test: lint unit e2e

unit:
	$(GO) test -count=1 $(PKGS)

e2e: build
	$(GO) test -tags e2e -count=1 -timeout 80m -v ./tests/e2e/... $(E2E_FLAGS)

# make image: the container image as an OCI tarball (bin/tessera-image.tar), without a Docker
# daemon: stripped binaries plus the shared libraries they load. IMAGE names it. Import it with
# `ctr -n k8s.io images import`, `kind load image-archive` or `skopeo copy oci-archive:`.
IMAGE ?= ghcr.io/tessera-gpu/tessera:dev
image:
	@mkdir -p $(BIN)/image
	$(GO) build -tags '$(GOTAGS)' -trimpath -ldflags="-s -w" -o $(BIN)/image/ ./cmd/...
	$(GO) run ./deployments/image/cmd/tessera-image --bin-dir $(BIN)/image --ref $(IMAGE) --out $(BIN)/tessera-image.tar

demo: build
	$(GO) run ./tests/cmd/localcluster demo --tessera-bin $(BIN)

demo-down:
	$(GO) run ./tests/cmd/localcluster down

# make bench: the figures that matter, each beside a baseline from the same run, as one table
# (printed and written to docs/performance.md); short mode, a few minutes. BENCH_FLAGS=-short=false
# for more iterations.
BENCH_FLAGS ?=
bench:
	$(GO) run ./tests/cmd/benchtable $(BENCH_FLAGS)

# make bench-raw: every unit-level benchmark, as go test prints it.
bench-raw:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

# make manifests: deployments/static/*.yaml (for kubectl apply), rendered from the Helm chart
# through the Helm library; a unit test fails while they differ from a fresh render.
.PHONY: manifests
manifests:
	$(GO) run ./deployments/helm/cmd/tessera-manifests -o deployments/static

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags e2e ./tests/...

clean:
	rm -rf $(BIN)
