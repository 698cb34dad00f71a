#!/usr/bin/env bash
# Builds every crate that does not link libtorch for aarch64-unknown-linux-gnu (GH200's Grace CPU) from this x86
# machine: the control plane (protocol, launch, coordinator, monitoring), the data side (dicom, sources,
# sharding) and the metrics (eval), and links the launcher's test executable for it. Installs what it needs:
# Debian's gcc- and g++-aarch64-linux-gnu (the C and C++ of zstd, blosc, snappy, aws-lc; the linker) and rustup's
# standard library for the target.
# The libtorch crates (models, engine, jobs, run and the radit binary) need an aarch64 libtorch and OpenMPI to link against: build
# those on the GH200 itself (README, "Building on a GH200 login node").
# The build goes to a target directory outside the repository, in the machine's radit cache beside the torch
# install, so that every clone and CI run on this machine rebuilds only what changed (about 11 minutes of 2 cores
# from nothing, most of it the dependencies' C and optimised Rust).
# Usage: scripts/cross-aarch64.sh [cargo build options]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=env.sh
source "$root/scripts/env.sh"
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_DIR="${RADIT_CROSS_TARGET_DIR:-$RADIT_CACHE/target-$target}"
log() { printf '[cross-aarch64] %s\n' "$*" >&2; }
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  log "installing gcc-aarch64-linux-gnu and g++-aarch64-linux-gnu"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
    libc6-dev-arm64-cross >/dev/null
fi
if ! rustup target list --installed | grep -qx "$target"; then
  log "adding the Rust standard library for $target"
  rustup target add "$target"
fi
crates=(radit-protocol radit-launch radit-coordinator radit-monitoring radit-dicom radit-sources radit-sharding radit-eval)
# What must never join them: a crate in this list that starts to link libtorch would stop building here.
if cargo tree --target "$target" -e normal --prefix none $(printf -- '-p %s ' "${crates[@]}") 2>/dev/null |
  grep -qE '^(torch-sys|tch|radit-models|radit-engine|radit-jobs) '; then
  log "one of ${crates[*]} now depends on libtorch: it cannot be cross-built"
  exit 1
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cd "$root"
cargo build --quiet --target "$target" $(printf -- '-p %s ' "${crates[@]}") "$@"
# One executable linked for the target, to show the toolchain links as well as compiles: the launcher's tests.
cargo build --quiet --target "$target" --tests -p radit-launch "$@"
built=0
for bin in "$CARGO_TARGET_DIR/$target"/debug/deps/radit_launch-*; do
  [ -x "$bin" ] && [ ! -d "$bin" ] || continue
  file -b "$bin" | grep -q 'ARM aarch64' || { log "$bin is not an aarch64 executable: $(file -b "$bin")"; exit 1; }
  built=1
done
[ "$built" = 1 ] || { log "no aarch64 test executable of radit-launch was linked"; exit 1; }
log "built for $target: ${crates[*]}"
