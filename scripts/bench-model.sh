#!/usr/bin/env bash
# Model step-time benchmark: forward+backward of the Rust RadiT against its PyTorch twin (tests/python/radit_twin.py)
# on the CPU, same preset, batch, thread count and fp32, in one run; the two alternate so drift hits both alike.
# Usage: scripts/bench-model.sh [THREADS] [CASES...]   CASE = preset:batch:steps
#        (default: threads = all cores; cases tiny:16:20 tiny-latent:16:20 b-latent:1:3 b-pixel:1:3)
# Prints a Markdown table.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
twin=("$py" "$root/tests/python/radit_twin.py")
threads=${1:-$(nproc)}
shift || true
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(tiny:16:20 tiny-latent:16:20 b-latent:1:3 b-pixel:1:3)

echo "| preset | batch | threads | radit median s/step | PyTorch median s/step | radit / PyTorch |"
echo "|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  IFS=: read -r preset batch steps <<<"$c"
  args=(--batch "$batch" --threads "$threads" --steps "$steps" --warmup 1)
  r1=$("$radit" model bench "$preset" "${args[@]}")
  p1=$("${twin[@]}" bench --preset "$preset" "${args[@]}")
  p2=$("${twin[@]}" bench --preset "$preset" "${args[@]}")
  r2=$("$radit" model bench "$preset" "${args[@]}")
  "$py" - "$preset" "$batch" "$threads" "$r1" "$r2" "$p1" "$p2" <<'PY'
import json, sys
preset, batch, threads, *runs = sys.argv[1:]
r = min(json.loads(runs[0])["median_s"], json.loads(runs[1])["median_s"])
p = min(json.loads(runs[2])["median_s"], json.loads(runs[3])["median_s"])
print(f"| {preset} | {batch} | {threads} | {r:.4f} | {p:.4f} | {r / p:.2f} |")
PY
done
