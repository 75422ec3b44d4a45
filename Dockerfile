# syntax=docker/dockerfile:1
# Tessera's image for registries, amd64 and arm64 (GH200/GB200 nodes are arm64):
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/tessera:<tag> --push .
# Without a Docker daemon, `make image` builds the same contents for this machine's architecture as
# an OCI tarball (deployments/image).
#
# The binaries use cgo (go-nvml) but not libnvidia-ml at build time: NVML is loaded at run time from
# the node's driver (the NVIDIA container runtime or the driver root the chart mounts).

ARG GO_VERSION=1.26.8
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
ARG TARGETARCH
# A C cross compiler for the target architecture (cgo).
RUN set -eux; \
    if [ "$TARGETARCH" = "arm64" ] && [ "$(go env GOARCH)" != "arm64" ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross && rm -rf /var/lib/apt/lists/*; \
    elif [ "$TARGETARCH" = "amd64" ] && [ "$(go env GOARCH)" != "amd64" ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc-x86-64-linux-gnu libc6-dev-amd64-cross && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
# -tags grpcnotrace: the Makefile's GOTAGS (gRPC's tracing pages out of the daemons: 28 MB less
# executable, about 10 MB less RSS each).
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    set -eux; \
    case "$TARGETARCH/$(go env GOARCH)" in \
      arm64/amd64) export CC=aarch64-linux-gnu-gcc ;; \
      amd64/arm64) export CC=x86_64-linux-gnu-gcc ;; \
    esac; \
    CGO_ENABLED=1 GOOS=linux GOARCH=$TARGETARCH CGO_CFLAGS="-O2 -g -Wno-deprecated-declarations" \
      go build -tags grpcnotrace -trimpath -ldflags="-s -w" -o /out/usr/bin/ ./cmd/...

# distroless/base: glibc and the loader, nothing else (no shell); the same files make image takes.
FROM gcr.io/distroless/base-debian12:nonroot AS runtime
LABEL org.opencontainers.image.source="https://github.com/tessera-gpu/tessera" \
      org.opencontainers.image.title="tessera" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/usr/bin/ /usr/bin/
# The node daemons run as root (the chart sets runAsUser: 0); the webhook as nonroot.
USER 65532:65532
ENTRYPOINT ["/usr/bin/tessera"]
