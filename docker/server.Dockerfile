# PiPar server image: the server half of a distributed run, on an NVIDIA GPU (CUDA backend).
#
#   docker build -f docker/server.Dockerfile -t pipar-server .        # from the repository root
#   docker run --rm --gpus all -p 5555:5555 pipar-server               # default: the CMD below
#
# Base images: NVIDIA's CUDA images with cuDNN, pinned by tag. The tag pattern is
# nvidia/cuda:<CUDA version>-cudnn-<devel|runtime>-ubuntu<release>, e.g.
# nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 and nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# (CUDA 13.0 with cuDNN 9, the toolkit this repository is developed with). Override with
# --build-arg CUDA_VERSION=... / UBUNTU_VERSION=...; the devel and runtime tags must match.
# cuDNN is not linked by pipar today (its kernels are its own plus cuBLAS); the cudnn variants are
# chosen so that a cuDNN backend needs no new base image.
#
# The build steps are exactly install.sh's: its package list (Ubuntu 24.04 has the same names as
# Debian 12) installed with apt, then install.sh's two commands
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${PIPAR_CMAKE_ARGS}
#   cmake --build build
# with PIPAR_CMAKE_ARGS="-DPIPAR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" (fail instead of silently
# building CPU only; 90 = H100/H200, override with --build-arg CUDA_ARCHS=...). install.sh itself is
# not run here only because it would also apt-get the Debian data set, which the data stage brings.
#
# The build context is the repository root; docker/server.Dockerfile.dockerignore keeps host build
# directories out of it (BuildKit, the default builder, reads it).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist package (the server evaluates on the test set and
# partitions the training set); Debian's package is the one install.sh uses.
FROM debian:bookworm-slim AS data
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS builder
ARG CUDA_ARCHS=90
# install.sh's package list, less dataset-fashion-mnist (it comes from the data stage). Versions are
# those of the pinned base image's Ubuntu release; pinning each package's exact revision would break
# the build at every Ubuntu security update, hence the DL3008 ignore.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config git \
      libgtest-dev libgmock-dev zlib1g-dev nlohmann-json3-dev libcli11-dev \
      libzmq3-dev cppzmq-dev libflatbuffers-dev flatbuffers-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPIPAR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS}" \
 && cmake --build build

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS runtime
# Runtime libraries of build/apps/pipar (from ldd): ZeroMQ and the OpenMP runtime; libstdc++, zlib
# and the CUDA runtime with cuBLAS are in the base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libzmq5 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 pipar \
 && useradd --no-log-init --create-home --uid 10001 --gid pipar --shell /usr/sbin/nologin pipar \
 && mkdir -p /home/pipar/runs \
 && chown pipar:pipar /home/pipar/runs
COPY --from=data /usr/share/datasets/fashion-mnist /usr/share/datasets/fashion-mnist
COPY --from=builder /src/build/apps/pipar /usr/local/bin/pipar

# The user created above (numeric, so that runAsNonRoot-style checks can verify it).
USER 10001:10001
WORKDIR /home/pipar
# Outputs (metrics.jsonl, summary.json, trace.json) go to runs/<timestamp> unless --out says otherwise.
VOLUME ["/home/pipar/runs"]
ENV PIPAR_PORT=5555
EXPOSE 5555/tcp
# Healthy while the server's port accepts TCP connections (ZeroMQ drops a connection that sends no
# greeting, so the probe does not disturb the run). The server binds before loading data and
# waiting for devices, and exits when training ends.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PIPAR_PORT}"]
ENTRYPOINT ["pipar"]
CMD ["server", "--listen", "tcp://0.0.0.0:5555", "--insecure", "--backend", "auto", "--mode", "pipar", "--devices", "4", \
     "--split", "2", "--micro-batches", "8", "--model", "vgg5", "--dataset", "fmnist", "--epochs", "2"]
