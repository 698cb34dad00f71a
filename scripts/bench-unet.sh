#!/usr/bin/env bash
# RadUNet side by side with PyTorch on CPU ranks, in one run (synthetic inputs, no data loading, fp32):
#  - the plain forward+backward: `radit model bench` against the PyTorch twin (tests/python/radunet_twin.py bench),
#    same preset, batch and libtorch threads;
#  - the data-parallel engine: `radit engine bench --mode ddp` (world 1: one process on every core; world 2: mpirun,
#    one core per rank) against PyTorch DDP on gloo (bench/ddp_unet.py: the twin, clip, AdamW, EMA, forced weight
#    normalisation, dropout on).
# Each cell runs radit, PyTorch, PyTorch, radit and keeps the better of each, so the machine's drift hits both alike.
# Prints a Markdown table, then `SUMMARY|...` lines that scripts/bench-all.sh collects.
# Usage: scripts/bench-unet.sh [PRESET] [GLOBAL_BATCH] [STEPS]   (default unet-small 4 3)
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
preset=${1:-unet-small}
batch=${2:-4}
steps=${3:-3}
cores=$(nproc)
per_rank=$((cores / 2 > 0 ? cores / 2 : 1))
machine_line
results=$(mktemp)
trap 'rm -f "$results"' EXIT
plain_radit() { "$radit" model bench "$preset" --batch "$batch" --threads "$cores" --steps "$steps" --warmup 1; }
plain_torch() { OMP_NUM_THREADS=$cores "$py" tests/python/radunet_twin.py bench "$preset" "$batch" "$cores" "$steps"; }
engine_radit() { # WORLD
  if [ "$1" = 1 ]; then
    "$radit" engine bench "$preset" --mode ddp --batch "$batch" --steps "$steps" --warmup 1 --threads "$cores"
  else
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 -x OMP_NUM_THREADS=$per_rank \
      "$radit" engine bench "$preset" --mode ddp --batch $((batch / 2)) --steps "$steps" --warmup 1 \
      --threads $per_rank
  fi
}
engine_torch() { # WORLD
  local threads=$cores
  [ "$1" = 1 ] || threads=$per_rank
  OMP_NUM_THREADS=$threads "$py" bench/ddp_unet.py --preset "$preset" --global-batch "$batch" --world "$1" \
    --steps "$steps" --warmup 1 --threads "$threads"
}
echo "# plain forward+backward: radit, twin, twin, radit" >&2
{ plain_radit; plain_torch; plain_torch; plain_radit; } | grep '^{' | sed 's/^/plain /' >>"$results"
for world in 1 2; do
  echo "# world $world: radit, DDP, DDP, radit" >&2
  { engine_radit "$world"; engine_torch "$world"; engine_torch "$world"; engine_radit "$world"; } | grep '^{' \
    | sed 's/^/engine /' >>"$results"
done
"$py" - "$preset" "$batch" "$results" <<'PY'
import json, sys
preset, batch, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plain, engine = [], []
for line in open(path):
    kind, row = line.split(" ", 1)
    (plain if kind == "plain" else engine).append(json.loads(row))
def best(rows, key):
    return min(rows, key=lambda r: r[key])
r = best([p for p in plain if p["impl"] == "radit"], "median_s")
t = best([p for p in plain if p["impl"] == "pytorch"], "median_s")
summary = []
print(f"| {preset}, batch {batch} | radit s | PyTorch twin s | radit/PyTorch |")
print("|---|---|---|---|")
for what in ("median_s", "forward_median_s"):
    label = "forward+backward" if what == "median_s" else "forward alone"
    print(f"| {label} | {r[what]:.4g} | {t[what]:.4g} | {r[what] / t[what]:.2f} |")
summary.append(f"SUMMARY|RadUNet {preset} forward+backward vs PyTorch twin|{r['median_s']:.4g} s|{t['median_s']:.4g} s|"
               f"{r['median_s'] / t['median_s']:.2f}|<= 1.0")
print()
print("| world | radit ddp s/step | PyTorch DDP s/step | radit/DDP | peak RSS/rank radit / DDP | radit bytes/step/rank |")
print("|---|---|---|---|---|---|")
mb = lambda b: f"{b / 1e6:,.1f} MB"
for world in (1, 2):
    re = best([e for e in engine if "rank" in e and e["world"] == world], "step_seconds_median")
    te = best([e for e in engine if e.get("impl") == "pytorch-ddp" and e["world"] == world], "step_seconds_median")
    ratio = re["step_seconds_median"] / te["step_seconds_median"]
    print(f"| {world} | {re['step_seconds_median']:.4g} | {te['step_seconds_median']:.4g} | {ratio:.2f} "
          f"| {mb(re['peak_rss_bytes'])} / {mb(te['peak_rss_bytes'])} | {mb(re['bytes_per_step'])} |")
    summary.append(f"SUMMARY|RadUNet {preset} ddp world {world}: step time vs PyTorch DDP|"
                   f"{re['step_seconds_median']:.4g} s|{te['step_seconds_median']:.4g} s|{ratio:.2f}|<= 1.0")
print("\n".join(summary))
PY
