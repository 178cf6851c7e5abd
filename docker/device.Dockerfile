# PiPar device image: one edge device of a distributed run, CPU only, on a slim Debian base.
#
#   docker build -f docker/device.Dockerfile -t pipar-device .        # from the repository root
#   docker run --rm pipar-device --connect tcp://SERVER:5555 --id 0 --threads 1
#
# The build is install.sh itself, on Debian 12 as install.sh expects: its package list is installed
# with apt first (one cached layer), so install.sh finds every package present, skips apt and runs
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${PIPAR_CMAKE_ARGS}
#   cmake --build build
# with PIPAR_CMAKE_ARGS=-DPIPAR_CUDA=OFF (devices run the CPU backend).
#
# The runtime stage holds the binary, its runtime libraries, Debian's Fashion-MNIST (devices load
# their own shard of the training set) and iproute2's tc for link shaping. tc carries the
# cap_net_admin file capability so that docker/device-entrypoint.sh can shape eth0 as the non-root
# user when the container is given NET_ADMIN (compose.yaml: cap_add); without NET_ADMIN, tc fails
# and the entrypoint says so. The image's own entrypoint is plain `pipar device`; compose.yaml
# switches to the wrapper.
#
# The build context is the repository root; docker/device.Dockerfile.dockerignore keeps host build
# directories out of it (BuildKit, the default builder, reads it).

ARG DEBIAN_TAG=bookworm-slim

FROM debian:${DEBIAN_TAG} AS builder
# install.sh's package list. Versions are those of the pinned Debian release; pinning each
# package's exact revision would break the build at every Debian point release (DL3008 ignored).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config git \
      libgtest-dev libgmock-dev zlib1g-dev nlohmann-json3-dev libcli11-dev \
      libzmq3-dev cppzmq-dev libflatbuffers-dev flatbuffers-compiler \
      dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN PIPAR_CMAKE_ARGS=-DPIPAR_CUDA=OFF ./install.sh \
 && build/apps/pipar --version

FROM debian:${DEBIAN_TAG} AS runtime
# Runtime libraries of build/apps/pipar (from ldd): ZeroMQ and the OpenMP runtime (libstdc++ and
# zlib are in the base image); iproute2 for tc; libcap2-bin (a dependency of iproute2) for setcap.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libzmq5 libgomp1 iproute2 libcap2-bin dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/* \
 && setcap cap_net_admin+ep "$(readlink -f /sbin/tc)" \
 && groupadd --gid 10001 pipar \
 && useradd --no-log-init --create-home --uid 10001 --gid pipar --shell /usr/sbin/nologin pipar
COPY --from=builder /src/build/apps/pipar /usr/local/bin/pipar
COPY --chmod=0755 docker/device-entrypoint.sh /usr/local/bin/device-entrypoint.sh

# The user created above (numeric, so that runAsNonRoot-style checks can verify it).
USER 10001:10001
WORKDIR /home/pipar
# Devices are clients: they connect to the server and open no port, so there is nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["pipar", "device"]
CMD ["--connect", "tcp://server:5555", "--id", "0", "--threads", "1"]
