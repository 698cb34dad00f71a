#!/usr/bin/env bash
# Encode benchmark: the full-size FLUX.2 encoder (random weights, 512x512 greyscale in, 32x64x64 mean out) in radit
# (`radit vae bench`) and in its PyTorch twin (tests/python/flux2_ae_twin.py bench), same threads, same run; then
# `radit encode` as a job over a small 512x512 store (what reading, float16 and journalling add to the encoder); then
# the FLOPs per image and the GPU-hours CXR7-1M's encoding would take at a given bf16 throughput.
# Usage: scripts/bench-vae.sh [THREADS] [STEPS] [JOB_IMAGES]   (defaults: all cores, 2 timed encodes after 1
# warm-up, 8 images for the job).
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
threads=${1:-$(nproc)}
steps=${2:-2}
job_images=${3:-8}
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }

machine_line
echo
rust=$("$radit" vae bench flux2 --threads "$threads" --steps "$steps")
twin=$("$py" "$root/tests/python/flux2_ae_twin.py" bench --threads "$threads" --steps "$steps")
echo "| implementation | threads | seconds per 512x512 image | images/s | GFLOP/s |"
echo "|---|---|---|---|---|"
gflop=$(field "$rust" gflop_per_image)
for json in "$rust" "$twin"; do
  awk -v name="$(field "$json" impl)" -v th="$threads" -v s="$(field "$json" median_s)" -v g="$gflop" \
    'BEGIN{printf "| %s | %d | %.2f | %.3f | %.0f |\n", name, th, s, 1/s, g/s}'
done
# The encode job end to end over a small 512x512 store: `radit encode` reads each shard, encodes it (batches of
# one, as above), converts to float16, writes and journals it; same threads, random FLUX.2 weights.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$radit" synth --out "$work/synth" --images "$job_images" --sizes 512x512 --seed 5 >/dev/null
"$radit" shard --no-progress --table "$work/synth/table.csv" --images "$work/synth/images" --out "$work/store" \
  --shard-images 4 >/dev/null
"$radit" vae init flux2 --out "$work/ae.safetensors" >/dev/null
job=$("$radit" encode --store "$work/store" --weights "$work/ae.safetensors" --threads "$threads" --batch 1 \
  2>&1 >/dev/null | grep '^{"rank"')
awk -v th="$threads" -v ips="$(field "$job" images_per_second)" -v n="$(field "$job" images_encoded)" -v g="$gflop" \
  'BEGIN{printf "| radit encode (the job, %d images) | %d | %.2f | %.3f | %.0f |\n", n, th, 1/ips, ips, g*ips}'
echo
echo "encoder FLOPs per 512x512 image: $(awk -v g="$gflop" 'BEGIN{printf "%.0f GFLOP", g}')"
for u in 0.2 0.4 0.6; do
  awk -v g="$gflop" -v u="$u" \
    'BEGIN{printf "CXR7-1M (1.2M images) at %.0f%% of a GH200'"'"'s 989 bf16 TFLOP/s: %.2f GPU-hours\n", 100*u, 1.2e6*g*1e9/(989e12*u)/3600}'
done
