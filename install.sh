#!/usr/bin/env bash
# Installs PiPar's build dependencies from Debian packages (Debian 12 or newer) and builds it into
# build/ (Release). Re-running it only rebuilds what changed. Set PIPAR_BUILD_DIR to build elsewhere
# and PIPAR_CMAKE_ARGS for extra CMake options (e.g. -DPIPAR_CUDA=OFF).
set -euo pipefail
cd "$(dirname "$0")"

packages=(build-essential cmake ninja-build pkg-config git
          libgtest-dev libgmock-dev zlib1g-dev nlohmann-json3-dev libcli11-dev
          libzmq3-dev cppzmq-dev libflatbuffers-dev flatbuffers-compiler
          dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install.sh: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

build=${PIPAR_BUILD_DIR:-build}
# shellcheck disable=SC2086
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${PIPAR_CMAKE_ARGS:-}
cmake --build "$build"
echo "install.sh: built $build/pipar"
