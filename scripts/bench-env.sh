#!/usr/bin/env bash
# Sourced by the bench-*.sh scripts: installs what is missing, sets the build environment, builds the release binary.
# Leaves: $root (the repository), $radit (the release binary), $py (the project's Python); cwd = $root; and the
# helpers now (a timestamp), input_mb DIR and machine_line (cores, CPU model, date: every result's header).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" >/dev/null
# shellcheck source=env.sh
source "$root/scripts/env.sh"
cd "$root"
cargo build --release --quiet --bin radit
radit="$root/target/release/radit"
py="$RADIT_VENV/bin/python"
now() { date +%s.%N; }
input_mb() { du -sb "$1" | awk '{printf "%.1f", $1/1048576}'; }
machine_line() {
  echo "machine: $(nproc) cores, $(awk '/model name/{$1=$2=$3="";print;exit}' /proc/cpuinfo | xargs), $(date -u +%F)"
}
