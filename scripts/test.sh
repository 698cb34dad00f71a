#!/usr/bin/env bash
# Runs every test: installs what is missing, checks formatting and lints, then the whole workspace's tests
# (unit, conformance and the end-to-end suites under tests/, which start their own services on 127.0.0.1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast "$@"
# Behind a flag (a release build against another libtorch, about 15 minutes here): the GPU bundle builds, and its
# check runs through on the CPU against torch 2.11's libraries.
if [ "${RADIT_TEST_GPU_BUNDLE:-0}" = 1 ]; then
  "$root/scripts/gpu-bundle.sh"
  TORCH_LIB="$RADIT_CACHE/torch-2.11.0-site/torch/lib" DEVICE=cpu PRESET=tiny OUT="$root/target/gpu-check-cpu" \
    bash "$root/gpu-bundle/gpu-check.sh" 4 1
fi
