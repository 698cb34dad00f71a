#!/usr/bin/env bash
# Sourced by the bench-*.sh scripts: installs what is missing, sets the build environment, builds the release binary.
# Leaves: $root (the repository), $radit (the release binary), $py (the project's Python); cwd = $root.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" >/dev/null
# shellcheck source=env.sh
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --quiet --bin radit
radit="$root/target/release/radit"
py="$RADIT_VENV/bin/python"
