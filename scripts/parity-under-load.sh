#!/usr/bin/env bash
# The engine's worlds-1/2/4 parity test, N times (default 50) beside CPU hogs (one more busy loop than cores): every
# run must pass its 1e-5 bound and print the same gaps (the test fixes libtorch's intra-op threads at one, so the
# order of every sum is the same whatever the load). Prints one line per run and a summary for BENCHMARKS.md.
#
#   scripts/parity-under-load.sh [N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/env.sh"
runs=${1:-50}
test=fsdp::tests::sharded_training_matches_plain_autograd_on_worlds_1_2_and_4
exe=$(cd "$root" && cargo test -p radit-engine --lib --no-run --message-format json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
hogs=()
for _ in $(seq 0 "$(nproc)"); do
  (while :; do :; done) &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
passed=0
declare -A seen
for i in $(seq 1 "$runs"); do
  if out=$("$exe" "$test" --exact --nocapture 2>&1); then
    passed=$((passed + 1))
  else
    echo "run $i FAILED:"; echo "$out" | tail -20
  fi
  gaps=$(echo "$out" | grep "largest relative gap" | tr '\n' ' ')
  seen["$gaps"]=1
  echo "run $i: $gaps"
done
echo "summary: $passed of $runs passed beside $(( $(nproc) + 1 )) busy loops on $(nproc) cores; ${#seen[@]} distinct set(s) of gaps"
for g in "${!seen[@]}"; do echo "  $g"; done
[ "$passed" = "$runs" ]
