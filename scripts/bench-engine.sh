#!/usr/bin/env bash
# The engine against PyTorch FSDP2 on CPU ranks, side by side in one run (synthetic inputs, no data loading, fp32):
#  - radit: `radit engine bench` (world 1: one process on every core; world 2: mpirun, one core per rank);
#  - PyTorch: bench/fsdp2_engine.py (fully_shard per block and root, checkpoint_wrapper per block, gloo, Adam, clip,
#    EMA; the twin's RadiT at the same preset, the same global batch and threads);
#  - the plain model forward+backward (`radit model bench`, no engine) at world 1, the engine's floor.
# Each cell runs radit, PyTorch, PyTorch, radit and keeps the better of each, so the machine's drift hits both alike.
# Prints a Markdown table, then `SUMMARY|...` lines that scripts/bench-all.sh collects.
# Usage: scripts/bench-engine.sh [PRESET] [GLOBAL_BATCH] [STEPS]   (default b-latent 2 3)
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
preset=${1:-b-latent}
batch=${2:-2}
steps=${3:-3}
cores=$(nproc)
per_rank=$((cores / 2 > 0 ? cores / 2 : 1))
machine_line
radit_run() { # WORLD
  if [ "$1" = 1 ]; then
    "$radit" engine bench "$preset" --batch "$batch" --steps "$steps" --warmup 1 --threads "$cores"
  else
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 -x OMP_NUM_THREADS=$per_rank \
      "$radit" engine bench "$preset" --batch $((batch / 2)) --steps "$steps" --warmup 1 --threads $per_rank
  fi
}
torch_run() { # WORLD
  local threads=$cores
  [ "$1" = 1 ] || threads=$per_rank
  OMP_NUM_THREADS=$threads "$py" "$root/bench/fsdp2_engine.py" --preset "$preset" --global-batch "$batch" \
    --world "$1" --steps "$steps" --warmup 1 --threads "$threads"
}
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for world in 1 2; do
  echo "# world $world: radit, FSDP2, FSDP2, radit" >&2
  { radit_run "$world"; torch_run "$world"; torch_run "$world"; radit_run "$world"; } | grep '^{' >>"$results"
done
echo "# plain forward+backward, world 1" >&2
"$radit" model bench "$preset" --batch "$batch" --threads "$cores" --steps "$steps" --warmup 1 | grep '^{' >>"$results"
"$py" - "$preset" "$batch" "$results" <<'PY'
import json, sys
preset, batch, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open(path)]
plain_row = min((r for r in rows if "median_s" in r), key=lambda r: r["median_s"])
plain, forward = plain_row["median_s"], plain_row.get("forward_median_s", 0.0)
# Per-block activation checkpointing runs each block's forward twice: no engine can beat plain + one forward.
floor = plain + forward
def best(world, impl):
    if impl == "radit":
        # Rank 0 reports for the world (its step clock; the largest rank's peak memory).
        reps = [r for r in rows if "rank" in r and r["world"] == world]
    else:
        reps = [r for r in rows if r.get("impl") == "pytorch-fsdp2" and r["world"] == world]
    return min(reps, key=lambda r: r['step_seconds_median'])
print(f"| preset | world | global batch | radit s/step | FSDP2 s/step | radit/FSDP2 | recompute floor/FSDP2 | radit optimizer s | bytes/step/rank radit / FSDP2 | peak RSS/rank radit / FSDP2 | engine/plain fwd+bwd |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
summary = []
for world in (1, 2):
    r, t = best(world, "radit"), best(world, "torch")
    ratio = r['step_seconds_median'] / t['step_seconds_median']
    over_plain = r['step_seconds_median'] / plain
    mb = lambda b: f"{b / 1e6:,.1f} MB"
    print(f"| {preset} | {world} | {batch} | {r['step_seconds_median']:.4g} | {t['step_seconds_median']:.4g} | {ratio:.2f} "
          f"| {floor / t['step_seconds_median']:.2f} | {r.get('optimizer_seconds_median', 0.0):.3g} "
          f"| {mb(r['bytes_per_step'])} / {mb(t['bytes_per_step'])} | {mb(r['peak_rss_bytes'])} / {mb(t['peak_rss_bytes'])} "
          f"| {over_plain:.2f} |")
    target = "<= 0.75" if preset == "b-latent" else "-"
    summary.append(f"SUMMARY|engine {preset} world {world}: step time vs FSDP2|{r['step_seconds_median']:.4g} s|{t['step_seconds_median']:.4g} s|{ratio:.2f}|{target}")
    if world == 1:
        summary.append(f"SUMMARY|engine {preset} world 1: step time vs plain fwd+bwd|{r['step_seconds_median']:.4g} s|{plain:.4g} s|{over_plain:.2f}|<= 1.4")
print(f"\nplain forward+backward (radit model bench, world 1): {plain:.4g} s/step; forward alone {forward:.4g} s;"
      f" recompute floor (plain + forward) {floor:.4g} s, engine world 1 / floor {best(1, 'radit')['step_seconds_median'] / floor:.2f}")
print("\n".join(summary))
PY
