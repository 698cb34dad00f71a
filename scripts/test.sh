#!/usr/bin/env bash
# Runs every test: installs what is missing, checks formatting and lints, then the whole workspace's tests
# (unit, conformance and the end-to-end suites under tests/, which start their own services on 127.0.0.1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo fmt --all -- --check
# The protocol crate is a leaf that every process speaks: no libtorch, no async runtime, no web server, no storage.
if cargo tree -p radit-protocol -e normal --prefix none | grep -E '^(torch-sys|tch|tokio|axum|object_store|radit-) ' |
  grep -v '^radit-protocol '; then
  echo "radit-protocol must not depend on the crates above" >&2
  exit 1
fi
# Launchers are a leaf over the protocol: starting ranks links no libtorch and knows no trainer or coordinator.
if cargo tree -p radit-launch -e normal --prefix none | grep -E '^(torch-sys|tch|radit-[a-z]+) ' |
  grep -vE '^radit-(launch|protocol) '; then
  echo "radit-launch must depend on radit-protocol alone among radit's crates, and never on libtorch" >&2
  exit 1
fi
# The DICOM pipeline is a leaf over dicom-rs: no other radit crate, no libtorch.
if cargo tree -p radit-dicom -e normal --prefix none | grep -E '^(torch-sys|tch|radit-[a-z]+) ' |
  grep -v '^radit-dicom '; then
  echo "radit-dicom must not depend on other radit crates or libtorch" >&2
  exit 1
fi
# Harmonising a dataset reads tables and writes a table: no libtorch, no trainer, no services.
if cargo tree -p radit-sources -e normal --prefix none | grep -E '^(torch-sys|tch|axum|radit-[a-z]+) ' |
  grep -vE '^radit-(sources|sharding|dicom) '; then
  echo "radit-sources must depend on radit-sharding (and radit-dicom through it) alone, and never on libtorch" >&2
  exit 1
fi
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast "$@"
# Behind a flag (a release build against another libtorch, about 15 minutes here): the GPU bundle builds, and its
# check runs through on the CPU against torch 2.11's libraries.
if [ "${RADIT_TEST_GPU_BUNDLE:-0}" = 1 ]; then
  "$root/scripts/gpu-bundle.sh"
  TORCH_LIB="$RADIT_CACHE/torch-2.11.0-site/torch/lib" DEVICE=cpu PRESET=tiny OUT="$root/target/gpu-check-cpu" \
    bash "$root/gpu-bundle/gpu-check.sh" 4 1
fi
