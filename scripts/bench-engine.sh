#!/usr/bin/env bash
# Engine benchmark on CPU ranks (radit engine bench: synthetic inputs, no data loading), in one run:
#  - step time at world 1 (one process, all cores) and world 2 (mpirun, one core each), same global batch;
#  - collective payload per step against ZeRO-3's 3 x parameter bytes;
#  - a checkpoint's training stall and write bandwidth against the disk's raw write bandwidth (same size, same dir).
# Usage: scripts/bench-engine.sh [PRESET] [GLOBAL_BATCH] [STEPS]   (default b-latent 2 3). Prints JSON lines.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
preset=${1:-b-latent}
batch=${2:-2}
steps=${3:-3}
cores=$(nproc)
work=$(mktemp -d "${TMPDIR:-/tmp}/radit-bench-engine.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "# $(date -u +%F) $(nproc) cores, $(awk '/model name/{$1=$2=$3="";print;exit}' /proc/cpuinfo | xargs)"
echo "# world 1"
"$radit" engine bench "$preset" --batch "$batch" --steps "$steps" --warmup 1 --threads "$cores" \
  --checkpoint "$work/w1"
echo "# world 2"
mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 -x OMP_NUM_THREADS=$((cores / 2 > 0 ? cores / 2 : 1)) \
  "$radit" engine bench "$preset" --batch $((batch / 2)) --steps "$steps" --warmup 1 \
  --threads $((cores / 2 > 0 ? cores / 2 : 1)) --checkpoint "$work/w2"
echo "# plain model forward+backward (no engine), world 1, same batch"
"$radit" model bench "$preset" --batch "$batch" --threads "$cores" --steps "$steps" --warmup 1
