# Tessera — build, test, demo. Every target works on a fresh machine after .ci/run's installs
# (or with the Debian packages docs/testing.md lists).
GO        ?= go
BIN       ?= $(CURDIR)/bin
PKGS      := ./...
E2E_FLAGS ?=
# go-nvml's cgo prolog references NVML calls the header marks deprecated; the warnings are noise.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations

.PHONY: all build test unit e2e demo demo-down bench bench-raw lint clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

# make test: unit tests, then the end-to-end tests against a real local cluster.
test: lint unit e2e

unit:
	$(GO) test -count=1 $(PKGS)

e2e: build
	$(GO) test -tags e2e -count=1 -timeout 80m -v ./tests/e2e/... $(E2E_FLAGS)

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

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags e2e ./tests/...

clean:
	rm -rf $(BIN)
