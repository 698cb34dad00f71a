#!/usr/bin/env bash
# The main job on the embedded default: installs what is missing, builds radit, then synthesises a small dataset,
# shards it into a local Zarr store, verifies it and prints a summary. Extra arguments go to `radit quickstart`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --bin radit
exec "$root/target/release/radit" quickstart "$@"
