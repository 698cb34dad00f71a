#!/usr/bin/env bash
# Evaluation-metric benchmark: `radit eval fidelity` (FD, KD, PRDC with k = 5) against the Python references
# (bench/eval_reference.py: scipy's sqrtm FD, torch-fidelity's KD formula in numpy, the `prdc` package) on the same
# 768-d float32 features (Rad-DINO's width), same run, at 5K x 5K and 50K x 50K (the paper's two reference sizes).
# KD: 100 subsets of 1000 (torch-fidelity's defaults). Usage: scripts/bench-eval.sh [SIZES]   (default "5000 50000").
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
sizes=${1:-5000 50000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
memory_gib=$(awk '/MemAvailable/{printf "%.0f", $2/1048576*0.8}' /proc/meminfo)
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }

machine_line
echo
echo "| N x M, 768-d | implementation | FD s | KD s (100 x 1000) | PRDC s | FD | KD | coverage |"
echo "|---|---|---|---|---|---|---|---|"
for n in $sizes; do
  "$py" -c 'import sys, numpy as np; n = int(sys.argv[2]); r = np.random.default_rng(1)
np.save(sys.argv[1] + "/real.npy", r.normal(size=(n, 768)).astype(np.float32))
np.save(sys.argv[1] + "/fake.npy", (r.normal(size=(n, 768)) * 1.1 + 0.05).astype(np.float32))' "$work" "$n"
  rust=$("$radit" eval fidelity --real "$work/real.npy" --fake "$work/fake.npy" --kd-subsets 100 --kd-subset-size 1000)
  ref=$("$py" "$root/bench/eval_reference.py" "$work/real.npy" "$work/fake.npy" 100 1000 5 "$memory_gib")
  echo "| $n x $n | radit | $(field "$rust" 'round(draws[0]["seconds"]["fd"], 2)') | $(field "$rust" 'round(draws[0]["seconds"]["kd"], 2)') | $(field "$rust" 'round(draws[0]["seconds"]["prdc"], 2)') | $(field "$rust" 'round(mean["fd"], 4)') | $(field "$rust" 'round(mean["kd"], 5)') | $(field "$rust" 'round(mean["coverage"], 4)') |"
  echo "| $n x $n | Python references | $(field "$ref" 'round(fd_seconds, 2)') | $(field "$ref" 'round(kd_seconds, 2)') | $(field "$ref" 'round(prdc_seconds, 2) if isinstance(prdc, dict) else prdc') | $(field "$ref" 'round(fd, 4)') | $(field "$ref" 'round(kd, 5)') | $(field "$ref" 'round(prdc["coverage"], 4) if isinstance(prdc, dict) else "-"') |"
done
