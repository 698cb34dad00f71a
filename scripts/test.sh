#!/usr/bin/env bash
# Runs every test: installs what is missing, checks formatting and lints, then the whole workspace's tests
# (unit, conformance and the end-to-end suites under tests/, which start their own services on 127.0.0.1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo fmt --all -- --check
# The layout's arrows, checked: `forbid CRATE PATTERN ALLOWED WHY` fails when CRATE's normal dependencies include a
# crate matching PATTERN (an extended regex on the name) other than the ALLOWED ones.
forbid() {
  local crate=$1 pattern=$2 allowed=$3 why=$4 found
  found=$(cargo tree -p "$crate" -e normal --prefix none | awk '{print $1}' | sort -u |
    grep -E "^($pattern)\$" | grep -vE "^($allowed)\$" || true)
  if [ -n "$found" ]; then
    echo "$crate must not depend on: $(echo "$found" | tr '\n' ' ')($why)" >&2
    exit 1
  fi
}
forbid radit-protocol 'torch-sys|tch|tokio|axum|object_store|radit-.*' radit-protocol \
  "the protocol is a leaf every process speaks: no libtorch, async runtime, web server or storage"
forbid radit-launch 'torch-sys|tch|radit-.*' 'radit-launch|radit-protocol' \
  "launchers are a leaf over the protocol: starting ranks links no libtorch and knows no job or coordinator"
forbid radit-dicom 'torch-sys|tch|radit-.*' radit-dicom "the DICOM pipeline is a leaf over dicom-rs"
forbid radit-sources 'torch-sys|tch|axum|radit-.*' 'radit-sources|radit-sharding|radit-dicom' \
  "harmonising a dataset reads tables and writes one: no libtorch, models, engine or services"
forbid radit-eval 'torch-sys|tch|radit-.*' radit-eval \
  "the metrics are a leaf over faer: no libtorch, so they build and test anywhere"
forbid radit-models 'mpi|mpi-sys|cudarc|libloading|radit-.*' 'radit-models|radit-protocol|radit-sharding|radit-dicom' \
  "a model knows no ranks: networks and their maths over tch, the protocol and the data schema"
forbid radit-engine 'radit-.*' 'radit-engine|radit-models|radit-protocol|radit-sharding|radit-dicom' \
  "the engine knows no job: collectives, FSDP and checkpoints under any model, never the loops above them"
forbid radit-jobs 'radit-(run|coordinator|launch|monitoring|sources)' '' \
  "a job is what one rank runs: it knows no supervisor, coordinator, launcher or harmoniser"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The binary as the tests build it, with the fault plan compiled in (it is out of every other build).
cargo clippy -p radit --all-targets --features fault-injection --quiet -- -D warnings
# The GPU bundle stubs tch wrappers of ops torch 2.11 lacks: radit's code must call none of them.
python3 "$root/scripts/check-stubbed-ops.py" "$root/scripts/gpu-stubbed-ops.txt"
# GH200's host CPU is aarch64: every crate without libtorch builds for it (scripts/cross-aarch64.sh says how).
"$root/scripts/cross-aarch64.sh"
# Tests spawn processes while others run: none may change this process's environment (pass it to the child).
if grep -rnE 'env::(set_var|remove_var)' --include='*.rs' src protocol sharding models engine jobs coordinator launch run \
    monitoring testkit dicom sources eval tests; then
  echo "the environment is changed above: give the variable to the child process instead" >&2
  exit 1
fi
# Under cargo-nextest (the machine image has it; `cargo install cargo-nextest` elsewhere) with the `ci` profile of
# .config/nextest.toml: per-test time limits, the rank-starting tests one at a time, a JUnit report whose slowest
# tests are printed at the end. Without it, cargo test (no time limits).
if command -v cargo-nextest > /dev/null; then
  trap 'python3 "$root/scripts/slowest.py" "$root/target/nextest/ci/junit.xml" 15 || true' EXIT
  cargo nextest run --workspace --profile ci --no-fail-fast --features radit/fault-injection "$@"
  cargo test --workspace --doc --no-fail-fast
  # The DICOM codecs behind features (OpenJPEG, CharLS: C and C++ built from source), against the pydicom twin.
  cargo nextest run -p radit-dicom --features j2k,jls --profile default --no-fail-fast
else
  echo "cargo-nextest not found: running cargo test, without per-test time limits" >&2
  cargo test --workspace --no-fail-fast --features radit/fault-injection "$@"
  cargo test -p radit-dicom --features j2k,jls --no-fail-fast
fi
# Behind a flag (a release build against another libtorch, about 15 minutes here): the GPU bundle builds, and its
# check runs through on the CPU against torch 2.11's libraries.
if [ "${RADIT_TEST_GPU_BUNDLE:-0}" = 1 ]; then
  "$root/scripts/gpu-bundle.sh"
  TORCH_LIB="$RADIT_CACHE/torch-2.11.0-site/torch/lib" DEVICE=cpu PRESET=tiny OUT="$root/target/gpu-check-cpu" \
    bash "$root/gpu-bundle/gpu-check.sh" 4 1
fi
