#!/usr/bin/env bash
# Feature-extraction benchmark: `radit eval features` with the native DINOv2 network against transformers'
# Dinov2Model with its own image processor (tests/python/dinov2_twin.py time), same run, same store, same threads:
# a randomly initialised ViT-B/14 at 518 (Rad-DINO's shape, 86.6M parameters), N 512x512 images, read from the
# store, preprocessed (8-bit, bicubic to 518, normalised) and embedded. Both sides time read + preprocessing + model.
# Usage: scripts/bench-features.sh [IMAGES] [BATCH]   (default 16 images, batch 4)
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
images=${1:-16}
batch=${2:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }

# A store whose training split has about `images` rows (the synthetic split sends ~85% to train).
"$radit" synth --out "$work/synth" --images "$(( images * 100 / 85 + 2 ))" --seed 1 --sizes 512x512 >/dev/null
"$radit" shard --no-progress --table "$work/synth/table.csv" --images "$work/synth/images" --out "$work/store" \
  --image-size 512 --shard-images 64 >/dev/null 2>&1
"$py" "$root/tests/python/dinov2_twin.py" make-base "$work/vit-b"
threads=$(nproc)

machine_line
echo
echo "| ViT-B/14 @ 518, batch $batch, $threads threads | images | seconds | images/s |"
echo "|---|---|---|---|"
rust=$("$radit" eval features --store "$work/store" --split train --net "$work/vit-b" --batch "$batch" \
  --device cpu --out "$work/radit.npy")
echo "| radit eval features (native DINOv2) | $(field "$rust" 'rows') | $(field "$rust" 'round(seconds, 1)') | $(field "$rust" 'round(images_per_second, 3)') |"
ref=$(OMP_NUM_THREADS=$threads "$py" "$root/tests/python/dinov2_twin.py" time "$work/store" train "$work/vit-b" "$batch" 2>/dev/null)
echo "| transformers Dinov2Model + BitImageProcessor | $(field "$ref" 'images') | $(field "$ref" 'round(seconds, 1)') | $(field "$ref" 'round(images_per_second, 3)') |"
