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
