# Shared by launch/demo and launch/test (sourced, not run): installs missing Debian packages and
# configures + builds a CMake tree with Ninja. Idempotent: a second run only re-checks.

KVF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

KVF_APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libssl-dev libspdlog-dev libfmt-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libboost-dev
  libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin
  clang libclang-rt-14-dev
  python3 python3-matplotlib
  python3-dev python3-venv pybind11-dev python3-numpy python3-mpi4py python3-pytest openssl
)

kvf_install_packages() {
  local missing=()
  for pkg in "${KVF_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "kvfabric: installing ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "kvfabric: need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
    sudo="sudo"
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# kvf_build <build-dir> [extra cmake -D args...] [-- targets...]
kvf_build() {
  local dir="$1"; shift
  local cmake_args=() targets=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; targets=("$@"); break; fi
    cmake_args+=("$1"); shift
  done
  if [ ! -f "$KVF_ROOT/$dir/CMakeCache.txt" ]; then
    cmake -S "$KVF_ROOT" -B "$KVF_ROOT/$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}"
  fi
  if [ ${#targets[@]} -gt 0 ]; then
    cmake --build "$KVF_ROOT/$dir" --target "${targets[@]}"
  else
    cmake --build "$KVF_ROOT/$dir"
  fi
}
